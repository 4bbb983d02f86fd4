// Prompt editing, alternation and AND through generate() on the bundled tiny model, against a hand-written sampler
// loop whose conditioning is chosen per step by hand; and the A1111 batch encoding (emphasis means over a schedule).
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { generate } from '../../src/infer/pipeline.js';
import { MAX_AND_PARTS, PromptConditioning, emphasizeBatch, encodeBatch } from '../../src/infer/prompt-schedule.js';
import { encodeChunks, encodePromptPair } from '../../src/infer/prompt.js';
import { unet } from '../../src/models/unet.js';
import { TorchGenerator, randnNHWC } from '../../src/runtime/rng.js';
import { disposeState, initialState, planSampler, scaleModelInput, step } from '../../src/schedulers/index.js';
import { chunkPrompt } from '../../src/tokenizer/prompt.js';
import { maxAbsDiff } from '../helpers.js';

const TINY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../checkpoints/tiny-sd-v1');
const SIZE = 64;
const SEED = 3;
const NEG = 'blurry';

let m: LoadedModel;
beforeAll(async () => {
  m = await loadModel(TINY);
});
afterAll(() => disposeModel(m));

/** Latents after every step of generate() (euler, deterministic). */
async function trajectory(prompt: string, steps: number, cfg: number): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  await generate(m, { prompt, negativePrompt: NEG, steps, cfg, sampler: 'euler', seed: SEED, width: SIZE, height: SIZE, onStep: (_i, _n, x) => out.push(x.dataSync().slice() as Float32Array) });
  return out;
}

/**
 * The sampler loop written out, with the conditioning of call i given by hand: `texts(i)` lists [text, weight] per
 * sub-prompt; eps = u + Σ (c_j − u)·(w_j·cfg).
 */
async function manual(texts: (i: number) => [string, number][], steps: number, cfg: number): Promise<Float32Array[]> {
  const un = m.unet!;
  const plan = planSampler('euler', m.schedulerConfig, steps);
  const enc = new Map<string, tf.Tensor3D>();
  const cond = (t: string) => {
    if (!enc.has(t)) enc.set(t, encodePromptPair(m.textEncoder!, m.tokenizer!, t, NEG).cond);
    return enc.get(t)!;
  };
  const uncond = encodePromptPair(m.textEncoder!, m.tokenizer!, 'x', NEG).uncond;
  let x = tf.tidy(() => tf.mul(randnNHWC(new TorchGenerator(SEED), [1, 4, SIZE / 8, SIZE / 8]), plan.initNoiseSigma) as tf.Tensor4D);
  let state = initialState(plan);
  const out: Float32Array[] = [];
  for (let i = 0; i < plan.timesteps.length; i++) {
    const parts = texts(i);
    const conds = parts.map(([t]) => cond(t)); // encoded outside the tidy: they are cached across steps
    const eps = tf.tidy(() => {
      const inp = scaleModelInput(plan, state, tf.concat(Array.from({ length: parts.length + 1 }, () => x), 0), i) as tf.Tensor4D;
      const ctx = tf.concat([uncond, ...conds], 0) as tf.Tensor3D;
      const o = tf.split(unet(un.params, un.config, inp, plan.timesteps[i]!, ctx), parts.length + 1, 0);
      return parts.reduce((acc: tf.Tensor, [, w], j) => tf.add(acc, tf.mul(tf.sub(o[j + 1]!, o[0]!), w * cfg)), o[0]!);
    });
    const r = step(plan, state, eps, i, x);
    eps.dispose();
    r.predOriginal.dispose();
    disposeState(state);
    state = r.state;
    x.dispose();
    x = r.prevSample as tf.Tensor4D;
    out.push(x.dataSync().slice() as Float32Array);
  }
  disposeState(state);
  x.dispose();
  tf.dispose([uncond, ...enc.values()]);
  return out;
}

const worst = (a: Float32Array[], b: Float32Array[]) => Math.max(...a.map((v, i) => maxAbsDiff(v, b[i]!)));

describe('per-step conditioning in generate() (tiny model, euler)', () => {
  it('[a cat:a dog:0.5] over 4 steps = "a cat" for sampler calls 0..2, then "a dog" (A1111 counts calls from 0)', async () => {
    const ours = await trajectory('[a cat:a dog:0.5]', 4, 5);
    const ref = await manual((i) => [[i <= 2 ? 'a cat' : 'a dog', 1]], 4, 5);
    const err = worst(ours, ref);
    console.log(`prompt editing: max |ours − hand-switched| over 4 steps ${err.toExponential(2)}`);
    expect(err).toBeLessThanOrEqual(1e-6);
    // and it really switched: the last latents differ from a run that stays on "a cat"
    const cat = await trajectory('a cat', 4, 5);
    expect(maxAbsDiff(ours[2]!, cat[2]!)).toBeLessThanOrEqual(1e-6);
    expect(maxAbsDiff(ours[3]!, cat[3]!)).toBeGreaterThan(1e-3);
  });

  it('[a cat|a dog] alternates: calls 0,1,2,3 use cat, cat, dog, cat', async () => {
    const ours = await trajectory('[a cat|a dog]', 4, 5);
    const ref = await manual((i) => [[['a cat', 'a cat', 'a dog', 'a cat'][i]!, 1]], 4, 5);
    expect(worst(ours, ref)).toBeLessThanOrEqual(1e-6);
  });

  it('AND: uncond + Σ (c_j − uncond)·w_j·cfg, with the weights after ":"', async () => {
    const ours = await trajectory('a cat :1.2 AND a dog :0.8', 3, 4);
    const ref = await manual(() => [['a cat', 1.2], ['a dog', 0.8]], 3, 4);
    expect(worst(ours, ref)).toBeLessThanOrEqual(1e-6);
    // one sub-prompt of weight w at cfg s is plain sampling at cfg w·s, bit for bit; weight 1 is the plain prompt
    expect(worst(await trajectory('a cat :0.5', 3, 4), await trajectory('a cat', 3, 2))).toBe(0);
    expect(worst(await trajectory('a cat :1', 3, 4), await trajectory('a cat', 3, 4))).toBe(0);
  });

  it('each distinct text is encoded once; contexts are cached per combination', () => {
    const c = new PromptConditioning(m.textEncoder!, m.tokenizer!, { prompt: "[a cat|a dog] AND[a cat|a dog] :0.5", negativePrompt: '[x:y:0.5]', steps: 30, cfg: 7 });
    try {
      // sub-prompts with the same text share one schedule: cat, dog; negative: x, y
      expect(c.tensors.length).toBe(4);
      expect(c.rows).toBe(3);
      expect(c.conds.map((p) => p.weight)).toEqual([1, 0.5]);
      const a = c.at(0, 2);
      expect(a.ctx.shape).toEqual([6, 77, 32]);
      expect(c.at(0, 2)).toBe(a);
      expect(c.indicesAt(0)).toEqual(c.indicesAt(1));
      expect(c.indicesAt(2)).not.toEqual(c.indicesAt(1));
      expect(c.indicesAt(20)).not.toEqual(c.indicesAt(10)); // the negative switched to "y" after call 15
    } finally {
      c.dispose();
    }
  });

  it('sub-prompts of different lengths: the shorter repeats its last vector; uncond gets empty chunks', () => {
    const long = Array.from({ length: 40 }, (_, i) => `word${i}`).join(' ');
    const c = new PromptConditioning(m.textEncoder!, m.tokenizer!, { prompt: `${long} AND a cat`, negativePrompt: NEG, steps: 4, cfg: 7 });
    try {
      const { ctx } = c.at(0, 1);
      const [u, l, s] = tf.split(ctx, 3, 0).map((t) => t.arraySync() as number[][][]);
      const k = l![0]!.length / 77;
      expect(k).toBeGreaterThan(1);
      expect(ctx.shape).toEqual([3, 77 * k, 32]);
      const short = s![0]!;
      for (let t = 77; t < short.length; t++) expect(short[t]).toEqual(short[76]);
      const empty = encodeChunks(m.textEncoder!, chunkPrompt(m.tokenizer!, ''));
      expect(maxAbsDiff(u![0]!.slice(77).flat(), (empty.arraySync() as number[][][])[0]!.flat())).toBe(0);
      empty.dispose();
    } finally {
      c.dispose();
    }
  });

  it('too many AND parts is a clear error before any encoding', () => {
    const before = tf.memory().numTensors;
    expect(() => new PromptConditioning(m.textEncoder!, m.tokenizer!, { prompt: Array(MAX_AND_PARTS + 1).fill('x').join(' AND '), steps: 2, cfg: 7 })).toThrow(/65 AND parts \(at most 64/);
    expect(tf.memory().numTensors).toBe(before);
  });

  it('a prompt without syntax leaks no tensors and gives the same tensors as encodePromptPair', () => {
    const before = tf.memory().numTensors;
    const c = new PromptConditioning(m.textEncoder!, m.tokenizer!, { prompt: 'a (cat:1.3)', negativePrompt: NEG, steps: 5, cfg: 7 });
    const p = encodePromptPair(m.textEncoder!, m.tokenizer!, 'a (cat:1.3)', NEG);
    expect(maxAbsDiff(c.tensors[0]!.dataSync(), p.cond.dataSync())).toBe(0);
    expect(maxAbsDiff(c.tensors[1]!.dataSync(), p.uncond.dataSync())).toBe(0);
    c.at(0, 1);
    c.dispose();
    tf.dispose([p.cond, p.uncond]);
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('encodeBatch: one A1111 batch for a schedule (emphasis mean over the batch, repeats counted)', () => {
  it('emphasizeBatch: z·w·(mean(z)/mean(z·w)) per chunk index, means over every occurrence (by hand)', () => {
    // two texts (counts 3 and 1), two chunks each of 2 tokens x 2 channels
    const z = [[[[1, 2], [3, 4]], [[0.5, 0.5], [1, -1]]], [[[2, 2], [1, 1]], [[-2, 1], [3, 0]]]];
    const w = [[[1.5, 1], [0.5, 2]], [[1, 1], [1, 1]]];
    const counts = [3, 1];
    const got = emphasizeBatch(tf.tensor4d(z), tf.tensor4d(w.map((t) => t.map((c) => c.map((v) => [v])))), counts);
    const want = z.map((t, j) => t.map((chunk, k) => {
      let before = 0;
      let after = 0;
      z.forEach((tt, jj) => tt[k]!.forEach((tok, q) => tok.forEach((v) => ((before += counts[jj]! * v), (after += counts[jj]! * v * w[jj]![k]![q]!)))));
      return chunk.map((tok, q) => tok.map((v) => v * w[j]![k]![q]! * (before / after)));
    }));
    expect(maxAbsDiff(got.dataSync(), want.flat(3))).toBeLessThanOrEqual(1e-6);
    got.dispose();
  });

  it('on the tiny model: the texts share one ratio, a lone text is encodeChunks exactly, repeats change the mean', () => {
    const tok = m.tokenizer!;
    const te = m.textEncoder!;
    const texts = ['a (cat:1.5)', 'a [dog]'];
    const chunks = texts.map((t) => chunkPrompt(tok, t));
    const got = encodeBatch(te, tok, chunks, [3, 1]);
    const raw = ['a cat', 'a dog'].map((t) => encodeChunks(te, chunkPrompt(tok, t)).dataSync()); // the same ids, no weights
    const fitted = raw.map((z, j) => {
      const g = got[j]!.dataSync();
      const zw = Float32Array.from(z, (v, q) => v * chunks[j]![0]!.weights[Math.floor(q / 32)]!);
      let num = 0;
      let den = 0;
      zw.forEach((v, q) => ((num += g[q]! * v), (den += v * v)));
      const r = num / den;
      expect(maxAbsDiff(g, Float32Array.from(zw, (v) => v * r))).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(r)));
      return r;
    });
    expect(Math.abs(fitted[0]! - fitted[1]!)).toBeLessThanOrEqual(1e-5 * Math.abs(fitted[0]!));
    const other = encodeBatch(te, tok, chunks, [1, 1]);
    expect(maxAbsDiff(other[0]!.dataSync(), got[0]!.dataSync())).toBeGreaterThan(1e-4);
    tf.dispose([...got, ...other]);
  });
});
