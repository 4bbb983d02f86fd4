// EMA of the trainable weights: golden parity with diffusers' EMAModel (train_full_step's ema_* fields), the decay
// schedule against diffusers' formulas computed by hand, leaks, and the host round trip of the state.
import * as tf from '@tensorflow/tfjs';
import { describe, expect, it } from 'vitest';
import { EMA_DEFAULTS, createEma, disposeEma, emaDecay, emaStateFromHost, emaStateToHost, emaStep } from '../../src/train/ema.js';
import { caseTensors, describeGolden, goldenCase } from '../golden.js';
import { maxAbsDiff, rawTensor } from '../helpers.js';

type Raw = Awaited<ReturnType<typeof caseTensors>>;
const fromCase = (t: Raw, prefix: string, names: string[]) =>
  new Map(names.map((n) => { const r = rawTensor(t.get(`${prefix}/${n}`), `${prefix}/${n}`); return [n, tf.tensor(r.data as Float32Array, r.shape)] as [string, tf.Tensor]; }));
const disposeAll = (m: Map<string, tf.Tensor>) => m.forEach((t) => t.dispose());

describeGolden('EMA golden parity (diffusers EMAModel)', () => {
  it('train_full_step: ema_k1 / k100 / k10000 / warmup_k100 from the recorded pre-step params and AdamW results', async () => {
    const c = goldenCase('train_full_step');
    const atol = (c.tolerance as { atol_ema_from_recorded_params: number }).atol_ema_from_recorded_params;
    const names = c.subset_param_names as string[];
    const decays = c.ema_decays as Record<string, { optimization_step_after: number; decay_used: number; use_ema_warmup?: boolean; inv_gamma?: number; power?: number }>;
    expect(Object.keys(decays).length).toBeGreaterThan(0);
    const t = await caseTensors('train_full_step');
    const pre = fromCase(t, 'param', names);
    const post = fromCase(t, 'adamw_new', names);
    for (const [tag, d] of Object.entries(decays)) {
      const ema = createEma(pre, { decay: 0.999, useEmaWarmup: d.use_ema_warmup ?? false, invGamma: d.inv_gamma ?? 1, power: d.power ?? 2 / 3 });
      ema.optimizationStep = d.optimization_step_after - 1; // as the case sets ema.optimization_step before step()
      const used = emaStep(ema, post);
      expect(ema.optimizationStep).toBe(d.optimization_step_after);
      expect(used).toBeCloseTo(d.decay_used, 15);
      let worst = 0;
      for (const n of names) worst = Math.max(worst, maxAbsDiff(await ema.shadow.get(n)!.data(), rawTensor(t.get(`ema_${tag}/${n}`), n).data));
      console.log(`EMA ${tag}: decay ${used}, max |shadow - ref| ${worst.toExponential(2)} (atol ${atol})`);
      expect(worst).toBeLessThanOrEqual(atol);
      disposeEma(ema);
    }
    disposeAll(pre);
    disposeAll(post);
  });
});

describe('emaDecay (diffusers EMAModel.get_decay)', () => {
  const o = { ...EMA_DEFAULTS, decay: 0.999 };
  it('ramps (1 + s)/(10 + s) with s = step - 1, capped at decay; the first step copies', () => {
    expect(emaDecay(o, 0)).toBe(0);
    expect(emaDecay(o, 1)).toBe(0);
    expect(emaDecay(o, 2)).toBeCloseTo(2 / 11, 15);
    expect(emaDecay(o, 100)).toBeCloseTo(100 / 109, 15);
    expect(emaDecay(o, 990)).toBeCloseTo(990 / 999, 15); // 0.99099 < 0.999
    expect(emaDecay(o, 10000)).toBe(0.999); // 10000/10009 = 0.99910 > 0.999
  });
  it('update_after_step delays the ramp: s = step - update_after_step - 1', () => {
    const u = { ...o, updateAfterStep: 5 };
    for (let k = 1; k <= 6; k++) expect(emaDecay(u, k)).toBe(0);
    expect(emaDecay(u, 7)).toBeCloseTo(2 / 11, 15);
    expect(emaDecay(u, 105)).toBeCloseTo(100 / 109, 15);
  });
  it('warmup: 1 - (1 + s/inv_gamma)^-power', () => {
    const w = { ...o, useEmaWarmup: true, invGamma: 1, power: 2 / 3 };
    expect(emaDecay(w, 1)).toBe(0);
    expect(emaDecay(w, 100)).toBeCloseTo(1 - 100 ** (-2 / 3), 15); // 0.95358411...
    expect(emaDecay(w, 100)).toBeCloseTo(0.9535841116638722, 12);
    const w2 = { ...w, invGamma: 10, power: 0.75 };
    expect(emaDecay(w2, 11)).toBeCloseTo(1 - 2 ** -0.75, 15); // s = 10: 0.40539644...
    expect(emaDecay({ ...w, updateAfterStep: 3 }, 5)).toBeCloseTo(1 - 2 ** (-2 / 3), 15); // s = 1
    expect(emaDecay(w, 1e7)).toBe(0.999); // capped
  });
  it('min_decay floors the decay once updates start, but not the copying steps', () => {
    const m = { ...o, minDecay: 0.5 };
    expect(emaDecay(m, 1)).toBe(0);
    expect(emaDecay(m, 2)).toBe(0.5); // 2/11 floored
    expect(emaDecay(m, 100)).toBeCloseTo(100 / 109, 15);
  });
});

describe('createEma / emaStep', () => {
  it('steps as s -= (1 - decay)(s - p) with the step count incremented first, and leaks no tensors', () => {
    const before = tf.memory().numTensors;
    const p = tf.tidy(() => tf.variable(tf.tensor1d([1, 2, 3])));
    const params = new Map<string, tf.Tensor>([['w', p]]);
    const ema = createEma(params, { decay: 0.25 });
    expect(ema.optimizationStep).toBe(0);
    tf.tidy(() => p.assign(tf.tensor1d([3, 4, 5])));
    const shadowRef = [1, 2, 3];
    const pRef = [3, 4, 5];
    const steps: number[] = [];
    tf.tidy(() => {
      for (let k = 1; k <= 4; k++) {
        const n0 = tf.memory().numTensors;
        const d = emaStep(ema, params);
        expect(tf.memory().numTensors).toBe(n0);
        steps.push(d);
        for (let i = 0; i < 3; i++) shadowRef[i] -= (1 - d) * (shadowRef[i] - pRef[i]);
      }
    });
    expect(steps[0]).toBe(0);
    expect(steps[1]).toBeCloseTo(2 / 11, 15);
    expect(steps[2]).toBeCloseTo(3 / 12, 15);
    expect(steps[3]).toBe(0.25); // 4/13 capped at decay
    expect(ema.lastDecay).toBe(steps[3]);
    expect(ema.optimizationStep).toBe(4);
    // the shadow survived the enclosing tidy and matches the hand computation
    expect(maxAbsDiff(ema.shadow.get('w')!.dataSync(), shadowRef)).toBeLessThan(1e-6);
    disposeEma(ema);
    p.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
  it('refuses to step without one of its params', () => {
    const a = tf.zeros([2]);
    const ema = createEma(new Map([['a', a]]));
    expect(() => emaStep(ema, new Map())).toThrow(/no parameter a/);
    disposeEma(ema);
    a.dispose();
  });
  it('rejects bad options as format errors', () => {
    expect(() => createEma(new Map(), { decay: 1.5 })).toThrow(/decay/);
    expect(() => createEma(new Map(), { updateAfterStep: -1 })).toThrow(/update_after_step/);
  });
});

describe('emaStateToHost / emaStateFromHost', () => {
  it('round trips: a restored state continues exactly like the original', async () => {
    const before = tf.memory().numTensors;
    const p = tf.tidy(() => tf.variable(tf.tensor2d([[1, -2], [0.5, 4]])));
    const params = new Map<string, tf.Tensor>([['w', p]]);
    const a = createEma(params, { decay: 0.99, updateAfterStep: 1, useEmaWarmup: true });
    tf.tidy(() => p.assign(tf.tensor2d([[2, 0], [1, 1]])));
    for (let k = 0; k < 3; k++) emaStep(a, params);
    const host = await emaStateToHost(a);
    expect([...host.tensors.keys()]).toEqual(['ema/w']);
    const b = emaStateFromHost(host, params);
    expect(b.optimizationStep).toBe(3);
    expect(b.opts).toEqual(a.opts);
    tf.tidy(() => p.assign(tf.tensor2d([[-1, 3], [2, 2]])));
    expect(emaStep(a, params)).toBe(emaStep(b, params));
    expect(Array.from(b.shadow.get('w')!.dataSync())).toEqual(Array.from(a.shadow.get('w')!.dataSync()));
    disposeEma(a);
    disposeEma(b);
    p.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
  it('restores strictly: wrong shape, unknown or missing shadows are format errors naming the key', () => {
    const before = tf.memory().numTensors;
    const p = tf.zeros([2, 2]);
    const params = new Map<string, tf.Tensor>([['w', p]]);
    const h = (tensors: [string, number[]][]) => ({
      optimizationStep: 1,
      opts: { ...EMA_DEFAULTS },
      tensors: new Map(tensors.map(([k, shape]) => [k, { shape, data: new Float32Array(shape.reduce((x, y) => x * y, 1)) }])),
    });
    expect(() => emaStateFromHost(h([['ema/w', [4]]]), params)).toThrow(/ema\/w has shape \[4\]/);
    expect(() => emaStateFromHost(h([['ema/w', [2, 2]], ['ema/x', [1]]]), params)).toThrow(/ema\/x belongs to no/);
    expect(() => emaStateFromHost(h([]), params)).toThrow(/missing ema\/w/);
    expect(() => emaStateFromHost(h([['w', [2, 2]]]), params)).toThrow(/unexpected tensor w/);
    expect(() => emaStateFromHost({ ...h([['ema/w', [2, 2]]]), optimizationStep: -1 }, params)).toThrow(/optimization_step/);
    p.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});
