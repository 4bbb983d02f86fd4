// The vae method on the toy model (random weights): its loss (MSE + KL), that training lowers it on a tiny fixed set
// of world images, that only the VAE's weights move, that a resume continues the same curve, and that the export
// loads with the measured scaling factor (the scaled latents have unit std). Config rules: no latent cache.
import * as tf from '@tensorflow/tfjs';
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildToyModel, makeToyModel } from '../../src/data/toy-model.js';
import { toyWorldImages, writeToyWorld } from '../../src/data/toy-world.js';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { flattenParams } from '../../src/models/params.js';
import { vaeEncode } from '../../src/models/vae.js';
import { TorchGenerator, randnNHWC } from '../../src/runtime/rng.js';
import { resolveConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { measureScalingFactor, vaeLoss } from '../../src/train/recipes/vae.js';
import { quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-vae-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const TOY = path.join(tmp, 'toy');
const WORLD = path.join(tmp, 'world');

beforeAll(async () => {
  await makeToyModel(TOY);
  await writeToyWorld(WORLD, 4, { seed: 3, ...SUPERSET, quiet: true });
});

const cfg = (out: string, extra: Record<string, unknown> = {}) =>
  resolveConfig('vae', null, { 'model.path': TOY, 'data.dir': WORLD, 'train.batch_size': 4, 'train.seed': 5, 'vae.scaling_images': 4, 'output.dir': out, 'output.name': 'model', ...extra });

async function params(model: string): Promise<Record<'unet' | 'vae' | 'text_encoder', Map<string, Float32Array>>> {
  const m = await loadModel(model);
  try {
    const f = (t: Parameters<typeof flattenParams>[0]) => new Map([...flattenParams(t)].map(([k, v]) => [k, v.dataSync() as Float32Array]));
    return { unet: f(m.unet!.params), vae: f(m.vae!.params), text_encoder: f(m.textEncoder!.params) };
  } finally {
    disposeModel(m);
  }
}
const same = (a: Float32Array, b: Float32Array) => a.length === b.length && a.every((x, i) => Object.is(x, b[i]));

/** The world images as pixels [B,32,32,3] in [-1, 1]. */
const SUPERSET = { include: ['purple', 'heart'] };
const pixelsOf = (n: number, seed: number) =>
  tf.tidy(() => tf.tensor4d(Float32Array.from(toyWorldImages(n, { seed, ...SUPERSET }).flatMap((it) => [...it.pixels])), [n, 32, 32, 3]).div(127.5).sub(1) as tf.Tensor4D);

describe('vae method', () => {
  it('the loss is the pixel MSE + kl_weight x the KL summed per sample, averaged over the batch', () => {
    const m = buildToyModel();
    try {
      const px = pixelsOf(2, 1);
      const eps = randnNHWC(new TorchGenerator(0), [2, 4, 8, 8]);
      const r = vaeLoss(m.vae!.params, m.vae!.config, px, eps, 0.5);
      const d = vaeEncode(m.vae!.params, m.vae!.config, px);
      const [mean, logvar] = [d.mean.dataSync(), d.logvar.dataSync()];
      let kl = 0;
      for (let i = 0; i < mean.length; i++) kl += 0.5 * (mean[i] ** 2 + Math.exp(logvar[i]) - 1 - logvar[i]);
      kl /= 2;
      expect(r.kl.dataSync()[0]).toBeCloseTo(kl, 3);
      expect(r.loss.dataSync()[0]).toBeCloseTo(r.mse.dataSync()[0] + 0.5 * kl, 4);
      // a different eps gives a different reconstruction: z is sampled, not the mean
      const r2 = vaeLoss(m.vae!.params, m.vae!.config, px, tf.zerosLike(eps), 0.5);
      expect(r2.mse.dataSync()[0]).not.toBeCloseTo(r.mse.dataSync()[0], 5);
      tf.dispose([px, eps, r.loss, r.mse, r.kl, r2.loss, r2.mse, r2.kl, d.mean, d.logvar, d.std]);
    } finally {
      disposeModel(m);
    }
  });

  it('config: Adam at 1e-3, no latent cache (refused), no text-to-image samples', () => {
    const c = cfg(path.join(tmp, 'cfg'));
    expect(c.train).toMatchObject({ lr: 1e-3, weight_decay: 0 });
    expect(c.data.cache_latents).toBe(false);
    expect(c.vae).toEqual({ kl_weight: 1e-6, measure_scaling_factor: true, scaling_images: 4 });
    expect(() => cfg(path.join(tmp, 'cfg'), { 'data.cache_latents': true })).toThrow(
      'data.cache_latents must be false for the vae method (it trains the encoder, so the latents change every step)',
    );
    expect(() => cfg(path.join(tmp, 'cfg'), { 'output.sample_every': 5, 'output.sample_prompts': ['a red circle'] })).toThrow(/the vae method draws no text-to-image samples/);
  });

  it('10 steps on 4 world images lower the loss; only the VAE moves; the export loads with scaling_factor = 1/std of the latents', async () => {
    const out = path.join(tmp, 'run');
    const r = await train('vae', cfg(out, { 'train.max_steps': 10 }), quiet);
    expect(r.steps).toBe(10);
    expect(r.files).toEqual([path.join(out, 'model')]);
    expect(r.losses.every(Number.isFinite)).toBe(true);
    expect(r.losses[9]).toBeLessThan(0.5 * r.losses[0]);
    const before = await params(TOY);
    const after = await params(r.files[0]);
    for (const part of ['unet', 'text_encoder'] as const) for (const [k, v] of before[part]) expect(same(v, after[part].get(k)!), `${part}.${k}`).toBe(true);
    const moved = [...before.vae].filter(([k, v]) => !same(v, after.vae.get(k)!));
    expect(moved.length).toBe(before.vae.size); // every VAE parameter has a gradient (the KL reaches the logvar half too)

    const written = JSON.parse(readFileSync(path.join(r.files[0], 'vae', 'config.json'), 'utf8')).scaling_factor;
    expect(JSON.parse(readFileSync(path.join(TOY, 'vae', 'config.json'), 'utf8')).scaling_factor).toBe(1);
    const m = await loadModel(r.files[0]);
    try {
      expect(m.vae!.config.scaling_factor).toBe(written);
      expect(await measureScalingFactor(m, { dataDir: WORLD, images: 4, resolution: [32, 32], seed: 5 })).toBeCloseTo(written, 6);
      // the latents of those images, times the factor, have unit std
      const z = tf.tidy(() => {
        const px = pixelsOf(4, 3); // the world folder's 4 images (same seed), in file order
        const d = vaeEncode(m.vae!.params, m.vae!.config, px);
        return tf.add(d.mean, tf.mul(d.std, randnNHWC(new TorchGenerator(5), [4, 4, 8, 8]))).mul(written);
      });
      const { variance } = tf.moments(z);
      expect(Math.sqrt(variance.dataSync()[0] * (z.size / (z.size - 1)))).toBeCloseTo(1, 3);
      tf.dispose([z, variance]);
    } finally {
      disposeModel(m);
    }
  });

  it('resume continues the same curve (eps from the run generator) and ends at the same weights; measure_scaling_factor false keeps the factor', async () => {
    const straight = await train('vae', cfg(path.join(tmp, 'straight'), { 'train.max_steps': 3 }), quiet);
    const part = path.join(tmp, 'resumed');
    await train('vae', cfg(part, { 'train.max_steps': 2 }), quiet);
    const tail = await train('vae', cfg(part, { 'train.max_steps': 3 }), { ...quiet, resume: part });
    expect(tail.losses).toEqual([straight.losses[2]]);
    const a = await params(straight.files[0]);
    const b = await params(tail.files[0]);
    for (const [k, v] of a.vae) expect(same(v, b.vae.get(k)!), k).toBe(true);

    const kept = await train('vae', cfg(path.join(tmp, 'kept'), { 'train.max_steps': 1, 'vae.measure_scaling_factor': false }), quiet);
    expect(JSON.parse(readFileSync(path.join(kept.files[0], 'vae', 'config.json'), 'utf8')).scaling_factor).toBe(1);
  });

  it('needs only the vae: a folder without unet, text encoder and tokenizer trains (and finetune says what it lacks)', async () => {
    const only = path.join(tmp, 'vae-only');
    cpSync(TOY, only, { recursive: true });
    for (const part of ['unet', 'text_encoder', 'tokenizer']) rmSync(path.join(only, part), { recursive: true });
    const r = await train('vae', resolveConfig('vae', null, { 'model.path': only, 'data.dir': WORLD, 'train.batch_size': 2, 'train.max_steps': 1, 'output.dir': path.join(tmp, 'only-run'), 'output.name': 'model' }), quiet);
    expect(r.steps).toBe(1);
    const m = await loadModel(r.files[0]);
    try {
      expect([Boolean(m.unet), Boolean(m.vae), Boolean(m.textEncoder)]).toEqual([false, true, false]);
      expect(m.vae!.config.scaling_factor).not.toBe(1);
    } finally {
      disposeModel(m);
    }
    const ft = resolveConfig('finetune', null, { 'model.path': only, 'data.dir': WORLD, 'train.max_steps': 1, 'output.dir': path.join(tmp, 'only-ft'), 'output.name': 'x' });
    await expect(train('finetune', ft, quiet)).rejects.toThrow(`${only}: finetune training needs unet, vae, text_encoder, tokenizer; the model has no unet, text_encoder, tokenizer`);
  });
});
