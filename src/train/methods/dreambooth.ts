/**
 * `method: dreambooth` (and `sdtune dreambooth`): a few images of one subject ("a photo of sks dog") teach the model
 * that subject; prior preservation (on by default) trains on class images ("a photo of dog") of the base model's own
 * making at the same time, so it keeps what it knew of the class (recipes/dreambooth.ts). What trains is orthogonal:
 * the whole UNet, ± the text encoder (diffusers train_dreambooth.py, kohya train_db.py) or LoRA (DreamBooth-LoRA).
 */
import { z } from 'zod';
import type { MethodEntry } from '../registry.js';
import { resolveSampler } from '../../schedulers/names.js';
import { bool, int, num, oneOf, orNull, show, str } from '../schema.js';
import { FINETUNE_FILTERS } from './finetune.js';
import { LORA_SECTION } from './lora.js';
import { checkModelOutputs, refuseModelOutputs } from './common.js';

/** What trains: the UNet's own weights (a whole model is exported) or LoRA factors (a kohya LoRA file). */
export const DREAMBOOTH_TRAINS = ['full', 'lora'] as const;
/** How class images meet instance images: diffusers' paired batches, or kohya's shuffled-in images with a loss weight. */
export const DREAMBOOTH_BATCHING = ['paired', 'shuffled'] as const;

export const DREAMBOOTH_SECTION = z.object({
  instance_prompt: orNull(str()), // the caption of every instance image without a caption of its own (diffusers instance_prompt); null = every image needs its own
  class_prompt: orNull(str()), // the prompt of the class images, generated and trained on (diffusers class_prompt)
  with_prior_preservation: bool().default(true), // train on class images too (diffusers --with_prior_preservation; kohya: a reg_data_dir)
  prior_loss_weight: num(0).default(1), // weight of the class images' loss (diffusers / kohya prior_loss_weight)
  class_data_dir: orNull(str()), // the class images' folder, filled up to num_class_images by generating; null = <output.dir>/class_images
  num_class_images: int(1).default(100), // class images used (diffusers num_class_images)
  reg_data_dir: orNull(str()), // kohya: your own class images in <repeats>_<class> folders, balanced against the instance images; nothing is generated
  batching: oneOf(DREAMBOOTH_BATCHING).default('paired'), // paired: every batch = batch_size instance + batch_size class images, loss = mse(instance) + w mse(prior) (diffusers); shuffled: class images mixed into the data, each weighted w (kohya)
  trains: oneOf(DREAMBOOTH_TRAINS).default('full'), // full: the UNet's weights (diffusers folder / single file); lora: LoRA factors (kohya LoRA file)
  unet: oneOf(FINETUNE_FILTERS).default('all'), // trains full: all UNet parameters, or only the attention projections
  train_text_encoder: bool().default(false), // train the text encoder too (whole with trains full, LoRA with trains lora)
  text_encoder_lr: orNull(num(0, { minOpen: true })), // null = train.lr
  stop_text_encoder_training: orNull(int(1)), // the text encoder trains for this many optimizer steps, then is frozen (kohya); null = all of them
  lora: z.object({
    // trains lora: as the lora method's keys
    rank: LORA_SECTION.shape.rank,
    alpha: LORA_SECTION.shape.alpha,
    targets: LORA_SECTION.shape.targets,
    conv_rank: LORA_SECTION.shape.conv_rank,
    conv_alpha: LORA_SECTION.shape.conv_alpha,
  }),
  class_images: z.object({
    // how missing class images are generated with the base model
    batch_size: int(1).default(4), // images per sampling call (diffusers sample_batch_size)
    sampler: orNull(str()), // canonical sampler name; null = the model's scheduler
    steps: int(1).default(30),
    cfg: num(0).default(7.5),
    negative_prompt: orNull(str()),
    seed: int(0, { max: Number.MAX_SAFE_INTEGER }).default(0), // class image i is drawn with seed + i (its file name holds i)
  }),
});

declare module '../config.js' {
  interface MethodSections {
    dreambooth: z.output<typeof DREAMBOOTH_SECTION>;
  }
}

export const dreambooth: MethodEntry = {
  name: 'dreambooth',
  section: DREAMBOOTH_SECTION,
  // full: diffusers train_dreambooth.py (lr 5e-6, fp32 model); lora: kohya / the lora method (lr 1e-4, fp16 file)
  defaults: (given) =>
    given('dreambooth.trains') === 'lora'
      ? { 'train.lr': 1e-4, 'train.weight_decay': 1e-2, 'output.save_precision': 'fp16' }
      : { 'train.lr': 5e-6, 'train.weight_decay': 1e-2, 'output.save_precision': 'fp32' },
  check(c, fail) {
    const d = c.dreambooth!;
    if (d.trains === 'lora') refuseModelOutputs(c, fail, 'dreambooth with trains lora', 'LoRA');
    else checkModelOutputs(c, fail);
    for (const key of ['instance_prompt', 'class_prompt'] as const) {
      const v = d[key];
      if (v !== null && v.trim() === '') fail(`dreambooth.${key}`, `dreambooth.${key}: expected a non-empty prompt or null, found ${show(v)}`);
    }
    if (d.with_prior_preservation) {
      if (d.class_prompt === null && d.reg_data_dir === null) {
        fail('dreambooth.class_prompt', 'dreambooth.class_prompt is required with dreambooth.with_prior_preservation (e.g. "a photo of dog"; or give your own class images in dreambooth.reg_data_dir, or set with_prior_preservation: false)');
      }
      if (d.reg_data_dir !== null && d.class_data_dir !== null) {
        fail('dreambooth.reg_data_dir', 'dreambooth.reg_data_dir and dreambooth.class_data_dir are both set: class images come from one of them (reg_data_dir: your own, kohya folders; class_data_dir: generated)');
      }
      if (d.batching === 'paired' && c.data.buckets.enabled) {
        fail('dreambooth.batching', 'dreambooth.batching paired puts instance and class images in one batch, so they need one size: data.buckets.enabled must be false (or use batching: shuffled)');
      }
    } else {
      for (const key of ['class_prompt', 'class_data_dir', 'reg_data_dir'] as const) {
        if (d[key] !== null) fail(`dreambooth.${key}`, `dreambooth.${key} is set but dreambooth.with_prior_preservation is false (no class images are used)`);
      }
    }
    if (!d.train_text_encoder) {
      for (const key of ['text_encoder_lr', 'stop_text_encoder_training'] as const) {
        if (d[key] !== null) fail(`dreambooth.${key}`, `dreambooth.${key} is set but dreambooth.train_text_encoder is false (the text encoder is not trained)`);
      }
    }
    if (d.class_images.sampler !== null) {
      try {
        d.class_images.sampler = resolveSampler(d.class_images.sampler); // the names `sdtune sample` takes
      } catch (e) {
        fail('dreambooth.class_images.sampler', `dreambooth.class_images.sampler: ${(e as Error).message}`);
      }
    }
    for (const key of ['conv_rank', 'conv_alpha'] as const) {
      if (d.lora[key] !== null && d.lora.targets !== 'attn+ff+conv') {
        fail(`dreambooth.lora.${key}`, `dreambooth.lora.${key} is set but dreambooth.lora.targets ${show(d.lora.targets)} adapts no 3x3 convolutions (use targets: attn+ff+conv)`);
      }
    }
  },
  cli: {
    command: 'dreambooth',
    describe: 'DreamBooth a subject into the model, with prior preservation (whole UNet: diffusers folder / single file; or LoRA: kohya file)',
    flags: {
      'instance-prompt': { key: 'dreambooth.instance_prompt', describe: 'caption of the instance images without their own, e.g. "a photo of sks dog" (dreambooth.instance_prompt)' },
      'class-prompt': { key: 'dreambooth.class_prompt', describe: 'prompt of the class images, e.g. "a photo of dog" (dreambooth.class_prompt)' },
      'class-data-dir': { key: 'dreambooth.class_data_dir', describe: 'folder of class images, generated up to --num-class-images (dreambooth.class_data_dir)' },
      'num-class-images': { key: 'dreambooth.num_class_images', describe: 'class images used (dreambooth.num_class_images, default 100)' },
      'reg-data-dir': { key: 'dreambooth.reg_data_dir', describe: 'kohya: your own class images in <repeats>_<class> folders (dreambooth.reg_data_dir)' },
      'prior-loss-weight': { key: 'dreambooth.prior_loss_weight', describe: 'weight of the class images in the loss (dreambooth.prior_loss_weight, default 1)' },
      'with-prior-preservation': { key: 'dreambooth.with_prior_preservation', boolean: true, describe: 'train on class images too (default on; --no-with-prior-preservation turns it off)' },
      batching: { key: 'dreambooth.batching', describe: 'paired (diffusers, default) or shuffled (kohya) (dreambooth.batching)' },
      trains: { key: 'dreambooth.trains', describe: 'full (the UNet, default) or lora (dreambooth.trains)' },
      'train-text-encoder': { key: 'dreambooth.train_text_encoder', boolean: true, describe: 'train the text encoder too (dreambooth.train_text_encoder)' },
      'stop-text-encoder-training': { key: 'dreambooth.stop_text_encoder_training', describe: 'the text encoder trains this many steps, then stops (dreambooth.stop_text_encoder_training)' },
      rank: { key: 'dreambooth.lora.rank', describe: 'LoRA rank with --trains lora (dreambooth.lora.rank)' },
      alpha: { key: 'dreambooth.lora.alpha', describe: 'LoRA alpha with --trains lora (dreambooth.lora.alpha)' },
    },
  },
  async create(model, c, gen, ctx) {
    const { createDreamboothFromConfig } = await import('../recipes/dreambooth.js');
    return createDreamboothFromConfig(model, c, gen, ctx);
  },
};
