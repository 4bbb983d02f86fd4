/** How a run's images become batches, from its config: shared by the loop's data loader and a recipe's own (DreamBooth's class images). */
import path from 'node:path';
import { makeBuckets } from '../data/buckets.js';
import { LatentCache } from '../data/cache.js';
import type { LoaderOptions } from '../data/loader.js';
import { SdtuneError } from '../errors.js';
import type { LoadedModel } from '../io/model.js';
import { vaeEncode } from '../models/vae.js';
import type { ModelResolvedConfig } from './config.js';

/** The VAE as the latent cache's encoder: pixels -> latent mean and std. */
export function latentEncoder(model: LoadedModel) {
  return (px: import('@tensorflow/tfjs').Tensor4D) => {
    const vae = model.vae;
    if (!vae) throw new SdtuneError('usage', `${model.path}: training encodes images into latents, but the model has no vae`);
    const d = vaeEncode(vae.params, vae.config, px);
    d.logvar.dispose();
    return { mean: d.mean, std: d.std };
  };
}

/** The run's latent cache (data.cache_latents; `sub` names its folder under data.cache_dir), or undefined. */
export function latentCacheFor(model: LoadedModel, c: ModelResolvedConfig, sub = 'latents'): LatentCache | undefined {
  if (!c.data.cache_latents) return undefined;
  return new LatentCache(latentEncoder(model), { dir: path.join(c.data.cache_dir, sub), encoderId: path.resolve(c.model.path) });
}

/** The data loader's options from the config: size, buckets, crops, flips, caption processing; `seed` its own. */
export function loaderOptions(c: ModelResolvedConfig, seed: number, latentCache: LatentCache | undefined): LoaderOptions {
  return {
    batchSize: c.train.batch_size,
    resolution: c.data.resolution,
    buckets: c.data.buckets.enabled ? makeBuckets(c.data.resolution, c.data.buckets.min_side, c.data.buckets.max_side, c.data.buckets.step) : undefined,
    randomCrop: !c.data.center_crop,
    flip: c.data.flip,
    caption: { dropout: c.data.caption_dropout, shuffle: c.data.shuffle_captions, keepTokens: c.data.keep_tokens },
    seed,
    latentCache,
  };
}
