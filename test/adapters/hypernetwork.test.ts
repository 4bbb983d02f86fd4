// A1111 hypernetworks without the golden model: structure rules, activations, the residual forward, validation,
// creation (init and draw order), our safetensors form (round trip; the golden file's metadata text when present),
// gradients through the UNet (central differences; gradient checkpointing; dropout replay), and LoRA dropout.
import * as tf from '@tensorflow/tfjs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type Hypernetwork,
  type HypernetworkData,
  HYPERNETWORK_ACTIVATIONS,
  createHypernetwork,
  defaultDropoutStructure,
  disposeHypernetwork,
  hypernetworkAdapter,
  hypernetworkData,
  hypernetworkEntries,
  hypernetworkModule,
  hypernetworkName,
  hypernetworkTensors,
  loadHypernetwork,
  readHypernetwork,
  readHypernetworkSafetensors,
  resolveHypernetworkMeta,
  writeHypernetworkPt,
  writeHypernetworkSafetensors,
} from '../../src/adapters/hypernetwork.js';
import { injectLora, loraTargetModules } from '../../src/adapters/lora-inject.js';
import { SdtuneError } from '../../src/errors.js';
import type { HostTensor } from '../../src/io/layout.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { randomParams } from '../../src/models/build.js';
import { type Forward, dropout } from '../../src/models/layers.js';
import { disposeParams } from '../../src/models/params.js';
import { unet, unetParamShapes } from '../../src/models/unet.js';
import { scheduleFromConfig } from '../../src/schedulers/schedule.js';
import { diffusionLoss } from '../../src/train/loss.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { HAVE_GOLDEN, golden } from '../golden.js';
import { TINY_UNET, maxAbsDiff } from '../helpers.js';

const meta = (m: Parameters<typeof resolveHypernetworkMeta>[0]) => resolveHypernetworkMeta(m);
const kinds = (m: Parameters<typeof resolveHypernetworkMeta>[0], d = 8) => hypernetworkEntries(meta(m), d).map((e) => (e.kind === 'activation' ? e.name : e.kind === 'dropout' ? `dropout ${e.p}` : e.kind));

describe('hypernetwork structure (A1111 rules)', () => {
  it('meta defaults on load: [1, 2, 1], no activation, activate_output true, no dropout', () => {
    expect(meta({})).toMatchObject({ layer_structure: [1, 2, 1], activation_func: null, is_layer_norm: false, weight_initialization: 'Normal', use_dropout: false, dropout_structure: [0, 0, 0], activate_output: true });
  });

  it('activation after every Linear but the last unless activate_output; layer norm after each; dropout by structure', () => {
    expect(kinds({ activation_func: 'relu', activate_output: false })).toEqual(['linear', 'relu', 'linear']);
    expect(kinds({ activation_func: 'relu', activate_output: true })).toEqual(['linear', 'relu', 'linear', 'relu']);
    expect(kinds({ activation_func: 'linear' })).toEqual(['linear', 'linear']);
    expect(kinds({ activation_func: 'swish', is_layer_norm: true, activate_output: false })).toEqual(['linear', 'swish', 'norm', 'linear', 'norm']);
    expect(kinds({ layer_structure: [1, 2, 2, 1], activation_func: 'relu', use_dropout: true, activate_output: false })).toEqual(['linear', 'relu', 'dropout 0.3', 'linear', 'relu', 'linear']);
    expect(kinds({ layer_structure: [1, 2, 2, 1], activation_func: 'relu', use_dropout: true, last_layer_dropout: true, activate_output: false })).toEqual(['linear', 'relu', 'dropout 0.3', 'linear', 'relu', 'dropout 0.3', 'linear']);
    // the entry index counts parameter-less entries (the state-dict keys skip them)
    expect(hypernetworkEntries(meta({ activation_func: 'relu', activate_output: false }), 8).filter((e) => e.kind === 'linear').map((e) => e.index)).toEqual([0, 2]);
  });

  it('dropout_structure: derived (A1111 parse_dropout_structure), and a non-zero one forces use_dropout', () => {
    expect(defaultDropoutStructure([1, 2, 1], false, true)).toEqual([0, 0, 0]);
    expect(defaultDropoutStructure([1, 2, 1], true, false)).toEqual([0, 0, 0]);
    expect(defaultDropoutStructure([1, 2, 1], true, true)).toEqual([0, 0.3, 0]);
    expect(defaultDropoutStructure([1, 2, 2, 1], true, false)).toEqual([0, 0.3, 0, 0]);
    expect(defaultDropoutStructure([1, 2, 2, 2, 1], true, true)).toEqual([0, 0.3, 0.3, 0.3, 0]);
    expect(meta({ dropout_structure: [0, 0.1, 0], use_dropout: false }).use_dropout).toBe(true);
    expect(kinds({ dropout_structure: [0, 0.1, 0] })).toEqual(['linear', 'dropout 0.1', 'linear']);
  });

  it('layer widths are int(d * s) (toward zero)', () => {
    const e = hypernetworkEntries(meta({ layer_structure: [1, 1.5, 0.7, 1] }), 5);
    expect(e.filter((x) => x.kind === 'linear').map((x) => x.kind === 'linear' && [x.inDim, x.outDim])).toEqual([[5, 7], [7, 3], [3, 5]]);
  });

  it('refuses bad meta with the key named', () => {
    expect(() => meta({ layer_structure: [2, 1] })).toThrow(/layer_structure must be/);
    expect(() => meta({ activation_func: 'glu' })).toThrow(/activation_func "glu" is not supported/);
    expect(() => meta({ weight_initialization: 'Orthogonal' })).toThrow(/weight_initialization must be one of/);
    expect(() => meta({ dropout_structure: [0, 1] })).toThrow(/dropout_structure must be 3 probabilities/);
    expect(() => meta({ is_layer_norm: 'yes' as unknown as boolean })).toThrow(/is_layer_norm must be true or false/);
  });
});

/** A hand-made state dict: Linear weights [out, in] of small deterministic values. */
function stateDict(m: ReturnType<typeof meta>, d: number, seed: number): Map<string, HostTensor> {
  const g = new TorchGenerator(seed);
  const out = new Map<string, HostTensor>();
  for (const e of hypernetworkEntries(m, d)) {
    if (e.kind === 'linear') {
      out.set(`linear.${e.index}.weight`, { shape: [e.outDim, e.inDim], data: Float32Array.from(g.randn([e.outDim * e.inDim]), (v) => v * 0.3) });
      out.set(`linear.${e.index}.bias`, { shape: [e.outDim], data: Float32Array.from(g.randn([e.outDim]), (v) => v * 0.1) });
    } else if (e.kind === 'norm') {
      out.set(`linear.${e.index}.weight`, { shape: [e.dim], data: Float32Array.from(g.randn([e.dim]), (v) => 1 + 0.1 * v) });
      out.set(`linear.${e.index}.bias`, { shape: [e.dim], data: Float32Array.from(g.randn([e.dim]), (v) => 0.1 * v) });
    }
  }
  return out;
}

/** The module's forward in plain JS (torch semantics), one row at a time. */
function referenceModule(sd: Map<string, HostTensor>, m: ReturnType<typeof meta>, d: number, x: Float32Array, strength: number, act: (v: number) => number): Float32Array {
  const out = new Float32Array(x.length);
  for (let r = 0; r < x.length / d; r++) {
    let h = Array.from(x.subarray(r * d, (r + 1) * d));
    for (const e of hypernetworkEntries(m, d)) {
      if (e.kind === 'linear') {
        const w = sd.get(`linear.${e.index}.weight`)!.data;
        const b = sd.get(`linear.${e.index}.bias`)!.data;
        h = Array.from({ length: e.outDim }, (_, o) => h.reduce((s, v, i) => s + v * w[o * e.inDim + i], b[o]));
      } else if (e.kind === 'norm') {
        const mean = h.reduce((a, b) => a + b, 0) / h.length;
        const v = h.reduce((a, b) => a + (b - mean) ** 2, 0) / h.length;
        const w = sd.get(`linear.${e.index}.weight`)!.data;
        const b = sd.get(`linear.${e.index}.bias`)!.data;
        h = h.map((z, i) => ((z - mean) / Math.sqrt(v + 1e-5)) * w[i] + b[i]);
      } else if (e.kind === 'activation') h = h.map(act);
    }
    for (let i = 0; i < d; i++) out[r * d + i] = x[r * d + i] + h[i] * strength;
  }
  return out;
}

const ACT_REF: Record<string, (v: number) => number> = {
  relu: (v) => Math.max(0, v),
  leakyrelu: (v) => (v >= 0 ? v : 0.01 * v),
  elu: (v) => (v > 0 ? v : Math.expm1(v)),
  swish: (v) => (v * Math.min(Math.max(v + 3, 0), 6)) / 6, // A1111's "swish" is torch Hardswish
  tanh: Math.tanh,
  sigmoid: (v) => 1 / (1 + Math.exp(-v)),
  selu: (v) => 1.0507009873554805 * (v > 0 ? v : 1.6732632423543772 * Math.expm1(v)),
  softsign: (v) => v / (1 + Math.abs(v)),
  mish: (v) => v * Math.tanh(Math.log1p(Math.exp(v))),
  hardsigmoid: (v) => Math.min(Math.max(v + 3, 0), 6) / 6,
  hardshrink: (v) => (Math.abs(v) > 0.5 ? v : 0),
  softshrink: (v) => (v > 0.5 ? v - 0.5 : v < -0.5 ? v + 0.5 : 0),
  tanhshrink: (v) => v - Math.tanh(v),
  logsigmoid: (v) => -Math.log1p(Math.exp(-v)),
  rrelu: (v) => (v >= 0 ? v : ((1 / 8 + 1 / 3) / 2) * v), // eval mode: the mean slope
};

describe('hypernetwork forward: x + MLP(x) * strength', () => {
  for (const [act, ref] of Object.entries(ACT_REF)) {
    it(`${act}, layer norm, activate_output, strength 0.7`, async () => {
      expect(HYPERNETWORK_ACTIVATIONS).toContain(act);
      const m = meta({ layer_structure: [1, 1.5, 1], activation_func: act, is_layer_norm: act === 'tanh', activate_output: true });
      const d = 6;
      const sd = stateDict(m, d, 11);
      const net = loadHypernetwork({ meta: m, layers: new Map([[d, [sd, sd]]]) });
      const xData = Float32Array.from(new TorchGenerator(3).randn([2 * 3 * d]), (v) => 2 * v);
      const x = tf.tensor3d(xData, [2, 3, d]);
      const y = hypernetworkModule(net.layers.get(d)![0], hypernetworkEntries(net.meta, d), x, 0.7);
      expect(maxAbsDiff(await y.data(), referenceModule(sd, m, d, xData, 0.7, ref))).toBeLessThan(2e-5);
      tf.dispose([x, y]);
      disposeHypernetwork(net);
    });
  }

  it('training: the multiplier is 1 (A1111), dropout acts only while training and draws from the generator', async () => {
    const m = meta({ activation_func: 'relu', dropout_structure: [0, 0.5, 0], activate_output: false });
    const sd = stateDict(m, 4, 2);
    const net = loadHypernetwork({ meta: m, layers: new Map([[4, [sd, sd]]]) });
    const [k] = net.layers.get(4)!;
    const e = hypernetworkEntries(net.meta, 4);
    const x = tf.tensor3d(Float32Array.from(new TorchGenerator(1).randn([1 * 50 * 4])), [1, 50, 4]);
    const at = async (s: number, f: Forward) => {
      const y = hypernetworkModule(k, e, x, s, f);
      const d = (await y.data()) as Float32Array;
      y.dispose();
      return d;
    };
    const eval1 = await at(1, {});
    expect(maxAbsDiff(eval1, await at(1, { rng: new TorchGenerator(5) }))).toBe(0); // not training: no dropout
    const t1 = await at(0.25, { training: true, rng: new TorchGenerator(5) });
    const t2 = await at(0.25, { training: true, rng: new TorchGenerator(5) });
    expect(maxAbsDiff(t1, t2)).toBe(0); // same seed, same masks
    expect(maxAbsDiff(t1, await at(0.25, { training: true, rng: new TorchGenerator(6) }))).toBeGreaterThan(1e-3);
    expect(maxAbsDiff(t1, eval1)).toBeGreaterThan(1e-3);
    expect(() => hypernetworkModule(k, e, x, 1, { training: true })).toThrow(/needs a random generator/);
    x.dispose();
    disposeHypernetwork(net);
  });
});

describe('dropout', () => {
  it('inverted dropout: ~p of the elements zeroed, the rest scaled by 1/(1-p); identity unless training', async () => {
    const x = tf.ones([100, 100]);
    const y = dropout(x, 0.3, { training: true, rng: new TorchGenerator(0) });
    const d = (await y.data()) as Float32Array;
    const zeros = d.filter((v) => v === 0).length;
    expect(zeros / d.length).toBeGreaterThan(0.28);
    expect(zeros / d.length).toBeLessThan(0.32);
    expect(d.filter((v) => v !== 0).every((v) => Math.abs(v - 1 / 0.7) < 1e-6)).toBe(true);
    expect(dropout(x, 0.3, { rng: new TorchGenerator(0) })).toBe(x);
    expect(dropout(x, 0, { training: true })).toBe(x);
    expect(() => dropout(x, 1, { training: true, rng: new TorchGenerator(0) })).toThrow(/\[0, 1\)/);
    tf.dispose([x, y]);
  });
});

describe('loadHypernetwork validation', () => {
  const m = meta({ activation_func: 'relu', activate_output: false });
  const data = (edit: (sd: Map<string, HostTensor>) => void): HypernetworkData => {
    const sd = stateDict(m, 4, 1);
    edit(sd);
    return { meta: m, layers: new Map([[4, [stateDict(m, 4, 1), sd]]]) };
  };
  it('missing, unexpected and mis-shaped keys fail naming the key, width and module', () => {
    expect(() => loadHypernetwork(data((sd) => sd.delete('linear.2.bias')), 'x.pt')).toThrow('x.pt: width 4 v module: missing key linear.2.bias [4]');
    expect(() => loadHypernetwork(data((sd) => sd.set('linear.3.weight', { shape: [4, 4], data: new Float32Array(16) })), 'x.pt')).toThrow(/width 4 v module: unexpected key linear.3.weight/);
    expect(() => loadHypernetwork(data((sd) => sd.set('linear.0.weight', { shape: [8, 3], data: new Float32Array(24) })), 'x.pt')).toThrow('x.pt: width 4 v module: linear.0.weight has shape [8,3], expected [8,4]');
    expect(() => loadHypernetwork({ meta: m, layers: new Map() }, 'x.pt')).toThrow(/no layers/);
  });
  it('very old files: linear1 / linear2 are linear.0 / linear.1 (two Linear layers, no activation)', () => {
    const old = meta({});
    const sd = new Map<string, HostTensor>([
      ['linear1.weight', { shape: [8, 4], data: new Float32Array(32).fill(0.1) }],
      ['linear1.bias', { shape: [8], data: new Float32Array(8) }],
      ['linear2.weight', { shape: [4, 8], data: new Float32Array(32).fill(0.1) }],
      ['linear2.bias', { shape: [4], data: new Float32Array(4) }],
    ]);
    const net = loadHypernetwork({ meta: {}, layers: new Map([[4, [sd, sd]]]) });
    expect(hypernetworkEntries(old, 4).map((e) => e.kind)).toEqual(['linear', 'linear']);
    expect(Object.keys(net.layers.get(4)![0].linear as object)).toEqual(['0', '1']);
    disposeHypernetwork(net);
  });
});

describe('createHypernetwork (A1111 init)', () => {
  it('Normal: weights N(0, 0.01) in A1111 order (width by width, k then v, layer by layer, each bias drawn too), biases 0', async () => {
    const net = createHypernetwork({ widths: [4, 6], activation_func: 'relu', gen: new TorchGenerator(42) });
    expect(net.meta).toMatchObject({ activate_output: false, use_dropout: false, last_layer_dropout: false, step: 0 });
    const data = await hypernetworkData(net);
    const g = new TorchGenerator(42);
    for (const d of [4, 6]) {
      for (const j of [0, 1]) {
        const sd = data.layers.get(d)![j];
        for (const [w, b] of [['linear.0.weight', 'linear.0.bias'], ['linear.2.weight', 'linear.2.bias']]) {
          const wt = sd.get(w)!;
          const want = Float32Array.from(g.randn([wt.data.length]), (v) => Math.fround(v * Math.fround(0.01)));
          g.randn([sd.get(b)!.data.length]);
          expect(maxAbsDiff(wt.data, want), `${d}.${j}.${w}`).toBeLessThan(1e-9);
          expect(Array.from(sd.get(b)!.data).every((v) => v === 0)).toBe(true);
        }
      }
    }
    expect(hypernetworkTensors(net).every((t) => t instanceof tf.Variable && t.trainable)).toBe(true);
    expect(hypernetworkTensors(net)).toHaveLength(16);
    disposeHypernetwork(net);
  });

  it('Xavier / Kaiming: bounded (uniform) or scaled (normal) weights, zero biases; layer norm weights stay Normal', async () => {
    const fi = 64, fo = 128;
    for (const [init, check] of [
      ['XavierUniform', (w: Float32Array) => Math.max(...w.map(Math.abs)) <= Math.sqrt(6 / (fi + fo)) && Math.max(...w.map(Math.abs)) > 0.9 * Math.sqrt(6 / (fi + fo))],
      ['KaimingUniform', (w: Float32Array) => Math.max(...w.map(Math.abs)) <= Math.sqrt(2) * Math.sqrt(3 / fi) && Math.max(...w.map(Math.abs)) > 0.9 * Math.sqrt(2) * Math.sqrt(3 / fi)],
      ['XavierNormal', (w: Float32Array) => Math.abs(Math.sqrt(w.reduce((a, v) => a + v * v, 0) / w.length) / Math.sqrt(2 / (fi + fo)) - 1) < 0.05],
      ['KaimingNormal', (w: Float32Array) => Math.abs(Math.sqrt(w.reduce((a, v) => a + v * v, 0) / w.length) / (Math.sqrt(2) / Math.sqrt(fi)) - 1) < 0.05],
    ] as const) {
      const net = createHypernetwork({ widths: [fi], weight_initialization: init, is_layer_norm: true, gen: new TorchGenerator(1) });
      const sd = (await hypernetworkData(net)).layers.get(fi)![0];
      expect(check(sd.get('linear.0.weight')!.data as Float32Array), init).toBe(true);
      expect(Array.from(sd.get('linear.0.bias')!.data).every((v) => v === 0)).toBe(true);
      const ln = sd.get('linear.1.weight')!.data as Float32Array; // LayerNorm: N(0, 0.01) whatever the init (A1111)
      expect(Math.sqrt(ln.reduce((a, v) => a + v * v, 0) / ln.length)).toBeLessThan(0.02);
      disposeHypernetwork(net);
    }
  });
});

describe('our safetensors form', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'sdtune-hn-'));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it('round trip: meta and every tensor; the metadata as the golden file writes it', async () => {
    const net = createHypernetwork({ widths: [8, 12], layer_structure: [1, 1.5, 1], activation_func: 'leakyrelu', is_layer_norm: true, use_dropout: true, name: 'mine', gen: new TorchGenerator(3) });
    const data = await hypernetworkData(net);
    const file = path.join(dir, 'mine.safetensors');
    await writeHypernetworkSafetensors(file, data);
    const back = await readHypernetworkSafetensors(file);
    expect(resolveHypernetworkMeta(back.meta)).toEqual(net.meta);
    for (const [d, pair] of data.layers) pair.forEach((sd, j) => { for (const [k, t] of sd) expect(Array.from(back.layers.get(d)![j].get(k)!.data), `${d}.${j}.${k}`).toEqual(Array.from(t.data)); });
    const f = await SafetensorsFile.open(file);
    expect(f.keys()).toContain('12.1.linear.0.weight');
    expect(f.metadata).toMatchObject({ layer_structure: '[1, 1.5, 1]', activation_func: 'leakyrelu', is_layer_norm: 'true', dropout_structure: '[0, 0.3, 0]', name: 'mine', sd_checkpoint: 'null' });
    await f.close();
    const loaded = await readHypernetwork(file);
    expect(hypernetworkName(file)).toBe('mine');
    disposeHypernetwork(loaded);
    disposeHypernetwork(net);
  });

  it.skipIf(!HAVE_GOLDEN)('the golden tiny_hypernet.safetensors written back: identical metadata text and tensors', async () => {
    const src = golden('hypernetwork', 'tiny_hypernet.safetensors');
    const net = await readHypernetwork(src);
    const file = path.join(dir, 'tiny_hypernet.safetensors');
    await writeHypernetworkSafetensors(file, await hypernetworkData(net));
    const [a, b] = [await SafetensorsFile.open(src), await SafetensorsFile.open(file)];
    expect(b.metadata).toEqual(a.metadata);
    expect(b.keys().sort()).toEqual(a.keys().sort());
    for (const k of a.keys()) expect(Array.from((await b.readFloat(k)).data), k).toEqual(Array.from((await a.readFloat(k)).data));
    await Promise.all([a.close(), b.close()]);
    disposeHypernetwork(net);
  });

  it.skipIf(!HAVE_GOLDEN)('A1111 .pt files read as data: the torch-written golden file and our own writer\'s equal the safetensors form', async () => {
    const ref = await readHypernetwork(golden('hypernetwork', 'tiny_hypernet.safetensors'));
    const refData = await hypernetworkData(ref);
    const ours = path.join(dir, 'ours.pt');
    await writeHypernetworkPt(ours, refData);
    for (const file of [golden('pickle', 'hypernetwork-a1111.pt'), ours]) {
      const net = await readHypernetwork(file);
      const d = await hypernetworkData(net);
      expect(d.meta, file).toEqual(refData.meta);
      expect([...d.layers.keys()], file).toEqual([...refData.layers.keys()]);
      for (const [w, [k, v]] of refData.layers) {
        for (const [i, m] of [k, v].entries()) {
          for (const [key, t] of m) expect(Array.from(d.layers.get(w)![i].get(key)!.data), `${file} ${w} ${key}`).toEqual(Array.from(t.data));
        }
      }
      disposeHypernetwork(net);
    }
    disposeHypernetwork(ref);
  });

  it('refuses foreign keys and files that are not hypernetworks, with clear errors', async () => {
    await expect(readHypernetwork(path.join(dir, 'x.pt'))).rejects.toThrow(/x\.pt/);
    await expect(readHypernetwork(path.join(dir, 'x.txt'))).rejects.toThrow(SdtuneError);
    if (HAVE_GOLDEN) await expect(readHypernetwork(golden('pickle', 'embedding-a1111.pt'))).rejects.toThrow(/not an A1111 hypernetwork/);
  });
});

describe('training through the UNet', () => {
  // TINY_UNET: self-attention width 32 (outer blocks), cross-attention context width 16
  let params: ReturnType<typeof randomParams>;
  let net: Hypernetwork;
  const x = () => tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 7) as tf.Tensor4D;
  const ctx = () => tf.randomNormal([1, 5, 16], 0, 1, 'float32', 8) as tf.Tensor3D;
  const weights = () => tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 9);
  beforeAll(() => {
    params = randomParams(unetParamShapes(TINY_UNET), 1);
    net = createHypernetwork({ widths: [16, 32], activation_func: 'tanh', weight_initialization: 'XavierNormal', gen: new TorchGenerator(4) });
  });
  afterAll(() => {
    disposeParams(params);
    disposeHypernetwork(net);
  });
  const lossWith = (o: Parameters<typeof unet>[5], xs: tf.Tensor4D, c: tf.Tensor3D, w: tf.Tensor) => () => tf.sum(tf.mul(unet(params, TINY_UNET, xs, 321, c, o), w)) as tf.Scalar;

  it('gradients of the hypernetwork weights match central differences', async () => {
    const [xs, c, w] = [x(), ctx(), weights()];
    const adapter = hypernetworkAdapter([{ net }]);
    const vars = hypernetworkTensors(net) as tf.Variable[];
    const { grads, value } = tf.variableGrads(lossWith({ context: adapter }, xs, c, w), vars);
    value.dispose();
    // a few elements of H_k (width 16, cross-attention) and H_v (width 32, self-attention) weights
    const picks: [tf.Variable, number][] = [
      [net.layers.get(16)![0].linear!['0' as never]['weight' as never] as tf.Variable, 5],
      [net.layers.get(16)![1].linear!['2' as never]['bias' as never] as tf.Variable, 3],
      [net.layers.get(32)![1].linear!['0' as never]['weight' as never] as tf.Variable, 100],
      [net.layers.get(32)![0].linear!['2' as never]['weight' as never] as tf.Variable, 7],
    ];
    for (const [v, i] of picks) {
      const g = (await grads[v.name].data())[i];
      const orig = (await v.data()) as Float32Array;
      const at = (delta: number) => {
        const d = orig.slice();
        d[i] += delta;
        v.assign(tf.tensor(d, v.shape));
        return tf.tidy(() => lossWith({ context: adapter }, xs, c, w)().dataSync()[0]);
      };
      const h = 1e-2;
      const numeric = (at(h) - at(-h)) / (2 * h);
      v.assign(tf.tensor(orig, v.shape));
      console.log(`hypernetwork grad ${v.name} [${i}]: analytic ${g.toExponential(4)}, central difference ${numeric.toExponential(4)}`);
      expect(Math.abs(g)).toBeGreaterThan(1e-4); // the element matters
      expect(Math.abs(g - numeric)).toBeLessThan(2e-2 * Math.abs(g) + 1e-4);
    }
    tf.dispose([xs, c, w, ...Object.values(grads)]);
  });

  it('gradient checkpointing gives the same gradients, with dropout too (the recomputation replays the masks)', async () => {
    const dnet = createHypernetwork({ widths: [16, 32], activation_func: 'relu', layer_structure: [1, 2, 2, 1], use_dropout: true, last_layer_dropout: true, weight_initialization: 'XavierNormal', gen: new TorchGenerator(4) });
    const modules = loraTargetModules(params, 'unet', 'attn+ff+conv');
    const lora = [...injectLora(params, modules, { rank: 2, alpha: 2, gen: new TorchGenerator(2) }).values()];
    lora.forEach((v, i) => v.name.includes('lora_up') && tf.tidy(() => v.assign(tf.randomNormal(v.shape, 0, 0.2, 'float32', 50 + i))));
    const [xs, c, w] = [x(), ctx(), weights()];
    const vars = [...hypernetworkTensors(dnet), ...lora] as tf.Variable[];
    const adapter = hypernetworkAdapter([{ net: dnet }]);
    const grads = async (o: Parameters<typeof unet>[5]) => {
      const { grads: g, value } = tf.variableGrads(lossWith({ context: adapter, ...o }, xs, c, w), vars);
      const out = await Promise.all(vars.map(async (v) => (await g[v.name].data()) as Float32Array));
      tf.dispose([value, ...Object.values(g)]);
      return out;
    };
    const maxDiff = (a: Float32Array[], b: Float32Array[]) => Math.max(...a.map((t, i) => maxAbsDiff(t, b[i])));
    const scale = (a: Float32Array[]) => Math.max(...a.map((t) => Math.max(...t.map(Math.abs))));
    const plain = await grads({});
    expect(maxDiff(plain, await grads({ gradientCheckpointing: 'all' }))).toBeLessThan(1e-5 * scale(plain));
    const train = (ck: boolean) => grads({ training: true, rng: new TorchGenerator(77), loraDropout: 0.25, gradientCheckpointing: ck ? 'all' : false });
    const t0 = await train(false);
    expect(maxDiff(t0, plain)).toBeGreaterThan(1e-3 * scale(plain)); // dropout changed the step
    expect(maxDiff(t0, await train(false))).toBe(0); // same seed, same masks
    expect(maxDiff(t0, await train(true))).toBeLessThan(1e-5 * scale(t0));
    tf.dispose([xs, c, w]);
    disposeHypernetwork(dnet);
  });

  it('diffusionLoss passes the forward options: a hypernetwork changes the loss and receives its gradient', () => {
    const [xs, c] = [x(), ctx()];
    const batch = { latents: xs, noise: tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 3) as tf.Tensor4D, timesteps: Int32Array.of(500), context: c };
    const schedule = scheduleFromConfig();
    const loss = (forward?: Forward) => () => diffusionLoss(params, TINY_UNET, schedule, batch, { predictionType: 'epsilon', forward });
    const plain = tf.tidy(() => loss()().dataSync()[0]);
    const vars = hypernetworkTensors(net) as tf.Variable[];
    const { value, grads } = tf.variableGrads(loss({ context: hypernetworkAdapter([{ net }]), training: true, rng: new TorchGenerator(1) }), vars);
    expect(Math.abs(value.dataSync()[0] - plain)).toBeGreaterThan(1e-4);
    expect(vars.every((v) => grads[v.name].dataSync().some((g) => g !== 0))).toBe(true);
    tf.dispose([value, ...Object.values(grads), xs, c, batch.noise]);
  });

  it('LoRA dropout acts only while training; a forward leaks nothing', async () => {
    const [xs, c] = [x(), ctx()];
    const before = tf.memory().numTensors;
    const run = (o: Parameters<typeof unet>[5]) => tf.tidy(() => unet(params, TINY_UNET, xs, 321, c, o).dataSync());
    const base = run({});
    expect(maxAbsDiff(base, run({ loraDropout: 0.5, rng: new TorchGenerator(1) }))).toBe(0);
    expect(maxAbsDiff(base, run({ loraDropout: 0.5, training: true, rng: new TorchGenerator(1) }))).toBeGreaterThan(1e-4);
    expect(maxAbsDiff(base, run({ loraDropout: 0, training: true, rng: new TorchGenerator(1) }))).toBe(0);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([xs, c]);
  });
});
