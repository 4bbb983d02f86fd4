/** `method: finetune` (and `sdtune finetune`): the UNet's own weights, optionally the text encoder's (recipes/finetune.ts). */
import { z } from 'zod';
import type { MethodEntry } from '../registry.js';
import { bool, num, oneOf, orNull } from '../schema.js';
import { checkModelOutputs } from './common.js';

/** Which UNet parameters a full fine-tune trains: all, or only the transformer blocks' attention layers. */
export const FINETUNE_FILTERS = ['all', 'attention'] as const;

export const FINETUNE_SECTION = z.object({
  unet: oneOf(FINETUNE_FILTERS).default('all'), // which UNet parameters train: 'all' (diffusers train_text_to_image) or 'attention' (attn1/attn2)
  text_encoder: bool().default(false), // also train the whole CLIP text encoder (kohya --train_text_encoder)
  text_encoder_lr: orNull(num(0, { minOpen: true })), // null = train.lr
});

declare module '../config.js' {
  interface MethodSections {
    finetune: z.output<typeof FINETUNE_SECTION>;
  }
}

export const finetune: MethodEntry = {
  name: 'finetune',
  section: FINETUNE_SECTION,
  defaults: { 'train.lr': 1e-5, 'train.weight_decay': 1e-2, 'output.save_precision': 'fp32' }, // diffusers train_text_to_image
  check(c, fail) {
    checkModelOutputs(c, fail);
    const f = c.finetune!;
    if (f.text_encoder_lr !== null && !f.text_encoder) {
      fail('finetune.text_encoder_lr', 'finetune.text_encoder_lr is set but finetune.text_encoder is false (the text encoder is not trained)');
    }
  },
  cli: {
    command: 'finetune',
    describe: 'fine-tune the whole UNet (or its attention layers), optionally the text encoder (diffusers folder / single-file output)',
    flags: { 'train-text-encoder': { key: 'finetune.text_encoder', boolean: true } },
  },
  async create(model, c) {
    const f = c.finetune!;
    const { createFinetuneRecipe } = await import('../recipes/finetune.js');
    return createFinetuneRecipe(model, {
      unet: f.unet,
      textEncoder: f.text_encoder,
      textEncoderLr: f.text_encoder_lr,
      savePrecision: c.output.save_precision,
      saveAs: c.output.save_as,
      emaOnly: c.output.ema_only,
    });
  },
};
