// AdamW and gradient clipping: golden parity with torch.optim.AdamW / clip_grad_norm_, hand computations, leaks,
// host round trip of the state.
import * as tf from '@tensorflow/tfjs';
import { describe, expect, it } from 'vitest';
import {
  adamwStateFromHost,
  adamwStateToHost,
  adamwStep,
  clipCoefficient,
  clipGradNorm,
  createAdamW,
  disposeAdamW,
} from '../../src/train/optim.js';
import { caseTensors, describeGolden, goldenCase } from '../golden.js';
import { maxAbsDiff, rawTensor } from '../helpers.js';

const OPTS = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 1e-2 };
type Raw = Awaited<ReturnType<typeof caseTensors>>;

/** Variables param/<name> and tensors grad/<name> of a golden case. */
function paramsAndGrads(t: Raw, names: string[], gradScale = 1) {
  const params = new Map<string, tf.Variable>();
  const grads = new Map<string, tf.Tensor>();
  for (const n of names) {
    const p = rawTensor(t.get(`param/${n}`), `param/${n}`);
    const g = rawTensor(t.get(`grad/${n}`), `grad/${n}`);
    params.set(n, tf.variable(tf.tensor(p.data as Float32Array, p.shape)));
    grads.set(n, gradScale === 1 ? tf.tensor(g.data as Float32Array, g.shape) : tf.tidy(() => tf.tensor(g.data as Float32Array, g.shape).mul(gradScale)));
  }
  return { params, grads };
}
const disposeAll = (...maps: Map<string, tf.Tensor>[]) => maps.forEach((m) => m.forEach((t) => t.dispose()));
const worst = (got: Map<string, tf.Tensor>, t: Raw, prefix: string) =>
  Math.max(...[...got].map(([n, x]) => maxAbsDiff(x.dataSync(), rawTensor(t.get(`${prefix}/${n}`), n).data as Float32Array)));

describeGolden('AdamW golden parity', () => {
  it('train_lora_step: one step from the recorded params and grads matches torch within atol_adamw', async () => {
    const c = goldenCase('train_lora_step');
    const atol = (c.tolerance as { atol_adamw: number }).atol_adamw;
    const names = c.lora_param_names as string[];
    const t = await caseTensors('train_lora_step');
    const { params, grads } = paramsAndGrads(t, names);
    const state = createAdamW(params);
    adamwStep(state, params, grads, OPTS);
    expect(state.step).toBe(1);
    expect(worst(params, t, 'adamw_new')).toBeLessThanOrEqual(atol);
    // and it really moved: first Adam step is ~lr per element
    expect(maxAbsDiff(params.get(names[0])!.dataSync(), rawTensor(t.get(`param/${names[0]}`), names[0]).data as Float32Array)).toBeGreaterThan(5e-4);
    disposeAdamW(state);
    disposeAll(params, grads);
  });

  it('train_full_step: new params, exp_avg and exp_avg_sq, and the clipped (max_norm 1) variant', async () => {
    const c = goldenCase('train_full_step');
    const atol = (c.tolerance as { atol_adamw_from_recorded_grads: number }).atol_adamw_from_recorded_grads;
    const names = c.subset_param_names as string[];
    const t = await caseTensors('train_full_step');
    const opts = { ...OPTS, lr: 1e-5 };

    const plain = paramsAndGrads(t, names);
    const state = createAdamW(plain.params);
    adamwStep(state, plain.params, plain.grads, opts);
    expect(worst(plain.params, t, 'adamw_new')).toBeLessThanOrEqual(atol);
    expect(worst(state.m, t, 'adamw_exp_avg')).toBeLessThanOrEqual(1e-9);
    expect(worst(state.v, t, 'adamw_exp_avg_sq')).toBeLessThanOrEqual(1e-12);
    disposeAdamW(state);
    disposeAll(plain.params, plain.grads);

    // the global norm is over all 3.2M UNet grads, so take it from the case: the coefficient must match torch's
    const norm = c.global_grad_norm as number;
    const coef = clipCoefficient(norm, 1);
    expect(coef).toBe(rawTensor(t.get('clip_coef_max_norm1'), 'clip_coef_max_norm1').data[0]);
    const clipped = paramsAndGrads(t, names, coef);
    const s2 = createAdamW(clipped.params);
    adamwStep(s2, clipped.params, clipped.grads, opts);
    expect(worst(clipped.params, t, 'adamw_clip1_new')).toBeLessThanOrEqual(atol);
    disposeAdamW(s2);
    disposeAll(clipped.params, clipped.grads);
  });
});

describe('adamwStep', () => {
  it('two steps match the formula computed by hand (bias corrections, decoupled decay, per-param lr)', () => {
    const params = new Map([['a', tf.variable(tf.tensor1d([0.5, -1]))], ['b', tf.variable(tf.tensor1d([2]))]]);
    const state = createAdamW(params);
    const steps = [new Map([['a', [0.1, -0.2]], ['b', [3]]]), new Map([['a', [-0.3, 0.05]], ['b', [1]]])];
    const lrFor = (n: string) => (n === 'b' ? 0.1 : 0.01);
    // reference in float64
    const ref = { a: [0.5, -1], b: [2] } as Record<string, number[]>;
    const m = { a: [0, 0], b: [0] } as Record<string, number[]>;
    const v = { a: [0, 0], b: [0] } as Record<string, number[]>;
    steps.forEach((gs, i) => {
      const t = i + 1;
      for (const [n, g] of gs) {
        const lr = lrFor(n);
        ref[n] = ref[n].map((p, j) => {
          m[n][j] = 0.9 * m[n][j] + 0.1 * g[j];
          v[n][j] = 0.999 * v[n][j] + 0.001 * g[j] * g[j];
          const denom = Math.sqrt(v[n][j]) / Math.sqrt(1 - 0.999 ** t) + 1e-8;
          return p * (1 - lr * 0.05) - (lr / (1 - 0.9 ** t)) * (m[n][j] / denom);
        });
      }
      const grads = new Map([...gs].map(([n, g]) => [n, tf.tensor1d(g)] as const));
      adamwStep(state, params, grads, { ...OPTS, lr: 123, weightDecay: 0.05, lrFor });
      disposeAll(grads);
    });
    expect(state.step).toBe(2);
    for (const n of ['a', 'b']) {
      const got = params.get(n)!.dataSync();
      ref[n].forEach((x, j) => expect(got[j]).toBeCloseTo(x, 6));
    }
    disposeAdamW(state);
    disposeAll(params);
  });

  it('leaks no tensors, leaves params without a gradient untouched, and its state survives an enclosing tidy', () => {
    const params = new Map([['w', tf.variable(tf.ones([4, 3]))], ['frozen', tf.variable(tf.ones([2]))]]);
    const state = createAdamW(params);
    const grads = new Map([['w', tf.fill([4, 3], 0.5)]]);
    const before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) tf.tidy(() => adamwStep(state, params, grads, OPTS));
    expect(tf.memory().numTensors).toBe(before);
    expect(state.m.get('w')!.isDisposed).toBe(false);
    expect([...params.get('frozen')!.dataSync()]).toEqual([1, 1]);
    expect(() => adamwStep(state, params, new Map([['nope', grads.get('w')!]]), OPTS)).toThrow(/nope/);
    disposeAdamW(state);
    disposeAll(params, grads);
  });
});

describe('clipGradNorm', () => {
  const grads = () => new Map<string, tf.Tensor>([['a', tf.tensor1d([3, 4])], ['b', tf.tensor2d([[12]])]]); // norms 5 and 12: total 13

  it('scales by max_norm / (total + 1e-6) when over the limit, as torch clip_grad_norm_', async () => {
    const g = grads();
    const before = tf.memory().numTensors;
    const r = await clipGradNorm(g, 1);
    expect(tf.memory().numTensors).toBe(before + 2); // only the two new grads
    expect(r.totalNorm).toBeCloseTo(13, 5);
    const coef = 1 / (13 + 1e-6);
    expect(r.grads.get('a')!.dataSync()[1]).toBeCloseTo(4 * coef, 7);
    expect(r.grads.get('b')!.dataSync()[0]).toBeCloseTo(12 * coef, 7);
    disposeAll(g, r.grads);
  });

  it('leaves grads unchanged under the limit or when disabled (0), still reporting the norm', async () => {
    for (const maxNorm of [100, 0]) {
      const g = grads();
      const r = await clipGradNorm(g, maxNorm);
      expect(r.totalNorm).toBeCloseTo(13, 5);
      expect([...r.grads.get('a')!.dataSync()]).toEqual([3, 4]);
      expect(r.grads.get('a')).not.toBe(g.get('a'));
      disposeAll(g, r.grads);
    }
    expect(clipCoefficient(0.5, 1)).toBe(1);
  });
});

describe('optimizer state on the host', () => {
  it('round trips: a restored state continues exactly like the original', async () => {
    const mk = () => new Map([['w', tf.variable(tf.tensor2d([[1, -2], [0.5, 3]]))]]);
    const g = new Map([['w', tf.tensor2d([[0.1, 0.2], [-0.3, 0.4]])]]);
    const p1 = mk();
    const s1 = createAdamW(p1);
    adamwStep(s1, p1, g, OPTS);
    adamwStep(s1, p1, g, OPTS);
    const host = await adamwStateToHost(s1);
    expect(host.step).toBe(2);
    expect([...host.tensors.keys()].sort()).toEqual(['exp_avg/w', 'exp_avg_sq/w']);

    const p2 = mk();
    p2.get('w')!.assign(p1.get('w')!);
    const s2 = adamwStateFromHost(host, p2);
    adamwStep(s1, p1, g, OPTS);
    adamwStep(s2, p2, g, OPTS);
    expect([...p2.get('w')!.dataSync()]).toEqual([...p1.get('w')!.dataSync()]);
    expect(s2.step).toBe(3);
    disposeAdamW(s1);
    disposeAdamW(s2);
    disposeAll(p1, p2, g);
  });

  it('restores strictly: wrong shape, unknown or missing moments are format errors naming the key', () => {
    const params = new Map([['w', tf.variable(tf.zeros([2, 2]))]]);
    const t = (shape: number[]) => ({ shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) });
    const before = tf.memory().numTensors;
    const cases: [Map<string, ReturnType<typeof t>>, RegExp][] = [
      [new Map([['exp_avg/w', t([4])], ['exp_avg_sq/w', t([2, 2])]]), /exp_avg\/w has shape \[4\] but the parameter has \[2,2\]/],
      [new Map([['exp_avg/w', t([2, 2])]]), /missing exp_avg_sq\/w/],
      [new Map([['exp_avg/w', t([2, 2])], ['exp_avg_sq/w', t([2, 2])], ['exp_avg/x', t([1])]]), /exp_avg\/x belongs to no trainable parameter/],
      [new Map([['momentum/w', t([2, 2])]]), /unexpected tensor momentum\/w/],
    ];
    for (const [tensors, re] of cases) {
      expect(() => adamwStateFromHost({ step: 1, tensors }, params)).toThrow(re);
      try {
        adamwStateFromHost({ step: 1, tensors }, params);
      } catch (e) {
        expect((e as { kind: string }).kind).toBe('format');
      }
    }
    expect(tf.memory().numTensors).toBe(before);
    disposeAll(params);
  });
});
