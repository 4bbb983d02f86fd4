/** `method: lora` (and `sdtune lora`): LoRA / LoCon on the UNet, optionally on the text encoder (recipes/lora.ts). */
import path from 'node:path';
import { z } from 'zod';
import { SdtuneError } from '../../errors.js';
import type { ModelResolvedConfig } from '../config.js';
import type { MethodEntry } from '../registry.js';
import { bool, int, num, oneOf, orNull, show } from '../schema.js';
import { refuseModelOutputs } from './common.js';

/** Which modules get LoRA (adapters/lora-inject.ts): the attention projections (diffusers' default); + everything
 *  else in the transformers (kohya's default networks.lora); + the resnets, down- and upsamplers (kohya LoCon). */
export const LORA_TARGETS = ['attn', 'attn+ff', 'attn+ff+conv'] as const;

export const LORA_SECTION = z.object({
  rank: int(1).default(16), // kohya network_dim / PEFT r
  alpha: num(0, { minOpen: true }).default(8), // kohya network_alpha / PEFT lora_alpha; scale = alpha / rank
  targets: oneOf(LORA_TARGETS).default('attn'),
  conv_rank: orNull(int(1)), // rank of the 3x3 convs with targets attn+ff+conv (kohya conv_dim); null = rank
  conv_alpha: orNull(num(0, { minOpen: true })), // their alpha (kohya conv_alpha); null = alpha (kohya's default would be 1)
  text_encoder: bool().default(false), // also train LoRA on the CLIP text encoder (diffusers --train_text_encoder)
  text_encoder_lr: orNull(num(0, { minOpen: true })), // null = train.lr (kohya text_encoder_lr)
  dropout: num(0, { max: 1, maxOpen: true }).default(0), // dropout on the LoRA down projection's output (kohya network_dropout)
});

declare module '../config.js' {
  interface MethodSections {
    lora: z.output<typeof LORA_SECTION>;
  }
}

export const lora: MethodEntry = {
  name: 'lora',
  section: LORA_SECTION,
  defaults: { 'train.lr': 1e-4, 'train.weight_decay': 1e-2, 'output.save_precision': 'fp16' }, // kohya / diffusers
  check(c, fail) {
    refuseModelOutputs(c, fail, 'lora', 'LoRA');
    const l = c.lora!;
    if (l.text_encoder_lr !== null && !l.text_encoder) {
      fail('lora.text_encoder_lr', 'lora.text_encoder_lr is set but lora.text_encoder is false (the text encoder is not trained)');
    }
    for (const key of ['conv_rank', 'conv_alpha'] as const) {
      if (l[key] !== null && l.targets !== 'attn+ff+conv') {
        fail(`lora.${key}`, `lora.${key} is set but lora.targets ${show(l.targets)} adapts no 3x3 convolutions (use lora.targets: attn+ff+conv)`);
      }
    }
  },
  cli: {
    command: 'lora',
    describe: 'train a LoRA (kohya/A1111 .safetensors output)',
    flags: {
      rank: { key: 'lora.rank', describe: 'LoRA rank (lora.rank)' },
      alpha: { key: 'lora.alpha', describe: 'LoRA alpha (lora.alpha)' },
      'conv-rank': { key: 'lora.conv_rank', describe: 'LoCon rank of the 3x3 convs, with lora.targets attn+ff+conv (lora.conv_rank, kohya conv_dim; default: --rank)' },
      'conv-alpha': { key: 'lora.conv_alpha', describe: 'LoCon alpha of the 3x3 convs (lora.conv_alpha, kohya conv_alpha; default: --alpha)' },
      'train-text-encoder': { key: 'lora.text_encoder', boolean: true },
    },
  },
  async create(model, c, gen) {
    const l = c.lora!;
    const { createLoraRecipe } = await import('../recipes/lora.js');
    return createLoraRecipe(model, {
      rank: l.rank,
      alpha: l.alpha,
      convRank: l.conv_rank ?? l.rank,
      convAlpha: l.conv_alpha ?? l.alpha,
      targets: l.targets,
      textEncoder: l.text_encoder,
      textEncoderLr: l.text_encoder_lr,
      dropout: l.dropout,
      savePrecision: c.output.save_precision as 'fp16' | 'fp32', // bf16 is refused for LoRA by check()
      alsoDiffusers: c.output.also_diffusers_format,
      gen,
      metadata: loraTrainingMetadata(c),
    });
  },
};

/** kohya's ss_* training metadata of a LoRA file (the network's own keys come from the recipe). */
export function loraTrainingMetadata(c: ModelResolvedConfig): Record<string, string> {
  return {
    ss_output_name: c.output.name,
    ss_learning_rate: String(c.train.lr),
    ss_lr_scheduler: c.train.lr_scheduler,
    ss_max_train_steps: String(c.train.max_steps ?? ''),
    ss_resolution: `(${c.data.resolution.join(', ')})`,
    ss_seed: String(c.train.seed),
    ss_noise_offset: String(c.train.noise_offset),
    ss_min_snr_gamma: String(c.train.min_snr_gamma ?? ''),
    ss_gradient_checkpointing: c.train.gradient_checkpointing ? 'True' : 'False',
    ss_sd_model_name: path.basename(c.model.path),
    ss_base_model_version: 'sd_v1',
    ss_training_comment: 'trained with sdtune',
  };
}
