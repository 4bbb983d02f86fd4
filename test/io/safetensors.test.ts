import { mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import {
  MAX_TENSORS,
  SafetensorsFile,
  bf16BitsToF32,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  readSafetensorsHeader,
  writeSafetensors,
} from '../../src/io/safetensors.js';
import { withAtomicFile, writeAll, writeFileAtomic } from '../../src/runtime/atomic.js';
import { describeGolden, golden } from '../golden.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'sdtune-st-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});
const tmp = (name: string) => path.join(dir, name);

/** Hand-build a file: 8-byte N (default: header length), header text, data bytes. */
async function mkFile(name: string, header: string, data: number | Uint8Array = 0, n?: bigint): Promise<string> {
  const h = Buffer.from(header, 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(n ?? BigInt(h.length));
  const body = typeof data === 'number' ? new Uint8Array(data) : data;
  const file = tmp(name);
  await writeFile(file, Buffer.concat([prefix, h, body]));
  return file;
}
const entry = (dtype: string, shape: number[], b: number, e: number) => ({ dtype, shape, data_offsets: [b, e] });
const f16 = (x: number) => f32ToF16Bits(new Float32Array([x]))[0];
const bf16 = (bits: number) => f32ToBf16Bits(new Float32Array(new Uint32Array([bits]).buffer))[0];

async function expectFileError(file: string, phrase: string) {
  const err = await SafetensorsFile.open(file).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SdtuneError);
  expect((err as SdtuneError).kind).toBe('file');
  expect((err as SdtuneError).message).toContain(path.basename(file));
  expect((err as SdtuneError).message).toContain(phrase);
}

describe('safetensors round trip', () => {
  it('writes and reads F32/F16/BF16/I32 with metadata', async () => {
    const x = new Float32Array([0.1, -2.5, 1e-7, 65519, 70000, 3.14159, 0, -0]);
    const file = tmp('rt.safetensors');
    await writeSafetensors(
      file,
      {
        f32: { shape: [2, 4], data: x },
        f16: { shape: [8], data: x, dtype: 'F16' },
        bf16: { shape: [4, 2], data: x, dtype: 'BF16' },
        ints: { shape: [3], data: new Int32Array([-(2 ** 31), 7, 2 ** 31 - 1]) },
        empty: { shape: [0, 3], data: new Float32Array(0) },
        scalar: { shape: [], data: new Float32Array([42]) },
      },
      { metadata: { format: 'pt', note: 'héllo "quoted"' } },
    );
    const f = await SafetensorsFile.open(file);
    try {
      expect(f.metadata).toEqual({ format: 'pt', note: 'héllo "quoted"' });
      expect(f.keys().sort()).toEqual(['bf16', 'empty', 'f16', 'f32', 'ints', 'scalar']);
      expect(f.headerLength % 8).toBe(0);
      const all = await f.readAll();
      expect(all.get('f32')).toEqual({ dtype: 'F32', shape: [2, 4], data: x });
      const h = all.get('f16')!;
      expect(h.dtype).toBe('F16');
      expect(h.data).toBeInstanceOf(Float32Array);
      expect(Array.from(h.data)).toEqual(Array.from(f16BitsToF32(f32ToF16Bits(x))));
      expect(h.data[0]).toBe(0.0999755859375); // 0x2E66
      expect(h.data[4]).toBe(Infinity);
      expect(Object.is(h.data[7], -0)).toBe(true);
      expect(Array.from(all.get('bf16')!.data)).toEqual(Array.from(bf16BitsToF32(f32ToBf16Bits(x))));
      expect(all.get('ints')).toEqual({ dtype: 'I32', shape: [3], data: new Int32Array([-(2 ** 31), 7, 2 ** 31 - 1]) });
      expect(all.get('empty')!.data.length).toBe(0);
      expect(all.get('scalar')).toEqual({ dtype: 'F32', shape: [], data: new Float32Array([42]) });
    } finally {
      await f.close();
    }
    const hdr = await readSafetensorsHeader(file);
    expect(hdr.tensors.get('f32')).toMatchObject({ dtype: 'F32', shape: [2, 4] });
  });

  it('floatDtype converts Float32Array tensors; integer dtypes widen to Int32Array', async () => {
    const file = tmp('conv.safetensors');
    await writeSafetensors(
      file,
      new Map([
        ['w', { shape: [2], data: new Float32Array([1 / 3, 1e6]) }],
        ['pos', { shape: [3], data: new Int32Array([-5, 0, 2 ** 31 - 1]), dtype: 'I64' as const }],
        ['mask', { shape: [2], data: new Int32Array([0, 1]), dtype: 'BOOL' as const }],
        ['d', { shape: [1], data: new Float32Array([0.5]), dtype: 'F64' as const }],
        ['s', { shape: [2], data: new Int32Array([-300, 300]), dtype: 'I16' as const }],
      ]),
      { floatDtype: 'BF16' },
    );
    const f = await SafetensorsFile.open(file);
    expect(f.info('w').dtype).toBe('BF16');
    expect((await f.read('w')).data).toEqual(bf16BitsToF32(f32ToBf16Bits(new Float32Array([1 / 3, 1e6]))));
    expect(await f.read('pos')).toEqual({ dtype: 'I64', shape: [3], data: new Int32Array([-5, 0, 2 ** 31 - 1]) });
    expect((await f.read('mask')).data).toEqual(new Int32Array([0, 1]));
    expect((await f.read('d')).data).toEqual(new Float32Array([0.5]));
    expect((await f.read('s')).data).toEqual(new Int32Array([-300, 300]));
    expect(() => f.info('nope')).toThrow(/conv\.safetensors: no tensor "nope"/);
    await f.close();
  });

  it('reads unaligned data, leading/trailing JSON whitespace, integer-like names in header order', async () => {
    const data = new Uint8Array(new Float32Array([1.5, -2]).buffer);
    const file = await mkFile('odd.safetensors', `\n {"9":${JSON.stringify(entry('F32', [1], 0, 4))},"10":${JSON.stringify(entry('F32', [1], 4, 8))}}\t\n   `, data);
    const f = await SafetensorsFile.open(file);
    expect(f.headerLength % 4).not.toBe(0);
    expect(f.keys()).toEqual(['9', '10']);
    expect((await f.read('9')).data).toEqual(new Float32Array([1.5]));
    expect((await f.read('10')).data).toEqual(new Float32Array([-2]));
    await f.close();
  });

  it('I64/U32 values outside int32 and F8 tensors fail at read time', async () => {
    const big = new Uint8Array(new BigInt64Array([1n, 2n ** 40n]).buffer);
    const file = await mkFile(
      'i64.safetensors',
      JSON.stringify({ a: entry('I64', [2], 0, 16), f8: entry('F8_E4M3', [2], 16, 18), u: entry('U32', [1], 18, 22) }),
      new Uint8Array([...big, 1, 2, 0, 0, 0, 0x80]),
    );
    const f = await SafetensorsFile.open(file);
    await expect(f.read('a')).rejects.toThrow(/i64\.safetensors: tensor "a" \(I64\) has values outside the int32 range/);
    await expect(f.read('f8')).rejects.toThrow(/unsupported dtype F8_E4M3/);
    await expect(f.read('u')).rejects.toThrow(/tensor "u" \(U32\)/);
    await f.close();
  });

  it('rejects bad writer input', async () => {
    const f = tmp('bad-in.safetensors');
    await expect(writeSafetensors(f, { a: { shape: [2, 2], data: new Float32Array(3) } })).rejects.toThrow(/shape \[2,2\] x F32 needs 4 elements but data has 3/);
    await expect(writeSafetensors(f, { a: { shape: [1], data: new Uint16Array(1) } })).rejects.toThrow(/needs dtype F16/);
    await expect(writeSafetensors(f, {}, { metadata: { n: 1 as unknown as string } })).rejects.toThrow(/metadata value for "n" must be a string/);
    await expect(writeSafetensors(f, { a: { shape: [1], data: new Int32Array([300]), dtype: 'I8' } })).rejects.toThrow(/does not fit in I8/);
    expect(await readdir(dir)).not.toContain('bad-in.safetensors');
  });
});

describe('safetensors writer bytes', () => {
  it('empty file matches spec §1.2 rule 4', async () => {
    const file = tmp('empty.safetensors');
    await writeSafetensors(file, {});
    expect(Buffer.from(await readFile(file)).toString('hex')).toBe('0800000000000000' + '7b7d202020202020');
    const f = await SafetensorsFile.open(file);
    expect(f.keys()).toEqual([]);
    expect(f.metadata).toEqual({});
    await f.close();
  });

  it('orders by dtype (§1.2) then UTF-8 name bytes, compact header, 8-aligned', async () => {
    const file = tmp('order.safetensors');
    const f32 = (n: number) => new Float32Array(n);
    await writeSafetensors(
      file,
      {
        b: { shape: [1], data: f32(1) },
        a: { shape: [1, 2], data: f32(2) },
        h: { shape: [1], data: new Uint16Array(1), dtype: 'F16' },
        g: { shape: [1], data: new Uint16Array(1), dtype: 'BF16' },
        i: { shape: [1], data: new Int32Array(1), dtype: 'I64' },
        u: { shape: [3], data: new Int32Array(3), dtype: 'U8' },
        '\u{1F600}': { shape: [1], data: f32(1) },
        '\uE000': { shape: [1], data: f32(1) },
      },
      { metadata: { format: 'pt' } },
    );
    const bytes = await readFile(file);
    const n = Number(bytes.readBigUInt64LE(0));
    expect(n % 8).toBe(0);
    const header = bytes.subarray(8, 8 + n).toString('utf8');
    const e = (dtype: string, shape: number[], b: number, end: number) => `{"dtype":"${dtype}","shape":${JSON.stringify(shape)},"data_offsets":[${b},${end}]}`;
    const expected =
      '{"__metadata__":{"format":"pt"},' +
      `"i":${e('I64', [1], 0, 8)},"a":${e('F32', [1, 2], 8, 16)},"b":${e('F32', [1], 16, 20)},` +
      `"\uE000":${e('F32', [1], 20, 24)},"\u{1F600}":${e('F32', [1], 24, 28)},` +
      `"g":${e('BF16', [1], 28, 30)},"h":${e('F16', [1], 30, 32)},"u":${e('U8', [3], 32, 35)}}`;
    expect(header.trimEnd()).toBe(expected);
    expect(header.slice(expected.length)).toMatch(/^ *$/);
    expect(bytes.length).toBe(8 + n + 35);
  });
});

describe('F16 / BF16 conversions', () => {
  it('all 65536 half patterns round-trip f16 -> f32 -> f16', () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const wide = f16BitsToF32(all);
    const back = f32ToF16Bits(wide);
    for (let h = 0; h < 65536; h++) {
      const isNaN16 = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
      if (isNaN16) {
        expect(Number.isNaN(wide[h])).toBe(true);
        if (back[h] !== ((h & 0x8000) | 0x7e00)) expect.fail(`NaN ${h.toString(16)} -> ${back[h].toString(16)}`);
      } else if (back[h] !== h) expect.fail(`pattern ${h.toString(16)} -> ${wide[h]} -> ${back[h].toString(16)}`);
    }
    expect(wide[0x3c00]).toBe(1);
    expect(wide[0x0001]).toBe(2 ** -24);
    expect(wide[0x7bff]).toBe(65504);
    expect(wide[0xfc00]).toBe(-Infinity);
  });

  it('F32 -> F16 overflow, underflow and ties follow spec §1.4', () => {
    expect(f16(65504)).toBe(0x7bff);
    expect(f16(Math.fround(65520 - 2 ** -8))).toBe(0x7bff);
    expect(f16(65520)).toBe(0x7c00);
    expect(f16(-65520)).toBe(0xfc00);
    expect(f16(1e30)).toBe(0x7c00);
    expect(f16(2 ** -25)).toBe(0);
    expect(f16(-(2 ** -25))).toBe(0x8000);
    expect(f16(2 ** -25 * (1 + 2 ** -23))).toBe(1);
    expect(f16(2 ** -24 * 0.75)).toBe(1);
    expect(f16(2 ** -24)).toBe(1);
    expect(f16(2 ** -24 * 1.5)).toBe(2); // tie -> even
    expect(f16(2 ** -24 * 2.5)).toBe(2); // tie -> even
    expect(f16(2 ** -14 - 2 ** -25)).toBe(0x400); // rounds up into the smallest normal
    expect(f16(1 + 2 ** -11)).toBe(0x3c00); // tie -> even
    expect(f16(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie -> even
    expect(f16(1e-10)).toBe(0);
    expect(f16(NaN)).toBe(0x7e00);
    expect(f16(-Infinity)).toBe(0xfc00);
  });

  it('F32 -> F16 picks the nearest half (ties to even) for random floats', () => {
    const n = 20000;
    const bits = new Uint32Array(n);
    let seed = 12345;
    for (let i = 0; i < n; i++) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      bits[i] = (seed & 0x807fffff) | (((seed >>> 7) % 42) + 100) << 23; // exponents 2^-27 .. 2^14
    }
    const x = new Float32Array(bits.buffer);
    const h = f32ToF16Bits(x);
    const tab = f16BitsToF32(new Uint16Array(65536).map((_, i) => i));
    for (let i = 0; i < n; i++) {
      const d = Math.abs(tab[h[i]] - x[i]);
      for (const nb of [h[i] - 1, h[i] + 1]) {
        if ((nb & 0x7fff) > 0x7c00 || (nb & 0x8000) !== (h[i] & 0x8000)) continue;
        const dn = Math.abs(tab[nb] - x[i]);
        if (dn < d || (dn === d && (h[i] & 1) === 1)) expect.fail(`${x[i]} -> ${h[i].toString(16)}, ${nb.toString(16)} is nearer/even`);
      }
    }
  });

  it('BF16 rounding rule incl. ties, NaN and overflow', () => {
    expect(f32ToBf16Bits(new Float32Array([1, -2, 0]))).toEqual(new Uint16Array([0x3f80, 0xc000, 0]));
    expect(bf16(0x3f808000)).toBe(0x3f80); // tie -> even
    expect(bf16(0x3f818000)).toBe(0x3f82); // tie -> even
    expect(bf16(0x3f808001)).toBe(0x3f81);
    expect(bf16(0x3f807fff)).toBe(0x3f80);
    expect(bf16(0x7f7fffff)).toBe(0x7f80); // max finite f32 rounds to Inf
    expect(bf16(0x7fc00000)).toBe(0x7fc0);
    expect(bf16(0xffc00001)).toBe(0x7fc0); // sign not preserved
    expect(bf16(0xff800000)).toBe(0xff80); // -Inf
    expect(Number.isNaN(bf16BitsToF32(new Uint16Array([0xffff]))[0])).toBe(true);
    expect(bf16BitsToF32(new Uint16Array([0x3f80, 0xc049]))).toEqual(new Float32Array([1, -3.140625]));
  });
});

describe('malformed safetensors files', () => {
  const J = JSON.stringify;
  it('file shorter than 8 bytes', async () => {
    const file = tmp('short.safetensors');
    await writeFile(file, Buffer.from([1, 2, 3]));
    await expectFileError(file, 'file too short');
  });
  it('header cut short', async () => expectFileError(await mkFile('cut-header.safetensors', '{"a":', 0, 100n), 'exceeds the file size'));
  it('data cut short', async () => expectFileError(await mkFile('cut-data.safetensors', J({ a: entry('F32', [2, 3], 0, 24) }), 12), 'out of range'));
  it('huge header length', async () => expectFileError(await mkFile('huge.safetensors', '{}', 0, 2n ** 40n), 'exceeds the 100,000,000 byte limit'));
  it('bad JSON', async () => expectFileError(await mkFile('badjson.safetensors', '{"a": {'), 'not valid JSON'));
  it('invalid UTF-8', async () => {
    const file = tmp('utf8.safetensors');
    await writeFile(file, Buffer.concat([Buffer.from([4, 0, 0, 0, 0, 0, 0, 0]), Buffer.from([0x7b, 0xff, 0x7d, 0x20])]));
    await expectFileError(file, 'not valid UTF-8');
  });
  it('header not an object', async () => expectFileError(await mkFile('array.safetensors', '[1,2]'), 'not a JSON object'));
  it('unknown dtype', async () => expectFileError(await mkFile('dtype.safetensors', J({ a: entry('F4', [2], 0, 1) }), 1), 'unsupported dtype "F4" (known: BOOL'));
  it('missing field', async () => expectFileError(await mkFile('missing.safetensors', J({ a: { dtype: 'F32', shape: [1] } }), 4), 'tensor "a" is missing "data_offsets"'));
  it('negative / fractional shape', async () => expectFileError(await mkFile('shape.safetensors', J({ a: entry('F32', [-1], 0, 4) }), 4), 'is not a list of non-negative integers'));
  it('begin > end', async () => expectFileError(await mkFile('rev.safetensors', J({ a: entry('F32', [1], 4, 0) }), 4), 'begin > end'));
  it('out-of-range offsets', async () => expectFileError(await mkFile('range.safetensors', J({ a: entry('F32', [1], 8, 12) }), 8), 'data_offsets [8,12] are out of range'));
  it('overlapping offsets', async () =>
    expectFileError(await mkFile('overlap.safetensors', J({ a: entry('F32', [2], 0, 8), b: entry('F32', [2], 4, 12) }), 12), 'overlap'));
  it('size mismatch', async () =>
    expectFileError(await mkFile('model.safetensors', J({ x: entry('F32', [2, 3], 0, 12) }), 12), 'tensor "x" data_offsets [0,12] do not match shape [2,3] x F32 (24 bytes)'));
  it('gap between tensors', async () =>
    expectFileError(await mkFile('gap.safetensors', J({ a: entry('F32', [1], 0, 4), b: entry('F32', [1], 8, 12) }), 12), 'gap in the data area: bytes [4,8]'));
  it('uncovered bytes at the end', async () => expectFileError(await mkFile('tail.safetensors', J({ a: entry('F32', [1], 0, 4) }), 6), 'bytes [4,6] at the end'));
  it('duplicate key', async () => {
    const e = J(entry('F32', [1], 0, 4));
    await expectFileError(await mkFile('dup.safetensors', `{"a":${e},"a":${e}}`, 4), 'duplicate key "a"');
  });
  it('non-string metadata', async () => expectFileError(await mkFile('meta.safetensors', J({ __metadata__: { x: 1 } })), '__metadata__ value for "x" is not a string'));
  it('missing file', async () => expectFileError(tmp('does-not-exist.safetensors'), 'cannot open'));
});

describe('hostile safetensors headers (bounded work, one-line errors)', () => {
  const J = JSON.stringify;
  it('metadata nested 100,000 arrays deep is refused before JSON.parse (was a RangeError: stack overflow)', async () => {
    const deep = `{"__metadata__":{"x":${'['.repeat(100_000)}${']'.repeat(100_000)}}}`;
    await expectFileError(await mkFile('deep.safetensors', deep), 'header nests deeper than 32 levels');
    // brackets inside strings are text, not nesting
    const f = await SafetensorsFile.open(await mkFile('brackets.safetensors', J({ __metadata__: { x: '['.repeat(1000) } })));
    expect(f.metadata.x).toHaveLength(1000);
    await f.close();
  });
  it('more than MAX_TENSORS tensors are refused by a count before JSON.parse', async () => {
    const entries = (n: number) => `{${Array.from({ length: n }, (_, i) => `"t${i}":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}`).join(',')}}`;
    await expectFileError(await mkFile('many.safetensors', entries(MAX_TENSORS + 1)), `header lists more than ${MAX_TENSORS.toLocaleString('en-US')} tensors`);
    const f = await SafetensorsFile.open(await mkFile('some.safetensors', entries(1000)));
    expect(f.tensors.size).toBe(1000);
    await f.close();
  });
  it('huge or multi-line names and values are cut short in messages', async () => {
    const name = `a\n${'x'.repeat(1_000_000)}`;
    const e = await SafetensorsFile.open(await mkFile('longname.safetensors', J({ [name]: entry('F32', [...new Array(100_000).fill(1), -1], 0, 4) }), 4)).catch((x: Error) => x);
    expect(e).toBeInstanceOf(SdtuneError);
    expect((e as Error).message).toMatch(/tensor "a\\nxxx+\.\.\. shape \[1,1,1,[1,]+\.\.\. is not a list of non-negative integers$/);
    expect((e as Error).message.length).toBeLessThan(400);
    expect((e as Error).message).not.toContain('\n');
  });
  it('readFloat refuses integer dtypes naming file, key, expected and found; reads F32/F16/BF16/F64', async () => {
    const file = tmp('dtypes.safetensors');
    const x = new Float32Array([1.5, -2]);
    await writeSafetensors(file, {
      f32: { shape: [2], data: x }, f16: { shape: [2], data: x, dtype: 'F16' }, bf16: { shape: [2], data: x, dtype: 'BF16' },
      f64: { shape: [2], data: x, dtype: 'F64' }, i32: { shape: [2], data: new Int32Array(x.buffer) }, u32: { shape: [2], data: new Int32Array([1, 2]), dtype: 'U32' },
    });
    const f = await SafetensorsFile.open(file);
    for (const k of ['f32', 'f16', 'bf16', 'f64']) expect(Array.from((await f.readFloat(k)).data), k).toEqual([1.5, -2]);
    for (const [k, d] of [['i32', 'I32'], ['u32', 'U32']]) {
      const e = await f.readFloat(k).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(SdtuneError);
      expect((e as Error).message).toBe(`${file}: tensor "${k}" has dtype ${d}, expected a floating-point dtype (F32, F16, BF16 or F64)`);
    }
    expect((await f.read('i32')).data).toBeInstanceOf(Int32Array); // read() still reads integer tensors (token ids, position ids)
    await f.close();
  });
});

describe('atomic writes', () => {
  const listTmp = async (d: string) => (await readdir(d)).filter((n) => n.endsWith('.tmp'));

  it('a failing fill leaves neither temp nor target file', async () => {
    const d = tmp('atomic1');
    const target = path.join(d, 'out.bin');
    await expect(
      withAtomicFile(target, async (fh) => {
        await fh.write(Buffer.from('partial'));
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(await readdir(d)).toEqual([]);
  });

  it('an existing target is replaced only on success', async () => {
    const d = tmp('atomic2');
    const target = path.join(d, 'out.bin');
    await writeFileAtomic(target, [Buffer.from('ol'), Buffer.from('d')]);
    expect(await readFile(target, 'utf8')).toBe('old');
    await expect(withAtomicFile(target, async () => Promise.reject(new Error('nope')))).rejects.toThrow('nope');
    expect(await readFile(target, 'utf8')).toBe('old');
    expect(await listTmp(d)).toEqual([]);
    await writeFileAtomic(target, Buffer.from('new'));
    expect(await readFile(target, 'utf8')).toBe('new');
    expect(await listTmp(d)).toEqual([]);
  });
});

describe('write failures of the disk or folder', () => {
  it('disk full (ENOSPC) is a one-line file error naming the target and the free space; no temp file, old file intact', async () => {
    const d = tmp('full');
    const target = path.join(d, 'model.safetensors');
    await writeFileAtomic(target, Buffer.from('old'));
    // the kernel's own ENOSPC: /dev/full fails every write with it
    const fillFromFullDisk = async () => {
      const full = await open('/dev/full', 'w');
      try {
        await writeAll(full, new Uint8Array(4096));
      } finally {
        await full.close();
      }
    };
    const e = await withAtomicFile(target, fillFromFullDisk).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(SdtuneError);
    expect((e as SdtuneError).kind).toBe('file');
    expect((e as Error).message).toMatch(new RegExp(`^cannot write ${target.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: no space left on the device \\(ENOSPC, [\\d.]+ [KMGT]?i?B free in .*\\); nothing was written, the existing model.safetensors is unchanged$`));
    expect(await readFile(target, 'utf8')).toBe('old');
    expect(await readdir(d)).toEqual(['model.safetensors']);
    await rm(target);
    const e2 = await withAtomicFile(target, fillFromFullDisk).catch((x: unknown) => x);
    expect((e2 as Error).message).toMatch(/\(ENOSPC, .*\); nothing was written$/);
    expect(await readdir(d)).toEqual([]);
  });
  it('a folder that cannot be created is a file error naming the target; errors of the fill itself pass through', async () => {
    const blocker = tmp('blocker');
    await writeFile(blocker, 'a file, not a folder');
    const e = await writeSafetensors(path.join(blocker, 'sub', 'x.safetensors'), {}).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(SdtuneError);
    expect((e as Error).message).toMatch(/^cannot write .*blocker\/sub\/x\.safetensors: .*\((ENOTDIR|EEXIST)\); nothing was written$/);
    const enoent = Object.assign(new Error('ENOENT: no such file or directory, open \'src\''), { code: 'ENOENT', syscall: 'open' });
    await expect(withAtomicFile(tmp('pass.bin'), () => Promise.reject(enoent))).rejects.toBe(enoent); // a source file's problem, not the target's
  });
});

describeGolden('safetensors golden files', () => {
  it('diffusers UNet header and a known tensor', async () => {
    const f = await SafetensorsFile.open(golden('tiny-sd', 'unet', 'diffusion_pytorch_model.safetensors'));
    try {
      expect(f.tensors.size).toBeGreaterThan(0);
      expect(f.info('conv_in.weight')).toMatchObject({ dtype: 'F32', shape: [32, 4, 3, 3] });
      const t = await f.read('conv_in.weight');
      expect(t.data).toBeInstanceOf(Float32Array);
      expect(t.data.length).toBe(32 * 4 * 9);
      expect(t.data.every(Number.isFinite)).toBe(true);
    } finally {
      await f.close();
    }
  });

  it('F16 widening equals the F32 file rounded to f16', async () => {
    const key = 'model.diffusion_model.input_blocks.0.0.weight';
    const [a, b] = await Promise.all([SafetensorsFile.open(golden('tiny-sd.safetensors')), SafetensorsFile.open(golden('tiny-sd-fp16.safetensors'))]);
    try {
      const full = await a.read(key);
      const half = await b.read(key);
      expect(half.dtype).toBe('F16');
      expect(half.shape).toEqual(full.shape);
      expect(half.data).toEqual(f16BitsToF32(f32ToF16Bits(full.data as Float32Array)));
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });

  it('tokenizer case tensors read as Int32Array', async () => {
    const f = await SafetensorsFile.open(golden('cases', 'tokenizer.safetensors'));
    try {
      const all = await f.readAll();
      expect(all.size).toBeGreaterThan(0);
      for (const t of all.values()) expect(t.data).toBeInstanceOf(Int32Array);
    } finally {
      await f.close();
    }
  });
});
