import { mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import {
  crc32c, encodeEvent, frameRecord, histogramOf, maskedCrc32c, readEventFile, TensorBoardWriter,
} from '../../src/io/tensorboard.js';

const dir = mkdtempSync(path.join(tmpdir(), 'sdtune-tb-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const newLogdir = () => path.join(dir, `run${n++}`);

const ascii = (s: string) => new TextEncoder().encode(s);
const hex = (s: string) => Uint8Array.from(s.trim().split(/\s+/).map((h) => parseInt(h, 16)));

/** expect(promise) to reject with SdtuneError of `kind` whose message matches all of `parts`. */
async function expectSdtuneError(p: Promise<unknown>, kind: string, ...parts: (string | RegExp)[]) {
  const e = await p.then(() => undefined, (err: unknown) => err);
  expect(e).toBeInstanceOf(SdtuneError);
  expect((e as SdtuneError).kind).toBe(kind);
  for (const part of parts) expect((e as SdtuneError).message).toMatch(part);
}

describe('crc32c / maskedCrc32c', () => {
  it('matches CRC-32C check values (spec §2, RFC 3720 B.4)', () => {
    expect(crc32c(ascii('123456789'))).toBe(0xe3069283);
    expect(crc32c(new Uint8Array(0))).toBe(0);
    expect(crc32c(new Uint8Array(32))).toBe(0x8a9136aa);
    expect(crc32c(new Uint8Array(32).fill(0xff))).toBe(0x62a8ab43);
    expect(crc32c(Uint8Array.from({ length: 32 }, (_, i) => i))).toBe(0x46dd794e);
    expect(crc32c(Uint8Array.from({ length: 32 }, (_, i) => 31 - i))).toBe(0x113fdb5c);
  });

  it('masks as rotate-right-15 plus 0xA282EAD8 (spec §6 values)', () => {
    const len = hex('1a 00 00 00 00 00 00 00');
    expect(crc32c(len)).toBe(0xd81d45aa);
    expect(maskedCrc32c(len)).toBe(0x2dd89b12);
    const crc = crc32c(ascii('123456789'));
    expect(maskedCrc32c(ascii('123456789'))).toBe((((crc >>> 15) | (crc << 17)) + 0xa282ead8) >>> 0);
  });
});

describe('encoding (spec §6 worked example)', () => {
  const EVENT = '09 00 00 20 40 fc 54 d9 41 10 01 2a 0d 0a 0b 0a 04 6c 6f 73 73 15 00 00 00 3f';
  const RECORD = `1a 00 00 00 00 00 00 00 12 9b d8 2d ${EVENT} 34 c2 79 3e`;
  const FIRST = `18 00 00 00 00 00 00 00 a3 7f 4b 22
    09 00 00 00 40 fc 54 d9 41 1a 0d 62 72 61 69 6e 2e 45 76 65 6e 74 3a 32
    ec ed 8f 9d`;

  it('encodes the scalar event and its record byte for byte (12 + 26 + 4 = 42 bytes; the spec text says 46)', () => {
    const ev = encodeEvent({ wallTime: 1700000000.5, step: 1, values: [{ tag: 'loss', simpleValue: 0.5 }] });
    expect(ev).toEqual(hex(EVENT));
    expect(crc32c(ev)).toBe(0x6bae4dfb);
    expect(maskedCrc32c(ev)).toBe(0x3e79c234);
    expect(frameRecord(ev)).toEqual(hex(RECORD));
    expect(hex(RECORD)).toHaveLength(42);
  });

  it('encodes the first (file_version) record byte for byte', () => {
    expect(frameRecord(encodeEvent({ wallTime: 1700000000, fileVersion: 'brain.Event:2' }))).toEqual(hex(FIRST));
  });

  it('the writer appends exactly the worked-example record after the file_version record', async () => {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    w.scalar('loss', 0.5, 1, 1700000000.5);
    await w.close();
    const bytes = new Uint8Array(readFileSync(w.path));
    const first = bytes.subarray(0, bytes.length - 42);
    expect(first.length).toBe(12 + 24 + 4); // u64 + crc + (09 <8> 1a 0d <13>) + crc
    expect(first.subarray(0, 12)).toEqual(hex(FIRST).subarray(0, 12)); // same length (24) -> same length CRC
    expect(first.subarray(21, 36)).toEqual(hex(FIRST).subarray(21, 36)); // 1a 0d "brain.Event:2"
    expect(bytes.subarray(bytes.length - 42)).toEqual(hex(RECORD));
  });

  it('writes simple_value 0 (oneof member), omits step 0, encodes negative and > 2^31 steps as int64', async () => {
    const zero = encodeEvent({ wallTime: 1, step: 0, values: [{ tag: 'a', simpleValue: 0 }] });
    expect([...zero.subarray(9)]).toEqual([0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, 0x61, 0x15, 0, 0, 0, 0]);
    const neg = encodeEvent({ wallTime: 1, step: -1 });
    expect([...neg.subarray(9)]).toEqual([0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    w.scalar('big', 1, 2 ** 40);
    w.scalar('neg', 2, -5);
    w.scalar('zero', 0, 0);
    await w.close();
    const evs = await readEventFile(w.path);
    expect(evs.slice(1).map((e) => [e.step, e.values?.[0].simpleValue])).toEqual([[2 ** 40, 1], [-5, 2], [0, 0]]);
  });
});

describe('TensorBoardWriter', () => {
  it('creates nested logdirs and events.out.tfevents.<10-digit secs>.<host>.<pid>.<n> files, one per writer', async () => {
    const logdir = path.join(newLogdir(), 'a', 'train');
    const t0 = Math.floor(Date.now() / 1000);
    const w1 = await TensorBoardWriter.create(logdir);
    const w2 = await TensorBoardWriter.create(logdir);
    await Promise.all([w1.close(), w2.close()]);
    const base = path.basename(w1.path);
    const m = /^events\.out\.tfevents\.(\d{10})\.(.+)\.(\d+)\.(\d+)$/.exec(base);
    expect(m).not.toBeNull();
    expect(Number(m![1])).toBeGreaterThanOrEqual(t0);
    expect(m![2]).toBe(hostname().replace(/[/\\]/g, '_') || 'localhost');
    expect(Number(m![3])).toBe(process.pid);
    expect(w2.path).not.toBe(w1.path);
    expect(readdirSync(logdir).sort()).toEqual([base, path.basename(w2.path)].sort());
    expect(path.dirname(w1.path)).toBe(logdir);
  });

  it('writes and fsyncs the file_version record at create time', async () => {
    const before = Date.now() / 1000;
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    const evs = await readEventFile(w.path); // readable before any flush/close
    expect(evs).toHaveLength(1);
    expect(evs[0].fileVersion).toBe('brain.Event:2');
    expect(evs[0].step).toBe(0);
    expect(evs[0].values).toBeUndefined();
    expect(evs[0].wallTime).toBeGreaterThanOrEqual(Math.floor(before));
    expect(evs[0].wallTime).toBeLessThanOrEqual(Date.now() / 1000 + 1);
    await w.close();
  });

  it('round-trips scalars (float32), batched scalars and unicode tags; every CRC checks', async () => {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    const t = Date.now() / 1000;
    for (let step = 0; step < 5; step++) w.scalar('train/loss', 1 / (step + 3), step);
    w.scalars({ 'lr': 1e-4, '損失/ロス 🚀': -2.5, 'naïve é': Number.NaN }, 7, 1234.25);
    w.scalar('inf', Infinity, 8);
    await w.close();
    const evs = await readEventFile(w.path);
    expect(evs).toHaveLength(1 + 5 + 1 + 1);
    for (let step = 0; step < 5; step++) {
      const e = evs[1 + step];
      expect(e.step).toBe(step);
      expect(e.wallTime).toBeGreaterThanOrEqual(t - 1);
      expect(e.values).toEqual([{ tag: 'train/loss', simpleValue: Math.fround(1 / (step + 3)) }]);
    }
    expect(evs[6].wallTime).toBe(1234.25);
    expect(evs[6].step).toBe(7);
    expect(evs[6].values!.map((v) => v.tag)).toEqual(['lr', '損失/ロス 🚀', 'naïve é']);
    expect(evs[6].values![0].simpleValue).toBe(Math.fround(1e-4));
    expect(evs[6].values![1].simpleValue).toBe(-2.5);
    expect(evs[6].values![2].simpleValue).toBeNaN();
    expect(evs[7].values![0].simpleValue).toBe(Infinity);
    // the unicode tag is stored as UTF-8 bytes
    const bytes = readFileSync(w.path);
    expect(bytes.includes(Buffer.from('損失/ロス 🚀', 'utf8'))).toBe(true);
  });

  it('writes RGB images as PNG (colorspace 3) and passes pre-encoded PNGs through with their colorspace', async () => {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    const width = 5, height = 3;
    const rgb = Uint8Array.from({ length: width * height * 3 }, (_, i) => (i * 37) % 256);
    await w.image('samples/0', { data: rgb, width, height }, 10);
    const rgba = await sharp(Buffer.alloc(2 * 4 * 4, 200), { raw: { width: 2, height: 4, channels: 4 } }).png().toBuffer();
    await w.image('rgba', { png: new Uint8Array(rgba), width: 2, height: 4 }, 11);
    await w.close();
    const evs = await readEventFile(w.path);
    expect(evs).toHaveLength(3);
    const [a, b] = [evs[1].values![0], evs[2].values![0]];
    expect(evs[1].step).toBe(10);
    expect(a.tag).toBe('samples/0');
    expect(a.simpleValue).toBeUndefined();
    expect(a.image).toMatchObject({ height, width, colorspace: 3 });
    const { data, info } = await sharp(a.image!.png).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([width, height, 3]);
    expect(new Uint8Array(data)).toEqual(rgb);
    expect(b.image).toEqual({ height: 4, width: 2, colorspace: 4, png: new Uint8Array(rgba) });
  });

  it('rejects bad image input with usage errors', async () => {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    await expectSdtuneError(w.image('x', { data: new Uint8Array(10), width: 2, height: 2 }, 0), 'usage', /2x2x3/);
    await expectSdtuneError(w.image('x', { png: ascii('not a png at all, clearly not a png'), width: 1, height: 1 }, 0), 'usage', /not a PNG/);
    const png = await sharp(Buffer.alloc(3 * 2 * 3), { raw: { width: 3, height: 2, channels: 3 } }).png().toBuffer();
    await expectSdtuneError(w.image('x', { png: new Uint8Array(png), width: 2, height: 3 }, 0), 'usage', /3x2/);
    await w.close();
  });

  it('encodes a SessionLog START (Event field 7, status 1) byte for byte and reads it back', async () => {
    // wall_time (field 1, double) | step 11 (field 2, varint) | session_log (field 7) { status (field 1) = START (1) }
    expect(encodeEvent({ wallTime: 1700000000, step: 11, sessionStatus: 1 })).toEqual(hex('09 00 00 00 40 fc 54 d9 41 10 0b 3a 02 08 01'));
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    w.scalar('loss', 1, 10);
    w.sessionStart(11);
    await w.close();
    const evs = await readEventFile(w.path);
    expect(evs.map((e) => [e.step, e.sessionStatus])).toEqual([[0, undefined], [10, undefined], [11, 1]]);
  });

  it('writes histograms and text summaries', async () => {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    const vals = Float32Array.from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, NaN]);
    w.histogram('weights', vals, 3, 5);
    w.text('prompt', 'a photo of sks dog — ünïcode', 3);
    await w.close();
    const evs = await readEventFile(w.path);
    const h = evs[1].values![0].histogram!;
    expect(h).toEqual({ min: 0, max: 10, num: 11, sum: 55, sumSquares: 385, bucketLimit: [2, 4, 6, 8, 10], bucket: [3, 2, 2, 2, 2] });
    expect(evs[2].values![0]).toEqual({ tag: 'prompt', text: 'a photo of sks dog — ünïcode', pluginName: 'text' });
  });

  it('histogramOf handles constant and empty input; counts add up', () => {
    expect(histogramOf([2, 2, 2])).toEqual({ min: 2, max: 2, num: 3, sum: 6, sumSquares: 12, bucketLimit: [2], bucket: [3] });
    expect(histogramOf([NaN]).num).toBe(0);
    const r = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i * 12.9898) * 3.7);
    const h = histogramOf(r, 17);
    expect(h.bucket.reduce((s, c) => s + c, 0)).toBe(1000);
    expect(h.bucketLimit).toHaveLength(17);
    expect(h.bucketLimit[16]).toBe(h.max);
  });

  it('buffers until flush (timer or explicit); flushed data is whole records even without close', async () => {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    w.scalar('a', 1, 1);
    expect(await readEventFile(w.path)).toHaveLength(1); // still queued
    await w.flush();
    expect(await readEventFile(w.path)).toHaveLength(2);
    await w.flush(); // nothing queued: no-op
    expect(await readEventFile(w.path)).toHaveLength(2);
    await w.close();

    const t = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 20 });
    t.scalar('b', 2, 1);
    await new Promise((r) => setTimeout(r, 200));
    const evs = await readEventFile(t.path); // not closed: simulates a crash after the timer flush
    expect(evs.map((e) => e.values?.[0].tag)).toEqual([undefined, 'b']);
    await t.close();
  });

  it('close() flushes (including images still encoding), is idempotent, and later writes throw', async () => {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    const img = w.image('late', { data: new Uint8Array(64 * 64 * 3), width: 64, height: 64 }, 1);
    w.scalar('a', 1, 2);
    const c1 = w.close();
    const c2 = w.close();
    await Promise.all([img, c1, c2]);
    await w.close();
    await w.flush();
    const evs = await readEventFile(w.path);
    expect(evs.slice(1).map((e) => e.values![0].tag).sort()).toEqual(['a', 'late']);
    expect(() => w.scalar('a', 1, 3)).toThrow(SdtuneError);
    await expectSdtuneError(w.image('x', { data: new Uint8Array(3), width: 1, height: 1 }, 0), 'usage', /closed/);
  });

  it('validates tags and steps', async () => {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    expect(() => w.scalar('', 1, 0)).toThrow(/non-empty/);
    expect(() => w.scalar('a', 1, 1.5)).toThrow(/integer/);
    expect(() => w.scalar('a', 1, Number.NaN)).toThrow(SdtuneError);
    await w.close();
  });
});

describe('readEventFile errors', () => {
  async function sample(): Promise<{ file: string; bytes: Buffer }> {
    const w = await TensorBoardWriter.create(newLogdir(), { flushEveryMs: 0 });
    w.scalar('loss', 0.5, 1, 1700000000.5);
    w.scalar('loss', 0.25, 2, 1700000001.5);
    await w.close();
    return { file: w.path, bytes: readFileSync(w.path) };
  }

  it('reports a truncated file naming the file and record index', async () => {
    const { file, bytes } = await sample();
    truncateSync(file, bytes.length - 3); // inside the last record's data CRC
    await expectSdtuneError(readEventFile(file), 'file', file, /record 2/, /truncated/);
    truncateSync(file, bytes.length - 42 + 5); // inside the last record's header
    await expectSdtuneError(readEventFile(file), 'file', file, /record 2/, /truncated header/);
  });

  it('reports a flipped byte as a CRC mismatch of that record', async () => {
    const { file, bytes } = await sample();
    const data = Buffer.from(bytes);
    data[data.length - 42 - 10] ^= 0x01; // record 1's data
    writeFileSync(file, data);
    await expectSdtuneError(readEventFile(file), 'file', file, /record 1/, /data CRC/);
    const len = Buffer.from(bytes);
    len[len.length - 42] ^= 0x01; // record 2's length field
    writeFileSync(file, len);
    await expectSdtuneError(readEventFile(file), 'file', file, /record 2/, /length CRC/);
  });

  it('reports a record whose CRCs check but whose protobuf is malformed', async () => {
    const file = path.join(newLogdir() + '-bad');
    writeFileSync(file, frameRecord(Uint8Array.from([0x0a, 0x05, 0x61])));
    await expectSdtuneError(readEventFile(file), 'file', file, /record 0/, /malformed/);
  });

  it('reports a missing file', async () => {
    const file = path.join(dir, 'nope', 'events.out.tfevents.0.x');
    await expectSdtuneError(readEventFile(file), 'file', file);
  });

  it('reads an empty file as no events', async () => {
    const file = path.join(dir, 'empty.tfevents');
    writeFileSync(file, '');
    expect(await readEventFile(file)).toEqual([]);
  });
});
