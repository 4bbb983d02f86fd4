/**
 * The safetensors container (spec: shared/spec/checkpoint-layouts.md §1): strict header validation, positioned
 * per-tensor reads (multi-GB files are never read whole), exact F16/BF16 conversions, and a streaming atomic
 * writer that reproduces the reference writer's bytes.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { SdtuneError, fmtShape } from '../errors.js';
import { withAtomicFile, writeAll } from '../runtime/atomic.js';

export type Dtype =
  | 'BOOL' | 'U8' | 'I8' | 'F8_E5M2' | 'F8_E4M3' | 'I16' | 'U16' | 'F16' | 'BF16' | 'I32' | 'U32' | 'F32' | 'F64' | 'I64' | 'U64';

/** Bytes per element; the key order is the reference enum order (spec §1.3). */
export const DTYPE_SIZE: Record<Dtype, number> = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1, I16: 2, U16: 2, F16: 2, BF16: 2, I32: 4, U32: 4, F32: 4, F64: 8, I64: 8, U64: 8,
};
const DTYPES = Object.keys(DTYPE_SIZE) as Dtype[];
/** Writer order (spec §1.2 rule 1): the enum order descending. */
const WRITE_ORDER = [...DTYPES].reverse();

export interface TensorInfo {
  name: string;
  dtype: Dtype;
  shape: number[];
  /** byte offsets relative to the data area (file offset 8 + headerLength + begin); end exclusive */
  begin: number;
  end: number;
}
export interface RawTensor {
  dtype: Dtype;
  shape: number[];
  data: Float32Array | Int32Array;
}
export interface WritableTensor {
  shape: number[];
  data: Float32Array | Int32Array | Uint16Array;
  dtype?: Dtype;
}
/**
 * A tensor whose data is produced only when it is written (`load`, called once, in write order): a writer of many
 * lazy tensors holds one tensor's data at a time, so a model can be saved with one tensor of extra memory.
 */
export interface LazyTensor {
  shape: number[];
  /** the dtype written (Float32Array data is narrowed to F16 / BF16 as for WritableTensor) */
  dtype: Dtype;
  load: () => Promise<Float32Array | Int32Array | Uint16Array>;
}
export interface WriteOptions {
  metadata?: Record<string, string>;
  /** convert every Float32Array tensor without an explicit dtype to this dtype on write */
  floatDtype?: 'F32' | 'F16' | 'BF16';
}

const MAX_HEADER = 100_000_000;
/** Header bounds that keep a hostile file's cost linear and small: SD v1 checkpoints hold ~1,200 tensors and their
 *  headers nest 3 deep (object > entry > shape), so both caps are far above anything real. */
export const MAX_TENSORS = 100_000;
const MAX_DEPTH = 32;
const MAX_IO = 1 << 30;
/** Dtypes a floating-point parameter may be stored as (F8 is float too, but refused as unsupported by `read`). */
const FLOAT_DTYPES: ReadonlySet<Dtype> = new Set(['F32', 'F16', 'BF16', 'F64', 'F8_E5M2', 'F8_E4M3']);
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const fileErr = (file: string, msg: string) => new SdtuneError('file', `${file}: ${msg}`);
const isObj = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
/** A value (or a name) as JSON, cut to a length that keeps a message on one short line. */
function brief(v: unknown): string {
  const s = JSON.stringify(v) ?? String(v);
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

const tooManyTensors = (file: string) =>
  fileErr(file, `header lists more than ${MAX_TENSORS.toLocaleString('en-US')} tensors, the limit of this reader (SD v1 checkpoints have about 1,200)`);

/**
 * One linear pass over the raw header text (strings skipped, so brackets in names do not count) that bounds what
 * JSON.parse and the validation after it will cost: nesting depth (deep nesting overflows the stack of recursive
 * code) and the number of top-level entries. Malformed text is left for JSON.parse to report.
 */
function checkHeaderBounds(file: string, text: string): void {
  let depth = 0;
  let commas = 0; // between top-level entries: tensors + __metadata__ - 1
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22 /* " */) {
      for (i++; i < text.length && text.charCodeAt(i) !== 0x22; i++) if (text.charCodeAt(i) === 0x5c /* \ */) i++;
    } else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      if (++depth > MAX_DEPTH) throw fileErr(file, `header nests deeper than ${MAX_DEPTH} levels (a safetensors header nests 3 deep; not a safetensors file?)`);
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) depth--;
    else if (c === 0x2c /* , */ && depth === 1 && ++commas > MAX_TENSORS) {
      throw tooManyTensors(file);
    }
  }
}

/** Number of elements of `shape`, or undefined when it is not a safe integer. */
function numel(shape: readonly number[]): number | undefined {
  let n = 1;
  for (const d of shape) if (!Number.isSafeInteger((n *= d))) return undefined;
  return n;
}

/** Byte-swap each element in place on big-endian hosts (file data is little-endian); no-op elsewhere. */
function toFromLE(b: Uint8Array, size: number): Uint8Array {
  if (!LITTLE_ENDIAN && size > 1) for (let i = 0; i < b.length; i += size) b.subarray(i, i + size).reverse();
  return b;
}

/**
 * Top-level keys of an already JSON.parse-validated text, in file order, and the first key repeated inside any
 * object (JSON.parse would silently keep the last one; it also reorders integer-like keys, which this does not).
 */
function scanKeys(text: string): { keys: string[]; duplicate?: string } {
  const stack: (Set<string> | null)[] = []; // a Set per open object, null per open array
  const keys: string[] = [];
  let expectKey = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      const top = stack[stack.length - 1];
      if (top && expectKey) {
        const key = JSON.parse(text.slice(i, j + 1)) as string;
        if (top.has(key)) return { keys, duplicate: key };
        top.add(key);
        if (stack.length === 1) keys.push(key);
        expectKey = false;
      }
      i = j;
    } else if (c === '{') (stack.push(new Set()), (expectKey = true));
    else if (c === '[') stack.push(null);
    else if (c === '}' || c === ']') stack.pop();
    else if (c === ',') expectKey = stack[stack.length - 1] != null;
  }
  return { keys };
}

/** Validate a decoded header (spec §1.1) against the data-area length; throws one SdtuneError('file') per file. */
function parseHeader(file: string, bytes: Uint8Array, dataLength: number) {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes);
  } catch {
    throw fileErr(file, 'header is not valid UTF-8');
  }
  checkHeaderBounds(file, text);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw fileErr(file, `header is not valid JSON (${(e as Error).message})`);
  }
  if (!isObj(json)) throw fileErr(file, `header is not a JSON object (got ${Array.isArray(json) ? 'array' : json === null ? 'null' : typeof json})`);
  const { keys, duplicate } = scanKeys(text);
  if (duplicate !== undefined) throw fileErr(file, `header has duplicate key ${brief(duplicate)}`);
  if (keys.length - (keys.includes('__metadata__') ? 1 : 0) > MAX_TENSORS) throw tooManyTensors(file);

  let metadata: Record<string, string> = {};
  const tensors = new Map<string, TensorInfo>();
  for (const name of keys) {
    const v = json[name];
    if (name === '__metadata__') {
      if (!isObj(v)) throw fileErr(file, '__metadata__ is not an object of string values');
      for (const [k, s] of Object.entries(v))
        if (typeof s !== 'string') throw fileErr(file, `__metadata__ value for ${brief(k)} is not a string (got ${brief(s)})`);
      metadata = v as Record<string, string>;
      continue;
    }
    const t = `tensor ${brief(name)}`;
    if (!isObj(v)) throw fileErr(file, `${t} entry is not an object`);
    for (const f of ['dtype', 'shape', 'data_offsets']) if (!(f in v)) throw fileErr(file, `${t} is missing "${f}"`);
    const { dtype, shape, data_offsets: offs } = v;
    if (typeof dtype !== 'string') throw fileErr(file, `${t} dtype is not a string`);
    if (!(DTYPES as string[]).includes(dtype)) throw fileErr(file, `${t} has unsupported dtype ${brief(dtype)} (known: ${DTYPES.join(', ')})`);
    if (!Array.isArray(shape) || !shape.every(isCount)) throw fileErr(file, `${t} shape ${brief(shape)} is not a list of non-negative integers`);
    if (!Array.isArray(offs) || offs.length !== 2 || !offs.every(isCount))
      throw fileErr(file, `${t} data_offsets ${brief(offs)} is not a pair of non-negative integers`);
    const [begin, end] = offs as [number, number];
    if (begin > end) throw fileErr(file, `${t} data_offsets [${begin},${end}] have begin > end`);
    if (end > dataLength) throw fileErr(file, `${t} data_offsets [${begin},${end}] are out of range: the data area has ${dataLength} bytes (truncated file?)`);
    const n = numel(shape);
    const nbytes = n === undefined ? undefined : n * DTYPE_SIZE[dtype as Dtype];
    if (nbytes === undefined || !Number.isSafeInteger(nbytes) || nbytes !== end - begin)
      throw fileErr(file, `${t} data_offsets [${begin},${end}] do not match shape ${brief(shape)} x ${dtype} (${nbytes ?? 'overflowing'} bytes)`);
    tensors.set(name, { name, dtype: dtype as Dtype, shape, begin, end });
  }

  // The ranges must tile the data area exactly: no overlaps, no gaps, nothing left over.
  const sorted = [...tensors.values()].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let pos = 0;
  let prev: TensorInfo | undefined;
  for (const t of sorted) {
    if (t.begin < pos)
      throw fileErr(file, `tensors ${brief(prev!.name)} [${prev!.begin},${prev!.end}] and ${brief(t.name)} [${t.begin},${t.end}] overlap`);
    if (t.begin > pos) throw fileErr(file, `gap in the data area: bytes [${pos},${t.begin}] belong to no tensor`);
    pos = t.end;
    prev = t;
  }
  if (pos !== dataLength) throw fileErr(file, `gap in the data area: bytes [${pos},${dataLength}] at the end belong to no tensor`);
  return { metadata, tensors };
}

/** Read exactly `buf.length` bytes at `position` (positioned, loops over short reads). */
async function readExactly(fh: FileHandle, buf: Uint8Array, position: number, file: string): Promise<void> {
  for (let off = 0; off < buf.length; ) {
    const { bytesRead } = await fh.read(buf, off, Math.min(buf.length - off, MAX_IO), position + off);
    if (bytesRead === 0) throw fileErr(file, `unexpected end of file at byte ${position + off} (file truncated?)`);
    off += bytesRead;
  }
}

/** Decode little-endian bytes (in a fresh, hence aligned, ArrayBuffer) of one tensor to Float32Array/Int32Array. */
function decode(file: string, name: string, dtype: Dtype, b: Uint8Array): Float32Array | Int32Array {
  const buf = toFromLE(b, DTYPE_SIZE[dtype]).buffer as ArrayBuffer;
  const tooBig = () => new SdtuneError('unsupported', `${file}: tensor "${name}" (${dtype}) has values outside the int32 range`);
  switch (dtype) {
    case 'F32': return new Float32Array(buf);
    case 'F16': return f16BitsToF32(new Uint16Array(buf));
    case 'BF16': return bf16BitsToF32(new Uint16Array(buf));
    case 'F64': return Float32Array.from(new Float64Array(buf));
    case 'I32': return new Int32Array(buf);
    case 'I16': return Int32Array.from(new Int16Array(buf));
    case 'U16': return Int32Array.from(new Uint16Array(buf));
    case 'I8': return Int32Array.from(new Int8Array(buf));
    case 'U8': case 'BOOL': return Int32Array.from(b);
    case 'U32': {
      const out = new Int32Array(buf);
      if (out.some((x) => x < 0)) throw tooBig();
      return out;
    }
    case 'I64': case 'U64': {
      const w = new Int32Array(buf); // (lo, hi) word pairs; in range iff hi is the sign extension of lo
      const out = new Int32Array(w.length / 2);
      const L = LITTLE_ENDIAN ? 0 : 1;
      for (let i = 0; i < out.length; i++) {
        const lo = w[2 * i + L], hi = w[2 * i + 1 - L];
        if (hi !== (lo < 0 ? -1 : 0) || (dtype === 'U64' && lo < 0)) throw tooBig();
        out[i] = lo;
      }
      return out;
    }
    default: throw new SdtuneError('unsupported', `${file}: tensor "${name}" has unsupported dtype ${dtype}`);
  }
}

/** An open safetensors file: header validated at open, tensors read one at a time with positioned reads. */
export class SafetensorsFile {
  private closed = false;
  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    readonly headerLength: number,
    readonly metadata: Record<string, string>,
    readonly tensors: ReadonlyMap<string, TensorInfo>,
  ) {}

  /** Open and validate the header (8 + N bytes only); the handle stays open for `read` until `close`. */
  static async open(path: string): Promise<SafetensorsFile> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (e) {
      throw fileErr(path, `cannot open (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw fileErr(path, 'not a regular file');
      if (st.size < 8) throw fileErr(path, `file too short (${st.size} bytes) to be a safetensors file (truncated?)`);
      const head = new Uint8Array(8);
      await readExactly(fh, head, 0, path);
      const n = new DataView(head.buffer).getBigUint64(0, true);
      if (n > BigInt(MAX_HEADER)) throw fileErr(path, `header length ${n} exceeds the ${MAX_HEADER.toLocaleString('en-US')} byte limit (not a safetensors file?)`);
      const len = Number(n);
      if (8 + len > st.size) throw fileErr(path, `header length ${len} exceeds the file size ${st.size} (truncated file?)`);
      const hdr = new Uint8Array(len);
      await readExactly(fh, hdr, 8, path);
      const { metadata, tensors } = parseHeader(path, hdr, st.size - 8 - len);
      return new SafetensorsFile(fh, path, len, metadata, tensors);
    } catch (e) {
      await fh.close().catch(() => {});
      throw e;
    }
  }

  /** Tensor names in header order. */
  keys(): string[] {
    return [...this.tensors.keys()];
  }
  /** Whether the file holds a tensor called `name`. */
  has(name: string): boolean {
    return this.tensors.has(name);
  }
  /** Header entry of one tensor; throws naming the file and key when missing. */
  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new SdtuneError('format', `${this.path}: no tensor "${name}" (${this.tensors.size} tensors in file)`);
    return t;
  }
  /** Read one tensor (just its bytes) and widen it to Float32Array / Int32Array. */
  async read(name: string): Promise<RawTensor> {
    const t = this.info(name);
    if (this.closed) throw fileErr(this.path, `read of "${name}" after close`);
    if (t.dtype.startsWith('F8')) throw new SdtuneError('unsupported', `${this.path}: tensor "${name}" has unsupported dtype ${t.dtype}`);
    const bytes = new Uint8Array(t.end - t.begin);
    await readExactly(this.fh, bytes, 8 + this.headerLength + t.begin, this.path);
    return { dtype: t.dtype, shape: [...t.shape], data: decode(this.path, name, t.dtype, bytes) };
  }
  /**
   * Read a tensor that must hold floating-point values (model weights, LoRA factors, embedding vectors): an integer
   * dtype is refused naming the file and key, never reinterpreted (a float tensor relabelled I32 would load as noise).
   */
  async readFloat(name: string): Promise<RawTensor & { data: Float32Array }> {
    const t = this.info(name);
    if (!FLOAT_DTYPES.has(t.dtype)) {
      throw new SdtuneError('format', `${this.path}: tensor ${brief(name)} has dtype ${t.dtype}, expected a floating-point dtype (F32, F16, BF16 or F64)`);
    }
    return (await this.read(name)) as RawTensor & { data: Float32Array };
  }
  /** Read every tensor, one at a time (for small files). */
  async readAll(): Promise<Map<string, RawTensor>> {
    const out = new Map<string, RawTensor>();
    for (const k of this.tensors.keys()) out.set(k, await this.read(k));
    return out;
  }
  /** Close the file handle (idempotent). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }
}

/** Read and validate only the header of a file (opens, validates, closes). */
export async function readSafetensorsHeader(
  path: string,
): Promise<{ metadata: Record<string, string>; tensors: Map<string, TensorInfo>; headerLength: number }> {
  const f = await SafetensorsFile.open(path);
  await f.close();
  return { metadata: f.metadata, tensors: new Map(f.tensors), headerLength: f.headerLength };
}

/** Integer dtypes an Int32Array may be written as, with the value range each can hold. */
const INT_RANGE: Partial<Record<Dtype, [number, number]>> = {
  I64: [-(2 ** 31), 2 ** 31 - 1], I32: [-(2 ** 31), 2 ** 31 - 1], U32: [0, 2 ** 31 - 1], I16: [-32768, 32767], U16: [0, 65535], I8: [-128, 127], U8: [0, 255], BOOL: [0, 1],
};

/** Little-endian bytes of one tensor in `dtype` (a view of the caller's data when no conversion is needed). */
function encode(name: string, data: WritableTensor['data'], dtype: Dtype): Uint8Array {
  const bad = () => new SdtuneError('format', `cannot write tensor "${name}" (${data.constructor.name}) as ${dtype}`);
  let out: ArrayBufferView;
  if (data instanceof Float32Array) {
    if (dtype === 'F32') out = data;
    else if (dtype === 'F16') out = f32ToF16Bits(data);
    else if (dtype === 'BF16') out = f32ToBf16Bits(data);
    else if (dtype === 'F64') out = Float64Array.from(data);
    else throw bad();
  } else if (data instanceof Uint16Array) {
    if (dtype !== 'F16' && dtype !== 'BF16' && dtype !== 'U16') throw bad();
    out = data;
  } else {
    const range = INT_RANGE[dtype];
    if (!range) throw bad();
    const i = data.findIndex((x) => x < range[0] || x > range[1]);
    if (i >= 0) throw new SdtuneError('format', `tensor "${name}" value ${data[i]} at index ${i} does not fit in ${dtype}`);
    if (dtype === 'I32') out = data;
    else if (dtype === 'U32') out = new Uint32Array(data.buffer, data.byteOffset, data.length);
    else if (dtype === 'I64') out = BigInt64Array.from(data, (x) => BigInt(x));
    else out = ({ I16: Int16Array, U16: Uint16Array, I8: Int8Array, U8: Uint8Array, BOOL: Uint8Array } as const)[dtype as 'I8'].from(data);
  }
  const bytes = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
  return LITTLE_ENDIAN ? bytes : toFromLE(bytes.slice(), DTYPE_SIZE[dtype]);
}

/** Write tensors as safetensors following the reference writer rules, atomically and one tensor at a time. */
export async function writeSafetensors(
  path: string,
  tensors: Map<string, WritableTensor | LazyTensor> | Record<string, WritableTensor | LazyTensor>,
  opts: WriteOptions = {},
): Promise<void> {
  const entries = (tensors instanceof Map ? [...tensors] : Object.entries(tensors)).map(([name, t]) => {
    if ('load' in t) {
      if (!(t.dtype in DTYPE_SIZE)) throw new SdtuneError('format', `${path}: tensor "${name}" has unknown dtype ${t.dtype}`);
      if (!Array.isArray(t.shape) || !t.shape.every(isCount)) throw new SdtuneError('format', `${path}: tensor "${name}" has invalid shape ${JSON.stringify(t.shape)}`);
      const n = numel(t.shape);
      if (n === undefined) throw new SdtuneError('format', `${path}: tensor "${name}" shape ${fmtShape(t.shape)} is too large`);
      return { name, t, dtype: t.dtype, n, key: Buffer.from(name, 'utf8') };
    }
    const dtype = t.dtype ?? (t.data instanceof Float32Array ? (opts.floatDtype ?? 'F32') : t.data instanceof Int32Array ? 'I32' : undefined);
    if (!dtype) throw new SdtuneError('format', `${path}: tensor "${name}" is a Uint16Array and needs dtype F16, BF16 or U16`);
    if (!(dtype in DTYPE_SIZE)) throw new SdtuneError('format', `${path}: tensor "${name}" has unknown dtype ${dtype}`);
    if (name === '__metadata__') throw new SdtuneError('format', `${path}: "__metadata__" cannot be a tensor name`);
    if (!Array.isArray(t.shape) || !t.shape.every(isCount)) throw new SdtuneError('format', `${path}: tensor "${name}" has invalid shape ${JSON.stringify(t.shape)}`);
    if (numel(t.shape) !== t.data.length)
      throw new SdtuneError('format', `${path}: tensor "${name}" shape ${fmtShape(t.shape)} x ${dtype} needs ${numel(t.shape)} elements but data has ${t.data.length}`);
    return { name, t, dtype, n: t.data.length, key: Buffer.from(name, 'utf8') };
  });
  entries.sort((a, b) => WRITE_ORDER.indexOf(a.dtype) - WRITE_ORDER.indexOf(b.dtype) || Buffer.compare(a.key, b.key));

  const parts: string[] = [];
  if (opts.metadata !== undefined) {
    const md = Object.entries(opts.metadata).map(([k, v]) => {
      if (typeof v !== 'string') throw new SdtuneError('format', `${path}: metadata value for "${k}" must be a string (got ${typeof v})`);
      return `${JSON.stringify(k)}:${JSON.stringify(v)}`;
    });
    parts.push(`"__metadata__":{${md.join(',')}}`);
  }
  let offset = 0;
  for (const e of entries) {
    const end = offset + e.n * DTYPE_SIZE[e.dtype];
    parts.push(`${JSON.stringify(e.name)}:{"dtype":"${e.dtype}","shape":${JSON.stringify(e.t.shape)},"data_offsets":[${offset},${end}]}`);
    offset = end;
  }
  let header = Buffer.from(`{${parts.join(',')}}`, 'utf8');
  header = Buffer.concat([header, Buffer.alloc((8 - (header.length % 8)) % 8, 0x20)]);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(header.length));

  await withAtomicFile(path, async (fh) => {
    await writeAll(fh, Buffer.concat([prefix, header]));
    for (const e of entries) {
      const data = 'load' in e.t ? await e.t.load() : e.t.data;
      if (data.length !== e.n) throw new SdtuneError('format', `${path}: tensor "${e.name}" shape ${fmtShape(e.t.shape)} needs ${e.n} elements but its data has ${data.length}`);
      await writeAll(fh, encode(e.name, data, e.dtype));
    }
  });
}

let F16_TABLE: Uint32Array | undefined;
/** The 65536 float32 bit patterns of every half-precision pattern (spec §1.4), built once on first use. */
function f16Table(): Uint32Array {
  if (F16_TABLE) return F16_TABLE;
  const tab = new Uint32Array(65536);
  const f = new Float32Array(1), fb = new Uint32Array(f.buffer);
  for (let h = 0; h < 65536; h++) {
    const s = (h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e === 0) {
      f[0] = m * 2 ** -24;
      tab[h] = (fb[0] | s) >>> 0;
    } else if (e === 31) tab[h] = (s | 0x7f800000 | (m << 13)) >>> 0;
    else tab[h] = (s | ((e - 15 + 127) << 23) | (m << 13)) >>> 0;
  }
  return (F16_TABLE = tab);
}

/** Widen half-precision bit patterns to float32 exactly (lookup table; NaN payloads kept). */
export function f16BitsToF32(bits: Uint16Array): Float32Array {
  const tab = f16Table();
  const out = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = tab[bits[i]];
  return new Float32Array(out.buffer);
}

/** Round float32 values to half-precision bit patterns (round-to-nearest-even, overflow to Inf, NaN -> 0x7E00|sign). */
export function f32ToF16Bits(x: Float32Array): Uint16Array {
  const src = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const b = src[i];
    const s = (b >>> 16) & 0x8000, e = (b >>> 23) & 0xff, m = b & 0x7fffff;
    const he = e - 112; // rebias 127 -> 15
    let r: number;
    if (e === 0xff) r = m ? 0x7e00 : 0x7c00;
    else if (he >= 31) r = 0x7c00;
    else if (he < -10) r = 0; // |x| < 2^-25
    else {
      // normal: drop 13 bits; subnormal: shift the 24-bit significand right by 14 - he; then round half to even
      const shift = he > 0 ? 13 : 14 - he;
      const sig = he > 0 ? m : m | 0x800000;
      r = sig >>> shift;
      const rem = sig & ((1 << shift) - 1), half = 1 << (shift - 1);
      if (he > 0) r |= he << 10;
      if (rem > half || (rem === half && r & 1)) r++; // a carry may roll into the exponent (up to Inf): correct
    }
    out[i] = s | r;
  }
  return out;
}

/** Widen bfloat16 bit patterns to float32 exactly (they are the top half of a float32). */
export function bf16BitsToF32(bits: Uint16Array): Float32Array {
  const out = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = bits[i] << 16;
  return new Float32Array(out.buffer);
}

/** Round float32 values to bfloat16 bit patterns (round-to-nearest-even; NaN -> 0x7FC0). */
export function f32ToBf16Bits(x: Float32Array): Uint16Array {
  const src = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const b = src[i];
    out[i] = (b & 0x7fffffff) > 0x7f800000 ? 0x7fc0 : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return out;
}
