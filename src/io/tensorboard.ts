/**
 * TensorBoard event files written without TensorFlow (spec tensorboard-events.md): TFRecord framing with masked
 * CRC-32C, hand-encoded `Event` / `Summary` protobufs (legacy `simple_value` scalars as tfjs-node's summaryFileWriter
 * writes them, `Summary.Image` PNGs, `HistogramProto`, text-plugin tensors), and a verifying reader for tests/tools.
 */
import { mkdir, open, readFile, type FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { SdtuneError, usageError } from '../errors.js';
import { writeAll } from '../runtime/atomic.js';

// ---------------------------------------------------------------------------------------------------------------
// CRC-32C and record framing (spec §2)

const CRC32C_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32C (Castagnoli, reflected poly 0x82F63B78), table-driven: the checksum TFRecord framing uses. */
export function crc32c(data: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < data.length; i++) c = CRC32C_TABLE[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** TFRecord's masked CRC (rotate right 15, add 0xA282EAD8, mod 2^32), as stored after the length and the data. */
export function maskedCrc32c(data: Uint8Array): number {
  const crc = crc32c(data);
  return (((crc >>> 15) | (crc << 17)) + 0xa282ead8) >>> 0;
}

/** One TFRecord: u64 length, masked CRC of the length bytes, data, masked CRC of the data (all little-endian). */
export function frameRecord(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length + 4);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, BigInt(data.length), true);
  dv.setUint32(8, maskedCrc32c(out.subarray(0, 8)), true);
  out.set(data, 12);
  dv.setUint32(12 + data.length, maskedCrc32c(data), true);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Protobuf encoding (spec §4, §5)

const utf8 = new TextEncoder();
const WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5;

/** Minimal protobuf writer: fields are appended in call order (callers emit them in field-number order). */
class PbWriter {
  private parts: Uint8Array[] = [];
  private len = 0;

  private push(b: Uint8Array): this {
    this.parts.push(b);
    this.len += b.length;
    return this;
  }
  private key(field: number, wt: number): this {
    return this.rawVarint((field << 3) | wt);
  }
  private rawVarint(v: number | bigint): this {
    let x = BigInt.asUintN(64, BigInt(v)); // negative int64 -> 10-byte two's complement
    const out: number[] = [];
    while (x >= 0x80n) {
      out.push(Number(x & 0x7fn) | 0x80);
      x >>= 7n;
    }
    out.push(Number(x));
    return this.push(Uint8Array.from(out));
  }
  varint(field: number, v: number | bigint): this {
    return this.key(field, WT_VARINT).rawVarint(v);
  }
  double(field: number, v: number): this {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setFloat64(0, v, true);
    return this.key(field, WT_I64).push(b);
  }
  float(field: number, v: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, v, true);
    return this.key(field, WT_I32).push(b);
  }
  bytes(field: number, b: Uint8Array): this {
    return this.key(field, WT_LEN).rawVarint(b.length).push(b);
  }
  string(field: number, s: string): this {
    return this.bytes(field, utf8.encode(s));
  }
  message(field: number, m: PbWriter): this {
    return this.bytes(field, m.finish());
  }
  packedDoubles(field: number, vs: ArrayLike<number>): this {
    const b = new Uint8Array(8 * vs.length);
    const dv = new DataView(b.buffer);
    for (let i = 0; i < vs.length; i++) dv.setFloat64(8 * i, vs[i], true);
    return this.bytes(field, b);
  }
  finish(): Uint8Array {
    const out = new Uint8Array(this.len);
    let off = 0;
    for (const p of this.parts) {
      out.set(p, off);
      off += p.length;
    }
    return out;
  }
}

/** `HistogramProto` contents (spec §4.2): bucket i covers (bucketLimit[i-1], bucketLimit[i]], bucket[i] is its count. */
export interface Histogram {
  min: number;
  max: number;
  num: number;
  sum: number;
  sumSquares: number;
  bucketLimit: number[];
  bucket: number[];
}

/** One `Summary.Value` to encode: exactly one of simpleValue / image / histogram / text. */
export interface SummaryValueInput {
  tag: string;
  simpleValue?: number;
  image?: { height: number; width: number; colorspace: number; png: Uint8Array };
  histogram?: Histogram;
  text?: string;
}

/** An `Event` to encode: a file_version record or a summary at a step. */
export interface EventInput {
  wallTime: number;
  step?: number;
  fileVersion?: string;
  values?: SummaryValueInput[];
  /** SessionLog status (1 = START: TensorBoard drops the events of this run at steps >= this event's step) */
  sessionStatus?: number;
}

function encodeValue(v: SummaryValueInput): PbWriter {
  const w = new PbWriter().string(1, v.tag);
  // simple_value is a oneof member: written even when 0 (proto3 keeps set oneof fields), else the value has no type.
  if (v.simpleValue !== undefined) w.float(2, v.simpleValue);
  else if (v.image) {
    const im = new PbWriter().varint(1, v.image.height).varint(2, v.image.width).varint(3, v.image.colorspace);
    w.message(4, im.bytes(4, v.image.png));
  } else if (v.histogram) {
    const h = v.histogram, hw = new PbWriter();
    // proto3: plain (non-oneof) scalars equal to 0 are omitted, as protobuf serializers do
    if (h.min !== 0) hw.double(1, h.min);
    if (h.max !== 0) hw.double(2, h.max);
    if (h.num !== 0) hw.double(3, h.num);
    if (h.sum !== 0) hw.double(4, h.sum);
    if (h.sumSquares !== 0) hw.double(5, h.sumSquares);
    if (h.bucketLimit.length) hw.packedDoubles(6, h.bucketLimit);
    if (h.bucket.length) hw.packedDoubles(7, h.bucket);
    w.message(5, hw);
  } else if (v.text !== undefined) {
    // text has no legacy field (spec §8): TensorProto{dtype DT_STRING, shape {} (scalar), string_val} + plugin "text"
    const tensor = new PbWriter().varint(1, 7).bytes(2, new Uint8Array(0)).string(8, v.text);
    w.message(8, tensor);
    w.message(9, new PbWriter().message(1, new PbWriter().string(1, 'text')));
  }
  return w;
}

/** Serialized `Event` protobuf (spec §4.1), canonical proto3 form: step 0 omitted, oneof members always written. */
export function encodeEvent(ev: EventInput): Uint8Array {
  const w = new PbWriter().double(1, ev.wallTime);
  if (ev.step !== undefined && ev.step !== 0) w.varint(2, BigInt(ev.step));
  if (ev.fileVersion !== undefined) w.string(3, ev.fileVersion);
  else if (ev.sessionStatus !== undefined) w.message(7, new PbWriter().varint(1, ev.sessionStatus));
  else if (ev.values) {
    const s = new PbWriter();
    for (const v of ev.values) s.message(1, encodeValue(v));
    w.message(5, s);
  }
  return w.finish();
}

/** Equal-width histogram of the finite values (spec §8; NaN/±Inf are skipped): `bins` buckets between min and max. */
export function histogramOf(values: ArrayLike<number>, bins = 30): Histogram {
  let min = Infinity, max = -Infinity, num = 0, sum = 0, sumSquares = 0;
  for (let i = 0; i < values.length; i++) {
    const x = values[i];
    if (!Number.isFinite(x)) continue;
    if (x < min) min = x;
    if (x > max) max = x;
    num++;
    sum += x;
    sumSquares += x * x;
  }
  if (num === 0) return { min: 0, max: 0, num: 0, sum: 0, sumSquares: 0, bucketLimit: [0], bucket: [0] };
  if (min === max) return { min, max, num, sum, sumSquares, bucketLimit: [max], bucket: [num] };
  const k = Math.max(1, Math.floor(bins)), width = (max - min) / k;
  const bucketLimit = Array.from({ length: k }, (_, i) => (i === k - 1 ? max : min + (i + 1) * width));
  const bucket = new Array<number>(k).fill(0);
  for (let i = 0; i < values.length; i++) {
    const x = values[i];
    if (!Number.isFinite(x)) continue;
    // bucket i is (limit[i-1], limit[i]]: ceil, then clamp (x == min goes to bucket 0)
    let b = Math.ceil((x - min) / width) - 1;
    if (b < 0) b = 0;
    if (b > k - 1) b = k - 1;
    while (b > 0 && x <= bucketLimit[b - 1]) b--; // float rounding at the edges
    while (b < k - 1 && x > bucketLimit[b]) b++;
    bucket[b]++;
  }
  return { min, max, num, sum, sumSquares, bucketLimit, bucket };
}

// ---------------------------------------------------------------------------------------------------------------
// Writer

const FILE_VERSION = 'brain.Event:2';
const DEFAULT_FLUSH_MS = 5_000;
const AUTO_FLUSH_BYTES = 4 << 20; // flush early once this much is queued (images)
let fileCounter = 0; // per-process, for several writers started in the same second (spec §1)

function checkTag(tag: string): void {
  if (typeof tag !== 'string' || tag.length === 0) throw usageError(`TensorBoard tag must be a non-empty string, got ${JSON.stringify(tag)}`);
}

function checkStep(step: number): void {
  if (!Number.isSafeInteger(step)) throw usageError(`TensorBoard step must be an integer, got ${step}`);
}

/** PNG colour type (IHDR byte 25) -> Summary.Image colorspace. */
const PNG_COLORSPACE: Record<number, number> = { 0: 1, 4: 2, 2: 3, 6: 4, 3: 3 };
const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** Width, height and colorspace from a PNG's IHDR chunk; usage error when the bytes are not a PNG. */
function pngInfo(png: Uint8Array): { width: number; height: number; colorspace: number } {
  const ok = png.length >= 33 && PNG_SIGNATURE.every((b, i) => png[i] === b) && String.fromCharCode(...png.subarray(12, 16)) === 'IHDR';
  if (!ok) throw usageError('TensorBoard image: png bytes are not a PNG file');
  const dv = new DataView(png.buffer, png.byteOffset, png.byteLength);
  return { width: dv.getUint32(16), height: dv.getUint32(20), colorspace: PNG_COLORSPACE[png[25]] ?? 3 };
}

/**
 * Appends TensorBoard events to a new `events.out.tfevents.*` file in a run directory. Events are queued as whole
 * TFRecords and written by one append per flush (timer, size or explicit), then fsync'ed, so a crash leaves only
 * complete records on disk (at worst the last, partially written append is lost, which TensorBoard tolerates).
 */
export class TensorBoardWriter {
  private queue: Uint8Array[] = [];
  private queuedBytes = 0;
  private chain: Promise<void> = Promise.resolve(); // serializes appends
  private pendingImages = new Set<Promise<unknown>>();
  private timer: NodeJS.Timeout | undefined;
  private closing: Promise<void> | undefined;
  private failure: SdtuneError | undefined;

  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    flushEveryMs: number,
  ) {
    if (flushEveryMs > 0) {
      this.timer = setInterval(() => void this.flush().catch(() => {}), flushEveryMs); // failure kept in this.failure
      this.timer.unref();
    }
  }

  /** Creates logdir (recursively) and a new events.out.tfevents.<10-digit secs>.<hostname>.<pid>.<n> file; writes and fsyncs the file_version record. */
  static async create(logdir: string, opts: { flushEveryMs?: number } = {}): Promise<TensorBoardWriter> {
    const flushEveryMs = opts.flushEveryMs ?? DEFAULT_FLUSH_MS;
    if (!(flushEveryMs >= 0)) throw usageError(`flushEveryMs must be >= 0, got ${flushEveryMs}`);
    try {
      await mkdir(logdir, { recursive: true });
    } catch (e) {
      throw new SdtuneError('file', `cannot create TensorBoard log directory ${logdir}: ${(e as Error).message}`);
    }
    const now = Date.now() / 1000;
    const secs = String(Math.floor(now)).padStart(10, '0');
    const host = hostname().replace(/[/\\]/g, '_') || 'localhost';
    for (let tries = 0; ; tries++) {
      const file = path.join(logdir, `events.out.tfevents.${secs}.${host}.${process.pid}.${fileCounter++}`);
      let fh: FileHandle;
      try {
        fh = await open(file, 'ax'); // never append to (or clobber) an existing event file
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EEXIST' && tries < 1000) continue;
        throw new SdtuneError('file', `cannot create TensorBoard event file ${file}: ${(e as Error).message}`);
      }
      const w = new TensorBoardWriter(fh, file, flushEveryMs);
      w.enqueue({ wallTime: now, fileVersion: FILE_VERSION });
      try {
        await w.flush();
      } catch (e) {
        await w.close().catch(() => {});
        throw e;
      }
      return w;
    }
  }

  private checkOpen(): void {
    if (this.closing) throw usageError(`TensorBoard writer ${this.path} is closed`);
  }

  private enqueue(ev: EventInput): void {
    const rec = frameRecord(encodeEvent(ev));
    this.queue.push(rec);
    this.queuedBytes += rec.length;
    if (this.queuedBytes >= AUTO_FLUSH_BYTES) void this.flushQueued().catch(() => {});
  }

  /**
   * Mark a (re)start at `step`: a SessionLog START event, on which TensorBoard purges the events of this run at steps
   * >= `step` (spec §1), so a resumed run replaces what was logged after its checkpoint instead of drawing a second,
   * overlapping curve.
   */
  sessionStart(step: number, wallTimeSec = Date.now() / 1000): void {
    this.checkOpen();
    checkStep(step);
    this.enqueue({ wallTime: wallTimeSec, step, sessionStatus: 1 });
  }

  /** Queue a scalar (legacy `simple_value` float32, exactly as tfjs-node's summaryFileWriter writes it). */
  scalar(tag: string, value: number, step: number, wallTimeSec?: number): void {
    this.scalars({ [tag]: value }, step, wallTimeSec);
  }

  /** Queue several scalars at one step as one Event (one `Summary` with a `Value` per tag). */
  scalars(values: Record<string, number>, step: number, wallTimeSec = Date.now() / 1000): void {
    this.checkOpen();
    checkStep(step);
    const vs = Object.entries(values).map(([tag, v]) => {
      checkTag(tag);
      if (typeof v !== 'number') throw usageError(`TensorBoard scalar ${tag} must be a number, got ${typeof v}`);
      return { tag, simpleValue: v };
    });
    if (vs.length) this.enqueue({ wallTime: wallTimeSec, step, values: vs });
  }

  /**
   * Queue a PNG image summary: raw uint8 HxWxC pixels (C = 3 RGB; 1, 2, 4 also accepted) are encoded with sharp,
   * already-encoded PNG bytes are used as is (their IHDR must match width/height).
   */
  async image(
    tag: string,
    img: { data: Uint8Array; width: number; height: number } | { png: Uint8Array; width: number; height: number },
    step: number,
  ): Promise<void> {
    this.checkOpen();
    checkTag(tag);
    checkStep(step);
    const { width, height } = img;
    if (!(Number.isInteger(width) && width > 0 && Number.isInteger(height) && height > 0)) {
      throw usageError(`TensorBoard image ${tag}: bad size ${width}x${height}`);
    }
    const wallTime = Date.now() / 1000;
    if ('png' in img) {
      const info = pngInfo(img.png);
      if (info.width !== width || info.height !== height) {
        throw usageError(`TensorBoard image ${tag}: PNG is ${info.width}x${info.height}, caller said ${width}x${height}`);
      }
      this.enqueue({ wallTime, step, values: [{ tag, image: { height, width, colorspace: info.colorspace, png: img.png } }] });
      return;
    }
    const channels = img.data.length / (width * height);
    if (![1, 2, 3, 4].includes(channels)) {
      throw usageError(`TensorBoard image ${tag}: ${img.data.length} bytes is not ${height}x${width}x3 (or x1/x2/x4) uint8`);
    }
    // the whole encode-then-queue step is tracked so flush()/close() wait for it
    const op = (async () => {
      const png = await sharp(Buffer.from(img.data.buffer, img.data.byteOffset, img.data.byteLength), {
        raw: { width, height, channels: channels as 1 | 2 | 3 | 4 },
      }).png().toBuffer();
      this.enqueue({ wallTime, step, values: [{ tag, image: { height, width, colorspace: channels, png: new Uint8Array(png) } }] });
    })();
    this.pendingImages.add(op);
    try {
      await op;
    } finally {
      this.pendingImages.delete(op);
    }
  }

  /** Queue a histogram (HistogramProto, `bins` equal-width buckets over the finite values). */
  histogram(tag: string, values: ArrayLike<number>, step: number, bins = 30): void {
    this.checkOpen();
    checkTag(tag);
    checkStep(step);
    this.enqueue({ wallTime: Date.now() / 1000, step, values: [{ tag, histogram: histogramOf(values, bins) }] });
  }

  /** Queue a text summary (text-plugin string tensor, spec §8), e.g. the prompt behind a sample image. */
  text(tag: string, text: string, step: number): void {
    this.checkOpen();
    checkTag(tag);
    checkStep(step);
    this.enqueue({ wallTime: Date.now() / 1000, step, values: [{ tag, text }] });
  }

  /** Append all queued records in one write (whole records only) and fsync; serialized through `chain`. */
  private flushQueued(): Promise<void> {
    const run = async () => {
      if (this.failure) throw this.failure;
      if (this.queue.length === 0) return;
      const recs = this.queue;
      this.queue = [];
      this.queuedBytes = 0;
      const buf = recs.length === 1 ? recs[0] : Buffer.concat(recs);
      try {
        await writeAll(this.fh, buf);
        await this.fh.sync();
      } catch (e) {
        this.failure = new SdtuneError('file', `cannot write TensorBoard event file ${this.path}: ${(e as Error).message}`);
        throw this.failure;
      }
    };
    this.chain = this.chain.then(run, run);
    return this.chain;
  }

  /** Write everything queued so far (waiting for images being encoded) and fsync; a no-op once closed. */
  async flush(): Promise<void> {
    if (this.closing) return this.closing;
    await this.flushInternal();
  }

  private async flushInternal(): Promise<void> {
    if (this.pendingImages.size) await Promise.allSettled([...this.pendingImages]);
    await this.flushQueued();
  }

  /** Flush and close the file; idempotent (later calls return the same promise), later writes throw. */
  close(): Promise<void> {
    if (!this.closing) {
      if (this.timer) clearInterval(this.timer);
      this.timer = undefined;
      this.closing = (async () => {
        try {
          await this.flushInternal();
        } finally {
          await this.fh.close();
        }
      })();
    }
    return this.closing;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Reader

/** A decoded `Summary.Value` (fields this project writes; other kinds come back with just the tag). */
export interface EventValue {
  tag: string;
  simpleValue?: number;
  image?: { height: number; width: number; colorspace: number; png: Uint8Array };
  histogram?: Histogram;
  /** first string of a DT_STRING tensor (text plugin) */
  text?: string;
  pluginName?: string;
}

/** A decoded `Event`: file_version record or summary (other kinds: wall time and step only). */
export interface EventRecord {
  wallTime: number;
  step: number;
  fileVersion?: string;
  values?: EventValue[];
  /** SessionLog status: 1 START, 2 STOP, 3 CHECKPOINT */
  sessionStatus?: number;
}

const utf8Dec = new TextDecoder();

/** Minimal protobuf reader over one message; throws plain Errors that the caller wraps with file/record context. */
class PbReader {
  private pos: number;
  private dv: DataView;
  constructor(
    private readonly buf: Uint8Array,
    start = 0,
    private readonly end = buf.length,
  ) {
    this.pos = start;
    this.dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  get done(): boolean {
    return this.pos >= this.end;
  }
  private need(n: number): void {
    if (this.pos + n > this.end) throw new Error(`message truncated at byte ${this.pos}`);
  }
  varint(): bigint {
    let r = 0n;
    for (let shift = 0n; shift < 70n; shift += 7n) {
      this.need(1);
      const b = this.buf[this.pos++];
      r |= BigInt(b & 0x7f) << shift;
      if (!(b & 0x80)) return BigInt.asUintN(64, r);
    }
    throw new Error('varint longer than 10 bytes');
  }
  key(): { field: number; wt: number } {
    const k = Number(this.varint());
    return { field: k >>> 3, wt: k & 7 };
  }
  int(): number {
    return Number(BigInt.asIntN(64, this.varint()));
  }
  double(): number {
    this.need(8);
    const v = this.dv.getFloat64(this.pos, true);
    this.pos += 8;
    return v;
  }
  float(): number {
    this.need(4);
    const v = this.dv.getFloat32(this.pos, true);
    this.pos += 4;
    return v;
  }
  /** Sub-range [start, end) of a length-delimited field. */
  lenRange(): [number, number] {
    const n = Number(this.varint());
    this.need(n);
    const s = this.pos;
    this.pos += n;
    return [s, s + n];
  }
  bytes(): Uint8Array {
    const [s, e] = this.lenRange();
    return this.buf.slice(s, e);
  }
  string(): string {
    const [s, e] = this.lenRange();
    return utf8Dec.decode(this.buf.subarray(s, e));
  }
  sub(): PbReader {
    const [s, e] = this.lenRange();
    return new PbReader(this.buf, s, e);
  }
  skip(wt: number): void {
    if (wt === WT_VARINT) this.varint();
    else if (wt === WT_LEN) this.lenRange();
    else if (wt === WT_I64 || wt === WT_I32) {
      const n = wt === WT_I64 ? 8 : 4;
      this.need(n);
      this.pos += n;
    } else throw new Error(`unsupported wire type ${wt} at byte ${this.pos}`);
  }
  /** Fail unless a known field has the wire type its schema gives. */
  expect(field: number, wt: number, expected: number): void {
    if (wt !== expected) throw new Error(`field ${field} has wire type ${wt}, expected ${expected}`);
  }
  /** Repeated double, packed (wire type 2) or not (wire type 1). */
  doubles(wt: number, into: number[]): void {
    if (wt === WT_I64) into.push(this.double());
    else if (wt === WT_LEN) {
      const r = this.sub();
      while (!r.done) into.push(r.double());
    } else throw new Error(`repeated double with wire type ${wt}`);
  }
}

function decodeImage(r: PbReader): NonNullable<EventValue['image']> {
  const im: NonNullable<EventValue['image']> = { height: 0, width: 0, colorspace: 0, png: new Uint8Array(0) };
  while (!r.done) {
    const { field, wt } = r.key();
    if (field >= 1 && field <= 3) {
      r.expect(field, wt, WT_VARINT);
      const v = r.int();
      if (field === 1) im.height = v;
      else if (field === 2) im.width = v;
      else im.colorspace = v;
    } else if (field === 4) {
      r.expect(field, wt, WT_LEN);
      im.png = r.bytes();
    } else r.skip(wt);
  }
  return im;
}

function decodeHistogram(r: PbReader): Histogram {
  const h: Histogram = { min: 0, max: 0, num: 0, sum: 0, sumSquares: 0, bucketLimit: [], bucket: [] };
  const names = ['min', 'max', 'num', 'sum', 'sumSquares'] as const;
  while (!r.done) {
    const { field, wt } = r.key();
    if (field >= 1 && field <= 5) {
      r.expect(field, wt, WT_I64);
      h[names[field - 1]] = r.double();
    } else if (field === 6) r.doubles(wt, h.bucketLimit);
    else if (field === 7) r.doubles(wt, h.bucket);
    else r.skip(wt);
  }
  return h;
}

/** TensorProto: the first string_val of a DT_STRING tensor, if any. */
function decodeTensorText(r: PbReader): string | undefined {
  let dtype = 0;
  let first: string | undefined;
  while (!r.done) {
    const { field, wt } = r.key();
    if (field === 1 && wt === WT_VARINT) dtype = r.int();
    else if (field === 8 && wt === WT_LEN) {
      const s = r.string();
      first ??= s;
    } else r.skip(wt);
  }
  return dtype === 7 ? first : undefined;
}

/** SummaryMetadata -> plugin_data.plugin_name. */
function decodePluginName(r: PbReader): string | undefined {
  let name: string | undefined;
  while (!r.done) {
    const { field, wt } = r.key();
    if (field === 1 && wt === WT_LEN) {
      const p = r.sub();
      while (!p.done) {
        const k = p.key();
        if (k.field === 1 && k.wt === WT_LEN) name = p.string();
        else p.skip(k.wt);
      }
    } else r.skip(wt);
  }
  return name;
}

function decodeValue(r: PbReader): EventValue {
  const v: EventValue = { tag: '' };
  while (!r.done) {
    const { field, wt } = r.key();
    switch (field) {
      case 1:
        r.expect(field, wt, WT_LEN);
        v.tag = r.string();
        break;
      case 2:
        r.expect(field, wt, WT_I32);
        v.simpleValue = r.float();
        break;
      case 4:
        r.expect(field, wt, WT_LEN);
        v.image = decodeImage(r.sub());
        break;
      case 5:
        r.expect(field, wt, WT_LEN);
        v.histogram = decodeHistogram(r.sub());
        break;
      case 8: {
        r.expect(field, wt, WT_LEN);
        const t = decodeTensorText(r.sub());
        if (t !== undefined) v.text = t;
        break;
      }
      case 9: {
        r.expect(field, wt, WT_LEN);
        const p = decodePluginName(r.sub());
        if (p !== undefined) v.pluginName = p;
        break;
      }
      default:
        r.skip(wt);
    }
  }
  return v;
}

/** Parse one serialized `Event`. */
export function decodeEvent(data: Uint8Array): EventRecord {
  const r = new PbReader(data);
  const ev: EventRecord = { wallTime: 0, step: 0 };
  while (!r.done) {
    const { field, wt } = r.key();
    if (field === 1) {
      r.expect(field, wt, WT_I64);
      ev.wallTime = r.double();
    } else if (field === 2) {
      r.expect(field, wt, WT_VARINT);
      ev.step = r.int();
    } else if (field === 3) {
      r.expect(field, wt, WT_LEN);
      ev.fileVersion = r.string();
    } else if (field === 7) {
      r.expect(field, wt, WT_LEN);
      const s = r.sub();
      ev.sessionStatus = 0; // proto3: UNSPECIFIED when the field is absent
      while (!s.done) {
        const k = s.key();
        if (k.field === 1 && k.wt === WT_VARINT) ev.sessionStatus = s.int();
        else s.skip(k.wt);
      }
    } else if (field === 5) {
      r.expect(field, wt, WT_LEN);
      const s = r.sub();
      ev.values ??= [];
      while (!s.done) {
        const k = s.key();
        if (k.field === 1) {
          s.expect(k.field, k.wt, WT_LEN);
          ev.values.push(decodeValue(s.sub()));
        } else s.skip(k.wt);
      }
    } else r.skip(wt);
  }
  return ev;
}

/** Parse a whole event file, checking both masked CRCs of every record; any corruption or truncation is SdtuneError('file') naming the file and record index. */
export async function readEventFile(file: string): Promise<EventRecord[]> {
  let buf: Uint8Array;
  try {
    const b = await readFile(file);
    buf = new Uint8Array(b.buffer, b.byteOffset, b.byteLength); // plain view: PbReader.bytes() slices are copies, not Buffers
  } catch (e) {
    throw new SdtuneError('file', `cannot read TensorBoard event file ${file}: ${(e as Error).message}`);
  }
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const bad = (i: number, off: number, what: string) =>
    new SdtuneError('file', `corrupt TensorBoard event file ${file}: record ${i} (byte ${off}): ${what}`);
  const out: EventRecord[] = [];
  for (let off = 0, i = 0; off < buf.length; i++) {
    if (buf.length - off < 12) throw bad(i, off, `truncated header (${buf.length - off} of 12 bytes)`);
    if (dv.getUint32(off + 8, true) !== maskedCrc32c(buf.subarray(off, off + 8))) throw bad(i, off, 'length CRC mismatch');
    const len64 = dv.getBigUint64(off, true);
    const avail = buf.length - off - 16;
    if (len64 > BigInt(Math.max(avail, 0))) throw bad(i, off, `truncated data (record says ${len64} bytes, ${Math.max(avail, 0)} left)`);
    const len = Number(len64);
    const data = buf.subarray(off + 12, off + 12 + len);
    if (dv.getUint32(off + 12 + len, true) !== maskedCrc32c(data)) throw bad(i, off, 'data CRC mismatch');
    try {
      out.push(decodeEvent(data));
    } catch (e) {
      throw bad(i, off, `malformed Event protobuf: ${(e as Error).message}`);
    }
    off += 16 + len;
  }
  return out;
}
