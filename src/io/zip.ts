/**
 * A bounded, read-only zip reader for what torch.save writes (PKWARE APPNOTE 4.3: end of central directory, zip64,
 * central directory, local headers). Sizes and offsets come from the central directory (torch sets bit 3 and writes
 * zeros into local headers); records are addressed by offset so tensor data is read lazily, never the whole file.
 * Stored records are read as they are; a small deflated record (a pickle re-zipped by some tool) is inflated with an
 * output cap; a deflated storage cannot be read by offset and is refused with a way out.
 */
import type { FileHandle } from 'node:fs/promises';
import { inflateRawSync } from 'node:zlib';
import { SdtuneError } from '../errors.js';

export interface ZipEntry {
  name: string;
  /** 0 = stored, 8 = deflate */
  method: number;
  flags: number;
  compressedSize: number;
  size: number;
  /** offset of the local file header */
  localOffset: number;
}

const EOCD_SIG = 0x06054b50;
const EOCD64_SIG = 0x06064b50;
const EOCD64_LOC_SIG = 0x07064b50;
const CEN_SIG = 0x02014b50;
const LOC_SIG = 0x04034b50;
/** Bounds that keep a hostile archive cheap: SD checkpoints have ~1,000-3,000 records and a few-hundred-KB directory. */
export const MAX_ZIP_ENTRIES = 200_000;
const MAX_CENTRAL_DIR = 64 << 20;
const MAX_IO = 1 << 30;

const bad = (file: string, msg: string) => new SdtuneError('file', `${file}: ${msg}`);

/** Read exactly `n` bytes at `pos` (positioned, loops over short reads). */
export async function readAt(fh: FileHandle, pos: number, n: number, file: string): Promise<Uint8Array> {
  const buf = new Uint8Array(n);
  for (let off = 0; off < n; ) {
    const { bytesRead } = await fh.read(buf, off, Math.min(n - off, MAX_IO), pos + off);
    if (bytesRead === 0) throw bad(file, `unexpected end of file at byte ${pos + off} (file truncated?)`);
    off += bytesRead;
  }
  return buf;
}

const u64 = (dv: DataView, at: number) => {
  const v = dv.getBigUint64(at, true);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(v);
};

/** An open zip archive: the central directory, parsed and checked against the file size. */
export class ZipArchive {
  private readonly dataStart = new Map<string, number>();
  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    readonly dataEnd: number,
    readonly entries: ReadonlyMap<string, ZipEntry>,
  ) {}

  /** Parse the end records and the central directory of an already-open file of `size` bytes. */
  static async open(fh: FileHandle, file: string, size: number): Promise<ZipArchive> {
    if (size < 22) throw bad(file, `too short (${size} bytes) to be a zip archive`);
    const tailLen = Math.min(size, 22 + 0xffff);
    const tail = await readAt(fh, size - tailLen, tailLen, file);
    const tv = new DataView(tail.buffer);
    let e = -1;
    for (let i = tailLen - 22; i >= 0; i--) if (tv.getUint32(i, true) === EOCD_SIG && i + 22 + tv.getUint16(i + 20, true) <= tailLen) { e = i; break; }
    if (e < 0) throw bad(file, 'no zip end-of-central-directory record (truncated or not a zip archive)');
    if (tv.getUint16(e + 4, true) !== 0 || tv.getUint16(e + 6, true) !== 0) throw bad(file, 'multi-disk (split) zip archives are not supported');
    let count = tv.getUint16(e + 10, true);
    let cdSize = tv.getUint32(e + 12, true);
    let cdOffset = tv.getUint32(e + 16, true);
    const eocdPos = size - tailLen + e;
    if (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) {
      // zip64: a locator right before the end record points at the zip64 end record
      if (eocdPos < 20) throw bad(file, 'zip64 archive without its zip64 locator (truncated?)');
      const loc = new DataView((await readAt(fh, eocdPos - 20, 20, file)).buffer);
      if (loc.getUint32(0, true) !== EOCD64_LOC_SIG) throw bad(file, 'zip64 archive without its zip64 locator (corrupt?)');
      const at = u64(loc, 8);
      if (at + 56 > eocdPos) throw bad(file, `zip64 end record offset ${at} is out of range`);
      const r = new DataView((await readAt(fh, at, 56, file)).buffer);
      if (r.getUint32(0, true) !== EOCD64_SIG) throw bad(file, `no zip64 end record at byte ${at} (corrupt?)`);
      count = u64(r, 32);
      cdSize = u64(r, 40);
      cdOffset = u64(r, 48);
    }
    if (count > MAX_ZIP_ENTRIES) throw bad(file, `zip directory lists ${count} records, more than this reader's limit of ${MAX_ZIP_ENTRIES.toLocaleString('en-US')}`);
    if (cdSize > MAX_CENTRAL_DIR) throw bad(file, `zip central directory of ${cdSize} bytes exceeds the ${MAX_CENTRAL_DIR} byte limit`);
    if (cdOffset + cdSize > size) throw bad(file, `zip central directory [${cdOffset}, +${cdSize}] lies past the end of the ${size}-byte file (truncated?)`);
    const cd = await readAt(fh, cdOffset, cdSize, file);
    const dv = new DataView(cd.buffer);
    const entries = new Map<string, ZipEntry>();
    const utf8 = new TextDecoder('utf-8', { fatal: true });
    let p = 0;
    for (let i = 0; i < count; i++) {
      if (p + 46 > cdSize || dv.getUint32(p, true) !== CEN_SIG) throw bad(file, `zip central directory record ${i} is malformed (at byte ${cdOffset + p})`);
      const flags = dv.getUint16(p + 8, true);
      const method = dv.getUint16(p + 10, true);
      let compressedSize = dv.getUint32(p + 20, true);
      let usize = dv.getUint32(p + 24, true);
      const nameLen = dv.getUint16(p + 28, true), extraLen = dv.getUint16(p + 30, true), commentLen = dv.getUint16(p + 32, true);
      let localOffset = dv.getUint32(p + 42, true);
      const end = p + 46 + nameLen + extraLen + commentLen;
      if (end > cdSize) throw bad(file, `zip central directory record ${i} runs past the directory`);
      let name: string;
      try {
        name = utf8.decode(cd.subarray(p + 46, p + 46 + nameLen));
      } catch {
        throw bad(file, `zip record ${i} has a name that is not valid UTF-8`);
      }
      // zip64 extended information: the 8-byte values of the fields that are saturated, in this order
      for (let x = p + 46 + nameLen; x + 4 <= p + 46 + nameLen + extraLen; ) {
        const id = dv.getUint16(x, true), len = dv.getUint16(x + 2, true);
        if (x + 4 + len > p + 46 + nameLen + extraLen) throw bad(file, `zip record "${name}" has a malformed extra field`);
        if (id === 0x0001) {
          let q = x + 4;
          const take = () => {
            if (q + 8 > x + 4 + len) throw bad(file, `zip record "${name}" has a short zip64 extra field`);
            const v = u64(dv, q);
            q += 8;
            return v;
          };
          if (usize === 0xffffffff) usize = take();
          if (compressedSize === 0xffffffff) compressedSize = take();
          if (localOffset === 0xffffffff) localOffset = take();
        }
        x += 4 + len;
      }
      if (entries.has(name)) throw bad(file, `zip archive has two records named "${name}"`);
      if (localOffset + 30 > cdOffset || localOffset + compressedSize > cdOffset)
        throw bad(file, `zip record "${name}" (offset ${localOffset}, ${compressedSize} bytes) lies outside the data area (truncated or corrupt?)`);
      entries.set(name, { name, method, flags, compressedSize, size: usize, localOffset });
      p = end;
    }
    return new ZipArchive(fh, file, cdOffset, entries);
  }

  /** File offset of a record's first data byte (from its local header: 30 + name + extra bytes after it). */
  async dataOffset(e: ZipEntry): Promise<number> {
    const known = this.dataStart.get(e.name);
    if (known !== undefined) return known;
    const h = new DataView((await readAt(this.fh, e.localOffset, 30, this.path)).buffer);
    if (h.getUint32(0, true) !== LOC_SIG) throw bad(this.path, `zip record "${e.name}" has no local header at byte ${e.localOffset} (corrupt?)`);
    const start = e.localOffset + 30 + h.getUint16(26, true) + h.getUint16(28, true);
    if (start + e.compressedSize > this.dataEnd) throw bad(this.path, `zip record "${e.name}" data [${start}, +${e.compressedSize}] runs past the data area (truncated?)`);
    this.dataStart.set(e.name, start);
    return start;
  }

  /** Whether a record can be read by offset (stored, not encrypted); throws a clear error otherwise. */
  assertStored(e: ZipEntry, what: string): void {
    if (e.flags & 1) throw new SdtuneError('unsupported', `${this.path}: zip record "${e.name}" is encrypted`);
    if (e.method !== 0)
      throw new SdtuneError('unsupported', `${this.path}: ${what} "${e.name}" is compressed (zip method ${e.method}); torch.save stores records uncompressed, so this archive was re-zipped by another tool: re-save it with torch.save, or re-zip it without compression (zip -0)`);
    if (e.size !== e.compressedSize) throw bad(this.path, `stored zip record "${e.name}" has size ${e.size} but ${e.compressedSize} stored bytes`);
  }

  /** Read a whole (small) record: stored, or deflated with the output capped at `maxBytes`. */
  async readEntry(e: ZipEntry, maxBytes: number): Promise<Uint8Array> {
    if (e.flags & 1) throw new SdtuneError('unsupported', `${this.path}: zip record "${e.name}" is encrypted`);
    if (e.size > maxBytes) throw bad(this.path, `zip record "${e.name}" claims ${e.size} bytes, more than the ${maxBytes} byte limit for it`);
    if (e.method === 0) {
      this.assertStored(e, 'record');
      return readAt(this.fh, await this.dataOffset(e), e.size, this.path);
    }
    if (e.method !== 8) throw new SdtuneError('unsupported', `${this.path}: zip record "${e.name}" uses compression method ${e.method} (only stored and deflate are read)`);
    if (e.compressedSize > maxBytes) throw bad(this.path, `zip record "${e.name}" has ${e.compressedSize} compressed bytes, more than the ${maxBytes} byte limit`);
    const raw = await readAt(this.fh, await this.dataOffset(e), e.compressedSize, this.path);
    let out: Buffer;
    try {
      out = inflateRawSync(raw, { maxOutputLength: Math.max(1, maxBytes) });
    } catch (err) {
      throw bad(this.path, `zip record "${e.name}" does not inflate (${(err as Error).message})`);
    }
    if (out.length !== e.size) throw bad(this.path, `zip record "${e.name}" inflates to ${out.length} bytes, the directory says ${e.size}`);
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }
}
