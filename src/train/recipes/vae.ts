/**
 * VAE training (LDM's AutoencoderKL objective without the discriminator and LPIPS, as toyworld.md trained the toy
 * VAE): encoder and decoder train on loss = MSE(decode(z), x) + kl_weight x KL(q(z|x) || N(0, I)), the KL summed over
 * each sample's latent elements and averaged over the batch, z = mean + std x eps with eps from the run's generator
 * (so a resume draws the same eps). It replaces the diffusion loss (Recipe.loss): no UNet, no text, no latent cache.
 * Exported as the whole model (finetune's exportWholeModel) with the trained VAE, and, when asked, the VAE's
 * scaling_factor set to 1 / std of the latents of a fixed sample of training images (LDM's scale_by_std), so the
 * UNet trained next sees latents of unit variance.
 */
import * as tf from '@tensorflow/tfjs';
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { type Size, assignBucket, cropBox, squareAssignment } from '../../data/buckets.js';
import { IMAGE_EXTENSIONS } from '../../data/dataset.js';
import { loadPixels, stackPixels } from '../../data/transforms.js';
import { SdtuneError, usageError } from '../../errors.js';
import type { SavePrecision } from '../../io/convert.js';
import type { LoadedModel } from '../../io/model.js';
import type { VaeConfig } from '../../models/configs.js';
import { type ParamTree, makeTrainable } from '../../models/params.js';
import { vaeDecode, vaeEncode } from '../../models/vae.js';
import { TorchGenerator, randnNHWC } from '../../runtime/rng.js';
import type { Recipe } from '../recipe.js';
import { exportWholeModel } from './finetune.js';

export interface VaeRecipeOptions {
  /** weight of the KL term (1e-6 in toyworld.md) */
  klWeight: number;
  /** the run's generator: eps of every step */
  gen: TorchGenerator;
  /** measure the scaling factor at export on these training images (absent: keep the model's) */
  scaling?: ScalingSample;
  savePrecision: SavePrecision;
  saveAs: 'diffusers' | 'single_file' | 'both';
  emaOnly?: boolean;
}

/** Where the scaling factor is measured: the first `images` image files directly in `dataDir` (file-name order), resized and center-cropped to `resolution` as the loader does. */
export interface ScalingSample {
  dataDir: string;
  images: number;
  resolution: Size;
  /** seeds the eps of the latent samples (its own generator: measuring never moves the training draws) */
  seed: number;
  captionExtension?: string;
  metadata?: string | null;
}

/** The VAE objective of one batch of pixels [B,H,W,3] in [-1,1] with eps [B,h,w,c]: { loss, mse, kl } (kl: per-sample sum, batch mean). */
export function vaeLoss(params: ParamTree, cfg: VaeConfig, pixels: tf.Tensor4D, eps: tf.Tensor4D, klWeight: number): { loss: tf.Scalar; mse: tf.Scalar; kl: tf.Scalar } {
  return tf.tidy(() => {
    const d = vaeEncode(params, cfg, pixels);
    const z = tf.add(d.mean, tf.mul(d.std, eps)) as tf.Tensor4D;
    const recon = vaeDecode(params, cfg, z);
    const mse = tf.mean(tf.squaredDifference(recon, pixels)) as tf.Scalar;
    // KL(N(mean, var) || N(0, 1)) = 0.5 (mean^2 + var - 1 - logvar), diffusers DiagonalGaussianDistribution.kl()
    const perElem = tf.mul(tf.sub(tf.add(tf.square(d.mean), tf.exp(d.logvar)), tf.add(d.logvar, 1)), 0.5);
    const kl = tf.mean(tf.sum(perElem, [1, 2, 3])) as tf.Scalar;
    return { loss: tf.add(mse, tf.mul(kl, klWeight)) as tf.Scalar, mse, kl };
  });
}

export function createVaeRecipe(model: LoadedModel, o: VaeRecipeOptions): Recipe {
  const vae = model.vae;
  if (!vae) throw usageError(`${model.path}: the vae method needs a model with a vae`);
  const vars = makeTrainable(vae.params, () => true, 'vae/vae');
  const trainables = new Map([...vars].map(([k, v]) => [`vae.${k}`, v] as const));
  return {
    method: 'vae',
    trainables,
    textEncoderTrainable: false,
    captionFor: (caption) => caption, // captions are read by the loader, never used
    encodeIds() {
      throw new SdtuneError('unsupported', 'the vae method has no text conditioning');
    },
    withInference: (fn) => fn(),
    loss(batch) {
      if (!batch.pixels) throw new SdtuneError('usage', 'the vae method trains on pixels: data.cache_latents must be false');
      const [b, h, w] = batch.pixels.shape;
      const f = 2 ** (vae.config.block_out_channels.length - 1);
      // eps drawn NCHW like torch's randn_like of the posterior's mean
      const eps = randnNHWC(o.gen, [b, vae.config.latent_channels, h / f, w / f]);
      const r = vaeLoss(vae.params, vae.config, batch.pixels, eps, o.klWeight);
      return r.loss;
    },
    async export(dir, name, _step, ctx) {
      let m = model;
      if (o.scaling) {
        const factor = await measureScalingFactor(model, o.scaling);
        m = { ...model, source: { ...model.source!, configs: { ...model.source!.configs, vae: { ...model.source!.configs.vae, scaling_factor: factor } } } };
      }
      return exportWholeModel(m, dir, name, o, ctx);
    },
    dispose() {
      // the variables are the model's parameters now: disposeModel frees them
    },
  };
}

/** Images per encoder pass when measuring. */
const MEASURE_BATCH = 32;

/**
 * 1 / std of the VAE's latents z = mean + std x eps over a sample of images (LDM's scale_by_std: the std of every
 * element of the flattened latents, unbiased as torch's .std()), the scaling_factor that gives the UNet latents of
 * unit variance. eps comes from a generator seeded with `s.seed`.
 */
export async function measureScalingFactor(model: LoadedModel, s: ScalingSample): Promise<number> {
  const vae = model.vae;
  if (!vae) throw usageError(`${model.path}: no vae to measure`);
  const files = (await readdir(s.dataDir)).filter((f) => IMAGE_EXTENSIONS.includes(path.extname(f).toLowerCase())).sort().slice(0, s.images);
  if (!files.length) throw usageError(`measuring the VAE's scaling factor: no images in ${s.dataDir}`);
  const [rw, rh] = s.resolution;
  const sharp = (await import('sharp')).default;
  const gen = new TorchGenerator(s.seed);
  const f = 2 ** (vae.config.block_out_channels.length - 1);
  let n = 0, sum = 0, sumSq = 0;
  for (let i = 0; i < files.length; i += MEASURE_BATCH) {
    const chunk = files.slice(i, i + MEASURE_BATCH);
    const images = await Promise.all(
      chunk.map(async (name) => {
        const file = path.join(s.dataDir, name);
        const meta = await sharp(file).metadata();
        const [w, h] = (meta.orientation ?? 1) >= 5 ? [meta.height!, meta.width!] : [meta.width!, meta.height!];
        const a = rw === rh ? squareAssignment(w, h, rw) : assignBucket(w, h, [[rw, rh]]);
        return loadPixels(file, a.resized, cropBox(a.resized, a.bucket, undefined, rw === rh ? 'half-even' : 'floor'), false);
      }),
    );
    const z = tf.tidy(() => {
      const px = stackPixels(images, rw, rh);
      const d = vaeEncode(vae.params, vae.config, px);
      return tf.add(d.mean, tf.mul(d.std, randnNHWC(gen, [chunk.length, vae.config.latent_channels, rh / f, rw / f])));
    });
    const data = await z.data();
    z.dispose();
    for (const x of data) {
      sum += x;
      sumSq += x * x;
    }
    n += data.length;
  }
  const variance = (sumSq - (sum * sum) / n) / Math.max(1, n - 1);
  if (!(variance > 0) || !Number.isFinite(variance)) throw new SdtuneError('diverged', `measuring the VAE's scaling factor: the latents' variance is ${variance}`);
  return 1 / Math.sqrt(variance);
}
