// Unit tests of the layers and networks on tiny random models: no reference data needed (runs on a fresh clone).
import * as tf from '@tensorflow/tfjs';
import { afterAll, describe, expect, it } from 'vitest';
import { tensorFromTorch, tensorToTorch, torchToTfLayout, tfToTorchLayout } from '../../src/io/layout.js';
import { randomParams } from '../../src/models/build.js';
import { clipText, clipTextParamShapes } from '../../src/models/clip-text.js';
import { measurePeak } from '../../src/runtime/memory.js';
import { attention, groupNorm, setAttentionChunkElements, getAttentionChunkElements, setDeviceMaxTensorElements, timestepEmbedding } from '../../src/models/layers.js';
import { countParams, disposeParams, flattenParams } from '../../src/models/params.js';
import { unet, unetParamShapes } from '../../src/models/unet.js';
import { vaeDecode, vaeEncode, vaeParamShapes } from '../../src/models/vae.js';
import { TINY_CLIP, TINY_UNET, TINY_VAE, maxAbsDiff } from '../helpers.js';

const UNET = TINY_UNET;
const VAE = TINY_VAE;
const CLIP = TINY_CLIP;

describe('layout conversion', () => {
  it('torch <-> tf round trips conv and linear weights and keeps embeddings', async () => {
    const conv = { shape: [2, 3, 1, 2], data: Float32Array.from({ length: 12 }, (_, i) => i) };
    const c = torchToTfLayout('x.conv.weight', conv);
    expect(c.shape).toEqual([1, 2, 3, 2]);
    // element [o=1,i=2,h=0,w=1] (torch) lands at [h=0,w=1,i=2,o=1] (tf)
    expect(c.data[((0 * 2 + 1) * 3 + 2) * 2 + 1]).toBe(conv.data[((1 * 3 + 2) * 1 + 0) * 2 + 1]);
    expect(Array.from(tfToTorchLayout('x.conv.weight', c).data)).toEqual(Array.from(conv.data));
    const lin = { shape: [2, 3], data: Float32Array.from([1, 2, 3, 4, 5, 6]) };
    expect(Array.from(torchToTfLayout('a.to_q.weight', lin).data)).toEqual([1, 4, 2, 5, 3, 6]);
    expect(torchToTfLayout('text_model.embeddings.token_embedding.weight', lin)).toBe(lin);
    const t = tensorFromTorch('a.to_q.weight', lin);
    expect(Array.from((await tensorToTorch('a.to_q.weight', t)).data)).toEqual([1, 2, 3, 4, 5, 6]);
    t.dispose();
  });
});

describe('layers', () => {
  it('groupNorm equals a direct computation', () => {
    const x = tf.randomNormal([2, 3, 5, 8], 0, 2, 'float32', 1) as tf.Tensor4D;
    const p = { weight: tf.linspace(0.5, 1.5, 8), bias: tf.linspace(-1, 1, 8) };
    const y = groupNorm(p, x, 4, 1e-5).dataSync();
    const xs = x.dataSync();
    const w = p.weight.dataSync();
    const b = p.bias.dataSync();
    const expected = new Float32Array(xs.length);
    for (let n = 0; n < 2; n++) {
      for (let g = 0; g < 4; g++) {
        const idx: number[] = [];
        for (let s = 0; s < 15; s++) for (let c = g * 2; c < g * 2 + 2; c++) idx.push(n * 120 + s * 8 + c);
        const mean = idx.reduce((a, i) => a + xs[i], 0) / idx.length;
        const v = idx.reduce((a, i) => a + (xs[i] - mean) ** 2, 0) / idx.length;
        for (const i of idx) expected[i] = ((xs[i] - mean) / Math.sqrt(v + 1e-5)) * w[i % 8] + b[i % 8];
      }
    }
    expect(maxAbsDiff(y, expected)).toBeLessThan(1e-5);
    tf.dispose([x, p.weight, p.bias]);
  });

  it('timestep embedding follows diffusers get_timestep_embedding', () => {
    const e = timestepEmbedding(tf.tensor1d([0, 10, 999]), 8, true, 1).arraySync();
    const half = 4;
    for (const [r, t] of [0, 10, 999].entries()) {
      for (let i = 0; i < half; i++) {
        const f = Math.exp((-Math.log(10000) * i) / (half - 1));
        expect(e[r][i]).toBeCloseTo(Math.cos(t * f), 4); // flipped: cos first
        expect(e[r][half + i]).toBeCloseTo(Math.sin(t * f), 4);
      }
    }
  });

  it('chunked attention equals unchunked attention (with a mask)', () => {
    const q = tf.randomNormal([2, 10, 8], 0, 1, 'float32', 2) as tf.Tensor3D;
    const k = tf.randomNormal([2, 6, 8], 0, 1, 'float32', 3) as tf.Tensor3D;
    const v = tf.randomNormal([2, 6, 8], 0, 1, 'float32', 4) as tf.Tensor3D;
    const mask = tf.where(tf.less(tf.randomUniform([10, 6], 0, 1, 'float32', 5), 0.3), tf.fill([10, 6], -1e9), tf.zeros([10, 6])) as tf.Tensor2D;
    const full = attention(q, k, v, 2, mask).dataSync();
    const saved = getAttentionChunkElements();
    setAttentionChunkElements(2 * 2 * 6 * 3); // 3 query rows at a time
    try {
      expect(maxAbsDiff(attention(q, k, v, 2, mask).dataSync(), full)).toBeLessThan(1e-6);
    } finally {
      setAttentionChunkElements(saved);
    }
  });

  it('a device cap below one row of every head chunks over batch*head groups too, and wins over a larger request', async () => {
    const q = tf.randomNormal([2, 10, 8], 0, 1, 'float32', 6) as tf.Tensor3D;
    const k = tf.randomNormal([2, 6, 8], 0, 1, 'float32', 7) as tf.Tensor3D;
    const v = tf.randomNormal([2, 6, 8], 0, 1, 'float32', 8) as tf.Tensor3D;
    const full = attention(q, k, v, 2).dataSync();
    try {
      setDeviceMaxTensorElements(6 * 3); // below one row of every head (b*heads*keys = 24): 3 heads x 1 row at a time
      expect(getAttentionChunkElements()).toBe(18);
      let chunked: Float32Array | undefined;
      const prof = await tf.profile(() => {
        chunked = attention(q, k, v, 2).dataSync() as Float32Array;
      });
      expect(maxAbsDiff(chunked!, full)).toBeLessThan(1e-6);
      const mm = prof.kernels.filter((kn) => kn.name === 'BatchMatMul').map((kn) => (kn.outputShapes[0] as number[]).reduce((a, b) => a * b, 1));
      expect(mm.length).toBe(2 * 10 * 2); // 2 head groups (3 + 1) x 10 one-row chunks x (scores, output)
      expect(Math.max(...mm)).toBeLessThanOrEqual(18); // every scores / output tensor within the cap
    } finally {
      setDeviceMaxTensorElements(Infinity);
    }
    expect(getAttentionChunkElements()).toBe(32 * 1024 * 1024);
  });

  it("chunking bounds the memory: each chunk's scores are freed before the next (peak unique bytes)", async () => {
    const [b, n, c, heads] = [1, 512, 8, 2];
    const [q, k, v] = [9, 10, 11].map((s) => tf.randomNormal([b, n, c], 0, 1, 'float32', s) as tf.Tensor3D);
    const peak = async () => (await measurePeak(() => tf.tidy(() => void attention(q, k, v, heads)))).peakBytes;
    const scores = b * heads * n * n * 4; // 2 MiB
    const saved = getAttentionChunkElements();
    try {
      expect(await peak()).toBeGreaterThanOrEqual(2 * scores); // whole: scores and softmax
      setAttentionChunkElements(b * heads * n * 16); // 16 query rows of both heads at a time: 1/32 of the scores
      expect(await peak()).toBeLessThan(scores / 2);
    } finally {
      setAttentionChunkElements(saved);
      tf.dispose([q, k, v]);
    }
  });
});

describe('networks on tiny random weights', () => {
  const pu = randomParams(unetParamShapes(UNET), 1);
  const pv = randomParams(vaeParamShapes(VAE), 2);
  const pc = randomParams(clipTextParamShapes(CLIP), 3);
  afterAll(() => [pu, pv, pc].forEach(disposeParams));

  it('param trees have exactly the spec keys', () => {
    expect([...flattenParams(pu).keys()].sort()).toEqual([...unetParamShapes(UNET).keys()].sort());
    expect(countParams(pc)).toBe([...clipTextParamShapes(CLIP).values()].reduce((a, s) => a + s.reduce((x, y) => x * y, 1), 0));
  });

  it('unet handles non-square latents and odd sizes, and leaks no tensors', () => {
    const ctx = tf.randomNormal([2, 5, 16]) as tf.Tensor3D;
    const ts = tf.tensor1d([10, 900]);
    for (const [h, w] of [[8, 12], [6, 10], [5, 7]]) {
      const x = tf.randomNormal([2, h, w, 4]) as tf.Tensor4D;
      const before = tf.memory().numTensors;
      const y = unet(pu, UNET, x, ts, ctx);
      expect(y.shape).toEqual([2, h, w, 4]);
      expect(Array.from(y.dataSync()).every(Number.isFinite)).toBe(true);
      y.dispose();
      expect(tf.memory().numTensors).toBe(before);
      tf.dispose(x);
    }
    tf.dispose([ts, ctx]);
  });

  it('unet output depends on the timestep and on the context', () => {
    const x = tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 7) as tf.Tensor4D;
    const c1 = tf.randomNormal([1, 5, 16], 0, 1, 'float32', 8) as tf.Tensor3D;
    const c2 = tf.randomNormal([1, 5, 16], 0, 1, 'float32', 9) as tf.Tensor3D;
    const a = unet(pu, UNET, x, 10, c1).dataSync();
    expect(maxAbsDiff(a, unet(pu, UNET, x, 800, c1).dataSync())).toBeGreaterThan(1e-3);
    expect(maxAbsDiff(a, unet(pu, UNET, x, 10, c2).dataSync())).toBeGreaterThan(1e-3);
    expect(maxAbsDiff(a, unet(pu, UNET, x, 10, c1).dataSync())).toBe(0); // deterministic
  });

  it('vae encode/decode shapes, std = exp(logvar/2), no leaks', () => {
    const img = tf.randomUniform([1, 16, 24, 3], -1, 1) as tf.Tensor4D;
    const before = tf.memory().numTensors;
    const d = vaeEncode(pv, VAE, img);
    expect(d.mean.shape).toEqual([1, 8, 12, 4]);
    expect(maxAbsDiff(d.std.dataSync(), tf.tidy(() => tf.exp(tf.mul(d.logvar, 0.5))).dataSync())).toBeLessThan(1e-6);
    const out = vaeDecode(pv, VAE, d.mean);
    expect(out.shape).toEqual([1, 16, 24, 3]);
    tf.dispose([d.mean, d.std, d.logvar, out]);
    expect(tf.memory().numTensors).toBe(before + 1); // the tf.exp(...) check above
  });

  it('clip: causal (a later token does not change earlier outputs), clip skip, pooled at first EOS', () => {
    const a = tf.tensor2d([[1, 5, 7, 99, 99, 99]], undefined, 'int32');
    const b = tf.tensor2d([[1, 5, 8, 99, 99, 99]], undefined, 'int32');
    const oa = clipText(pc, CLIP, a);
    const ob = clipText(pc, CLIP, b);
    const ha = oa.hidden.arraySync()[0];
    const hb = ob.hidden.arraySync()[0];
    expect(maxAbsDiff(ha[1], hb[1])).toBe(0);
    expect(maxAbsDiff(ha[2], hb[2])).toBeGreaterThan(1e-4);
    expect(maxAbsDiff(oa.pooled.arraySync()[0], ha[3])).toBe(0);
    const s2 = clipText(pc, CLIP, a, { clipSkip: 2 });
    expect(maxAbsDiff(s2.hidden.dataSync(), oa.hidden.dataSync())).toBeGreaterThan(1e-4);
    expect(() => clipText(pc, CLIP, a, { clipSkip: 3 })).toThrow(/clip skip/);
  });
});
