import { describe, expect, it } from 'vitest';
import { TorchGenerator, batchGenerators, fmaf, randnNHWC, randomSeed } from '../../src/runtime/rng.js';
import { caseTensors, describeGolden, goldenCase } from '../golden.js';

const round4 = (a: ArrayLike<number>) => Array.from(a, (v) => Math.round(v * 1e4) / 1e4);

describe('TorchGenerator (no golden data)', () => {
  it('mt19937 reference output for seed 5489 and seed 0', () => {
    const g = new TorchGenerator(5489);
    expect([g.nextU32(), g.nextU32(), g.nextU32()]).toEqual([3499211612, 581869302, 3890346734]);
    for (let i = 3; i < 9999; i++) g.nextU32();
    expect(g.nextU32()).toBe(4123659995); // the C++ standard's check: 10000th output of default mt19937
    const z = new TorchGenerator(0);
    expect([z.nextU32(), z.nextU32()]).toEqual([0x8c7f0aac, 0x97c4aa2f]);
  });

  it('seeds: uint64 low 32 bits, negatives wrap, non-integers rejected', () => {
    const words = (s: number | bigint) => { const g = new TorchGenerator(s); return [g.nextU32(), g.nextU32()]; };
    expect(words(7n + (1n << 32n))).toEqual(words(7));
    expect(words(-1)).toEqual(words(0xffffffff));
    expect(new TorchGenerator(-1).initialSeed()).toBe((1n << 64n) - 1n);
    expect(() => new TorchGenerator(1.5)).toThrow(/integer/);
    expect(() => new TorchGenerator(1n << 64n)).toThrow(/outside/);
  });

  it('spec §7 test vectors', () => {
    const g = new TorchGenerator(0);
    expect(g.rand([1])[0]).toBe(0.49625658988952637);
    expect(round4(g.manualSeed(0).randn([4]))).toEqual([1.541, -0.2934, -2.1788, 0.5684]);
    expect(round4(g.manualSeed(0).randn([3]))).toEqual([1.541, -0.2934, -2.1788]);
    expect(round4(g.randn([1]))).toEqual([0.5684]); // the cached second normal of the scalar path
    expect(round4(g.manualSeed(0).randn([4, 4]))).toEqual([
      -1.1258, -1.1524, -0.2506, -0.4339, 0.8487, 0.692, -0.316, -2.1152, 0.3223, -1.2633, 0.35, 0.3081, 0.1198, 1.2377, 1.1168, -0.2473,
    ]);
    expect(round4(g.manualSeed(0).randn([17]))).toEqual([
      -1.1258, -1.6959, 0.5667, 0.7935, 0.5988, -1.5551, -0.3414, 1.853, 0.4681, -0.5855, -0.1734, 0.1835, 1.3894, 1.5863, 0.9463, -0.8437, 0.9318,
    ]);
    const x = g.manualSeed(42).randn([1, 4, 64, 64]);
    expect(round4(x.subarray(0, 8))).toEqual([1.9269, 1.4873, 0.9007, -2.1055, 0.6784, -1.2345, -0.0431, -1.6047]);
    expect(round4(x.subarray(-2))).toEqual([0.9728, -0.2934]);
  });

  it('state save/restore continues the identical sequence (incl. the cached normal)', () => {
    const g = new TorchGenerator(123);
    g.randn([700]);
    g.randn([3]); // leaves a cached normal
    const s = JSON.parse(JSON.stringify(g.getState()));
    const a = [g.randn([1]), g.randn([5]), g.rand([1000]), g.randint(0, 1000, [7])];
    const h = new TorchGenerator(1);
    h.setState(s);
    expect([h.randn([1]), h.randn([5]), h.rand([1000]), h.randint(0, 1000, [7])]).toEqual(a);
    expect(h.initialSeed()).toBe(123n);
    expect(() => h.setState({ ...s, mt: [1, 2] })).toThrow(/invalid/);
  });

  it('randint = low + random() % range', () => {
    const g = new TorchGenerator(3), w = new TorchGenerator(3);
    const r = g.randint(-5, 995, [100]);
    for (let i = 0; i < 100; i++) expect(r[i]).toBe(-5 + (w.nextU32() % 1000));
    expect(() => g.randint(3, 3, [1])).toThrow();
    const h = new TorchGenerator(4), v = new TorchGenerator(4); // range 2^32: torch uses random64(), i.e. two words
    expect(h.randint(-(2 ** 31), 2 ** 31, [3])).toEqual(Int32Array.from([0, 1, 2], () => (v.nextU32(), v.nextU32() - 2 ** 31)));
  });

  it('fmaf rounds once even where float64 then float32 would double-round', () => {
    const a = Math.fround(1 + 2 ** -12); // a*a = 1 + 2^-11 + 2^-24: exactly a float32 midpoint
    expect(fmaf(a, a, 2 ** -80)).toBe(1 + 2 ** -11 + 2 ** -23); // Math.fround(a*a + c) would give 1 + 2^-11
    expect(fmaf(a, a, -(2 ** -80))).toBe(1 + 2 ** -11);
    expect(fmaf(a, a, 0)).toBe(1 + 2 ** -11); // a true tie: to even
    expect(fmaf(3, 5, 0.25)).toBe(15.25);
  });

  it('randnNHWC equals the transposed NCHW draw; batchGenerators / randomSeed', () => {
    const ref = new TorchGenerator(9).randn([2, 4, 5, 6]);
    const t = randnNHWC(new TorchGenerator(9), [2, 4, 5, 6]);
    expect(t.shape).toEqual([2, 5, 6, 4]);
    const got = t.transpose([0, 3, 1, 2]).dataSync();
    t.dispose();
    expect(Array.from(got)).toEqual(Array.from(ref));
    const gens = batchGenerators(100, 3);
    expect(gens.map((g) => g.initialSeed())).toEqual([100n, 101n, 102n]);
    expect(gens[2].randn([4])).toEqual(new TorchGenerator(102).randn([4]));
    const s = randomSeed();
    expect(Number.isInteger(s) && s >= 0 && s < 2 ** 32).toBe(true);
  });
});

describeGolden('TorchGenerator vs torch 2.13 (golden torch_rng)', () => {
  it('every entry is bit-exact', async () => {
    const c = goldenCase('torch_rng');
    const ref = await caseTensors('torch_rng');
    const entries = c.entries as { key: string; seed?: number; shape?: number[]; how: string }[];
    let total = 0, same = 0, maxErr = 0, checked = 0;
    const cmp = (key: string, got: Float32Array) => {
      const r = ref.get(key);
      if (!r) throw new Error(`golden tensor ${key} missing`);
      expect(got.length, key).toBe(r.data.length);
      for (let i = 0; i < got.length; i++) {
        const d = Math.abs(got[i] - r.data[i]);
        maxErr = Math.max(maxErr, d);
        if (Object.is(got[i], r.data[i])) same++;
      }
      total += got.length;
      checked++;
    };
    for (const e of entries) {
      if (e.key.startsWith('randn_')) cmp(e.key, new TorchGenerator(e.seed!).randn(e.shape!));
      else if (e.key.startsWith('gen_')) {
        const m = /^gen_seed(\d+)_draw_/.exec(e.key)!;
        const g = new TorchGenerator(Number(m[1]));
        const pre = `gen_seed${m[1]}_draw_`;
        for (const p of ['a', 'b', 'c']) cmp(pre + p, g.randn(ref.get(pre + p)!.shape));
      } else if (e.key === 'rand_seed0_1x4x8x8') cmp(e.key, new TorchGenerator(0).rand([1, 4, 8, 8]));
      else throw new Error(`unhandled golden entry ${e.key}: ${e.how}`);
    }
    console.log(`torch_rng: ${checked} tensors, ${same}/${total} values bit-identical, max abs error ${maxErr}`);
    expect(maxErr).toBeLessThanOrEqual(1e-6);
    expect(same).toBe(total);
  });
});
