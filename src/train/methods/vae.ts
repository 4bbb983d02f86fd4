/** `method: vae` (and `sdtune train-vae`): the VAE's encoder and decoder, reconstruction + KL (recipes/vae.ts). */
import { z } from 'zod';
import type { MethodEntry } from '../registry.js';
import { bool, int, num } from '../schema.js';
import { checkModelOutputs } from './common.js';

export const VAE_SECTION = z.object({
  kl_weight: num(0).default(1e-6), // weight of the KL term (summed per sample, averaged over the batch) next to the pixel MSE (LDM's kl_weight)
  measure_scaling_factor: bool().default(true), // at export, set the VAE's scaling_factor to 1 / std of the latents of the training images (LDM's scale_by_std)
  scaling_images: int(1).default(256), // how many training images (the first, in file order) that std is measured on
});

declare module '../config.js' {
  interface MethodSections {
    vae: z.output<typeof VAE_SECTION>;
  }
}

export const vae: MethodEntry = {
  name: 'vae',
  section: VAE_SECTION,
  // Adam (no decay) at 1e-3 as toyworld.md trained the toy VAE; the encoder trains, so latents are never cached
  defaults: { 'train.lr': 1e-3, 'train.weight_decay': 0, 'data.cache_latents': false, 'output.save_precision': 'fp32' },
  components: ['vae'],
  check(c, fail) {
    checkModelOutputs(c, fail);
    if (c.data.cache_latents) fail('data.cache_latents', 'data.cache_latents must be false for the vae method (it trains the encoder, so the latents change every step)');
    if (c.output.sample_every !== null || c.output.sample_prompts.length) {
      fail(c.output.sample_every !== null ? 'output.sample_every' : 'output.sample_prompts', 'output.sample_every / output.sample_prompts: the vae method draws no text-to-image samples (it trains no UNet)');
    }
    if (c.data.caption_dropout) fail('data.caption_dropout', 'data.caption_dropout: the vae method reads no captions');
  },
  cli: {
    command: 'train-vae',
    describe: 'train the VAE (encoder + decoder: pixel MSE + KL) and write the model with it (diffusers folder / single-file output)',
    flags: { 'kl-weight': { key: 'vae.kl_weight', describe: 'weight of the KL term (vae.kl_weight)' } },
  },
  async create(model, c, gen) {
    const v = c.vae!;
    const { createVaeRecipe } = await import('../recipes/vae.js');
    return createVaeRecipe(model, {
      klWeight: v.kl_weight,
      gen,
      scaling: v.measure_scaling_factor ? { dataDir: c.data.dir, images: v.scaling_images, resolution: c.data.resolution, seed: c.train.seed, captionExtension: c.data.caption_extension, metadata: c.data.metadata } : undefined,
      savePrecision: c.output.save_precision,
      saveAs: c.output.save_as,
      emaOnly: c.output.ema_only,
    });
  },
};
