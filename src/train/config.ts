/**
 * The training configuration (design principle 11): a YAML file, overridden by flags, filled with the defaults that
 * kohya sd-scripts / diffusers' training scripts users expect, validated into one typed, fully resolved object,
 * and saved with the outputs as config.resolved.yaml (dumpConfig), which resolves back to the same object.
 * Every mistake is a one-line SdtuneError naming the key (and its file line or flag), expected vs found.
 */
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import YAML from 'yaml';
import { embeddingFileStem } from '../adapters/file-names.js';
import { SdtuneError, fileError, usageError } from '../errors.js';
import { BACKENDS, type BackendName } from '../runtime/backend-names.js';
import { resolveSampler } from '../schedulers/names.js';
import { LR_SCHEDULERS, type LrSchedulerName } from './lr.js';

export type Method = 'lora' | 'textual_inversion' | 'finetune';
export const METHODS: readonly Method[] = ['lora', 'textual_inversion', 'finetune'];
/** Which UNet parameters a full fine-tune trains: all, or only the transformer blocks' attention layers. */
export type FinetuneFilter = 'all' | 'attention';
export const FINETUNE_FILTERS: readonly FinetuneFilter[] = ['all', 'attention'];
/** Which modules get LoRA (adapters/lora-inject.ts): the attention projections (diffusers' default); + everything
 *  else in the transformers (kohya's default networks.lora); + the resnets, down- and upsamplers (kohya LoCon). */
export type LoraTargets = 'attn' | 'attn+ff' | 'attn+ff+conv';
export const LORA_TARGETS: readonly LoraTargets[] = ['attn', 'attn+ff', 'attn+ff+conv'];

/** Fully resolved training configuration; `null` always has the documented meaning, nothing is undefined. */
export interface TrainConfig {
  model: {
    path: string; // diffusers folder or single-file .safetensors (required)
    tokenizer: string | null; // folder with vocab.json + merges.txt; null = the model's own
    config: string | null; // diffusers folder whose configs apply to a single-file model
    backend: BackendName | null; // tfjs backend; null = best available (SDTUNE_BACKEND, tensorflow, cpu)
    prediction_type: 'epsilon' | 'v_prediction' | null; // null = the model's scheduler config
  };
  data: {
    dir: string; // image folder (required)
    caption_extension: string; // caption file next to each image (kohya); diffusers' metadata.jsonl wins when present
    metadata: string | null; // metadata file name in dir (file_name/text columns); null = metadata.jsonl if present
    repeats: number; // each image counts this many times per epoch (kohya's "10_name" folder prefix)
    resolution: [number, number] | null; // [width, height] in pixels (multiples of 8); YAML accepts 512 or [w, h]; null = the UNet's sample_size x 8 (filled in by the loop once the model is loaded, see withModelDefaults)
    center_crop: boolean; // false = random crop (diffusers --center_crop off)
    flip: boolean; // random horizontal flip (kohya flip_aug, diffusers --random_flip)
    buckets: {
      enabled: boolean; // kohya aspect-ratio bucketing (enable_bucket)
      min_side: number; // min_bucket_reso
      max_side: number; // max_bucket_reso
      step: number; // bucket_reso_steps
    };
    caption_dropout: number; // probability of training on an empty caption (kohya caption_dropout_rate)
    shuffle_captions: boolean; // shuffle comma-separated tags (kohya shuffle_caption)
    keep_tokens: number; // first N comma-separated tags stay in place when shuffling (kohya keep_tokens)
    cache_latents: boolean; // encode every image with the VAE once, before training
    cache_dir: string; // where latent caches go (default: output.dir)
    templates: string[] | null; // prompts with {} for the token when images have no captions; null = TI_TEMPLATES
  };
  train: {
    max_steps: number | null; // optimizer steps; when set it decides over epochs (diffusers max_train_steps)
    epochs: number; // passes over images x repeats when max_steps is null
    batch_size: number; // images per forward pass
    gradient_accumulation: number; // forward passes per optimizer step
    lr: number; // base learning rate (LoRA 1e-4 as kohya/diffusers; TI 5e-3 as A1111)
    lr_scheduler: LrSchedulerName; // diffusers get_scheduler names
    lr_warmup_steps: number; // linear warmup in optimizer steps (not with 'constant')
    lr_num_cycles: number; // hard restarts of cosine_with_restarts
    adam_beta1: number;
    adam_beta2: number;
    adam_epsilon: number;
    weight_decay: number; // AdamW decoupled decay (LoRA 1e-2 = torch/diffusers/kohya default; TI 0 as A1111)
    max_grad_norm: number; // clip_grad_norm_ threshold; 0 disables clipping
    seed: number; // torch-compatible seed for noise, timesteps, crops, flips, dropout
    noise_offset: number; // Crosslabs noise offset (diffusers --noise_offset); 0 = off
    min_snr_gamma: number | null; // Min-SNR loss weighting gamma (Hang et al. 2023; 5 is usual); null = off
    mixed_precision: 'no'; // fp16/bf16 training is not supported on tfjs
    gradient_checkpointing: boolean; // recompute the UNet's transformers in the backward pass: ~1/4 the activation memory, ~1.3x the time
    ema: {
      enabled: boolean; // keep an exponential moving average of the trainables (diffusers --use_ema, EMAModel)
      decay: number; // the largest decay (0.9999)
      min_decay: number;
      update_after_step: number; // the average copies the weights for this many steps first
      use_warmup: boolean; // 1 - (1 + step/inv_gamma)^-power instead of (1 + step)/(10 + step)
      inv_gamma: number;
      power: number;
    };
  };
  lora?: {
    rank: number; // kohya network_dim / PEFT r
    alpha: number; // kohya network_alpha / PEFT lora_alpha; scale = alpha / rank
    targets: LoraTargets;
    conv_rank: number | null; // rank of the 3x3 convs with targets attn+ff+conv (kohya conv_dim); null = rank
    conv_alpha: number | null; // their alpha (kohya conv_alpha); null = alpha (kohya's default would be 1)
    text_encoder: boolean; // also train LoRA on the CLIP text encoder (diffusers --train_text_encoder)
    text_encoder_lr: number | null; // null = train.lr (kohya text_encoder_lr)
    dropout: number; // dropout on the LoRA down projection's output (kohya network_dropout)
  };
  textual_inversion?: {
    token: string; // the new prompt word, e.g. "<my-logo>" (diffusers placeholder_token)
    init_word: string; // its initial embedding comes from this word (diffusers initializer_token)
    vectors: number; // embedding vectors per token (A1111 "vectors per token", diffusers --num_vectors)
  };
  finetune?: {
    unet: FinetuneFilter; // which UNet parameters train: 'all' (diffusers train_text_to_image) or 'attention' (attn1/attn2)
    text_encoder: boolean; // also train the whole CLIP text encoder (kohya --train_text_encoder)
    text_encoder_lr: number | null; // null = train.lr
  };
  output: {
    dir: string; // default output/<name>
    name: string; // file name stem of the results; default: TI the token (<my-logo> -> my-logo), else the config file name, else the method
    save_every: number | null; // checkpoint every N steps; null = only at the end
    keep_last: number | null; // intermediate checkpoints kept (diffusers checkpoints_total_limit); null = all
    save_precision: 'fp16' | 'fp32' | 'bf16'; // dtype of the saved result (fp16 for LoRA as kohya; fp32 for embeddings and full fine-tunes; bf16 for full fine-tunes only)
    save_as: 'diffusers' | 'single_file' | 'both'; // full fine-tune: a diffusers folder and/or an LDM single file (A1111, ComfyUI)
    sample_every: number | null; // sample images every N steps; null = never
    sample_prompts: string[]; // prompts for those samples
    sample_seed: number;
    sample_steps: number;
    sample_sampler: string | null; // canonical sampler name; null = the model's scheduler
    log_dir: string; // the TensorBoard events folder of this run; default <logging_dir>/<name>, else <dir>/logs
    logging_dir: string | null; // kohya logging_dir: a folder of TensorBoard runs, each in <logging_dir>/<name>
    also_diffusers_format: boolean; // additionally write PEFT / diffusers-format files
    export_ema: boolean; // with train.ema: export (and sample with) the averaged weights, as diffusers does
  };
}

/** diffusers textual_inversion.py imagenet_templates_small, with {} where the token goes. */
export const TI_TEMPLATES: readonly string[] = [
  'a photo of a {}', 'a rendering of a {}', 'a cropped photo of the {}', 'the photo of a {}', 'a photo of a clean {}',
  'a photo of a dirty {}', 'a dark photo of the {}', 'a photo of my {}', 'a photo of the cool {}', 'a close-up photo of a {}',
  'a bright photo of the {}', 'a cropped photo of a {}', 'a photo of the {}', 'a good photo of the {}', 'a photo of one {}',
  'a close-up photo of the {}', 'a rendition of the {}', 'a photo of the clean {}', 'a rendition of a {}', 'a photo of a nice {}',
  'a good photo of a {}', 'a photo of the nice {}', 'a photo of the small {}', 'a photo of the weird {}', 'a photo of the large {}',
  'a photo of a cool {}', 'a photo of a small {}',
];

/** The short flags every training command accepts -> the dotted key they set. `--config` (the YAML file),
 *  `--resume` (a checkpoint) and `--set key=value` (any key) are not config keys: see flagOverrides. */
export const FLAG_KEYS: Record<string, string> = {
  model: 'model.path', tokenizer: 'model.tokenizer', 'model-config': 'model.config', backend: 'model.backend',
  'prediction-type': 'model.prediction_type',
  data: 'data.dir', repeats: 'data.repeats', resolution: 'data.resolution',
  'max-steps': 'train.max_steps', epochs: 'train.epochs', 'batch-size': 'train.batch_size',
  'gradient-accumulation': 'train.gradient_accumulation', lr: 'train.lr', 'lr-scheduler': 'train.lr_scheduler',
  'lr-warmup-steps': 'train.lr_warmup_steps', seed: 'train.seed', 'gradient-checkpointing': 'train.gradient_checkpointing',
  rank: 'lora.rank', alpha: 'lora.alpha', 'conv-rank': 'lora.conv_rank', 'conv-alpha': 'lora.conv_alpha',
  'train-text-encoder': 'lora.text_encoder',
  token: 'textual_inversion.token', 'init-word': 'textual_inversion.init_word', vectors: 'textual_inversion.vectors',
  output: 'output.dir', name: 'output.name', 'save-every': 'output.save_every', 'save-precision': 'output.save_precision',
  'sample-every': 'output.sample_every', 'sample-prompt': 'output.sample_prompts', logdir: 'output.logging_dir',
};
const NON_CONFIG_FLAGS = new Set(['config', 'resume', 'set', 'overwrite']);

// ---- schema: one entry per dotted key ----

interface Spec {
  t: 'str' | 'int' | 'num' | 'bool' | 'enum' | 'strs' | 'size';
  nullable?: boolean;
  min?: number; // inclusive unless minOpen
  max?: number; // inclusive unless maxOpen
  minOpen?: boolean;
  maxOpen?: boolean;
  mult?: number; // integers: multiple of
  values?: readonly string[]; // enum
}
const str = (nullable = false): Spec => ({ t: 'str', nullable });
const int = (min: number, o: Partial<Spec> = {}): Spec => ({ t: 'int', min, ...o });
const num = (min: number, o: Partial<Spec> = {}): Spec => ({ t: 'num', min, ...o });
const bool: Spec = { t: 'bool' };
const oneOf = (values: readonly string[], nullable = false): Spec => ({ t: 'enum', values, nullable });

const SCHEMA: Record<string, Spec> = {
  'model.path': str(), 'model.tokenizer': str(true), 'model.config': str(true), 'model.backend': oneOf(BACKENDS, true),
  'model.prediction_type': oneOf(['epsilon', 'v_prediction'], true),
  'data.dir': str(), 'data.caption_extension': str(), 'data.metadata': str(true), 'data.repeats': int(1),
  'data.resolution': { t: 'size', nullable: true }, 'data.center_crop': bool, 'data.flip': bool,
  'data.buckets.enabled': bool, 'data.buckets.min_side': int(8, { mult: 8 }), 'data.buckets.max_side': int(8, { mult: 8 }),
  'data.buckets.step': int(8, { mult: 8 }),
  'data.caption_dropout': num(0, { max: 1 }), 'data.shuffle_captions': bool, 'data.keep_tokens': int(0),
  'data.cache_latents': bool, 'data.cache_dir': str(true), 'data.templates': { t: 'strs', nullable: true },
  'train.max_steps': int(1, { nullable: true }), 'train.epochs': int(1), 'train.batch_size': int(1),
  'train.gradient_accumulation': int(1), 'train.lr': num(0, { minOpen: true }), 'train.lr_scheduler': oneOf(LR_SCHEDULERS),
  'train.lr_warmup_steps': int(0), 'train.lr_num_cycles': int(1),
  'train.adam_beta1': num(0, { max: 1, maxOpen: true }), 'train.adam_beta2': num(0, { max: 1, maxOpen: true }),
  'train.adam_epsilon': num(0), 'train.weight_decay': num(0), 'train.max_grad_norm': num(0), 'train.seed': int(0, { max: Number.MAX_SAFE_INTEGER }),
  'train.noise_offset': num(0), 'train.min_snr_gamma': num(0, { minOpen: true, nullable: true }), 'train.mixed_precision': str(),
  'train.gradient_checkpointing': bool,
  'train.ema.enabled': bool, 'train.ema.decay': num(0, { max: 1 }), 'train.ema.min_decay': num(0, { max: 1 }),
  'train.ema.update_after_step': int(0), 'train.ema.use_warmup': bool, 'train.ema.inv_gamma': num(0, { minOpen: true }),
  'train.ema.power': num(0, { minOpen: true }), 'output.export_ema': bool,
  'lora.rank': int(1), 'lora.alpha': num(0, { minOpen: true }), 'lora.targets': oneOf(LORA_TARGETS),
  'lora.conv_rank': int(1, { nullable: true }), 'lora.conv_alpha': num(0, { minOpen: true, nullable: true }), 'lora.text_encoder': bool,
  'lora.text_encoder_lr': num(0, { minOpen: true, nullable: true }), 'lora.dropout': num(0, { max: 1, maxOpen: true }),
  'textual_inversion.token': str(), 'textual_inversion.init_word': str(), 'textual_inversion.vectors': int(1, { max: 75 }),
  'output.dir': str(true), 'output.name': str(true), 'output.save_every': int(1, { nullable: true }),
  'output.keep_last': int(1, { nullable: true }), 'output.save_precision': oneOf(['fp16', 'fp32', 'bf16']),
  'output.save_as': oneOf(['diffusers', 'single_file', 'both']),
  'finetune.unet': oneOf(FINETUNE_FILTERS), 'finetune.text_encoder': bool, 'finetune.text_encoder_lr': num(0, { minOpen: true, nullable: true }),
  'output.sample_every': int(1, { nullable: true }), 'output.sample_prompts': { t: 'strs' }, 'output.sample_seed': int(0, { max: Number.MAX_SAFE_INTEGER }),
  'output.sample_steps': int(1), 'output.sample_sampler': str(true), 'output.log_dir': str(true), 'output.logging_dir': str(true),
  'output.also_diffusers_format': bool,
};
const SECTIONS = ['model', 'data', 'train', 'lora', 'textual_inversion', 'finetune', 'output'];
const GROUPS = new Set([...SECTIONS, 'data.buckets', 'train.ema']);
const REQUIRED = ['model.path', 'data.dir', 'textual_inversion.token', 'textual_inversion.init_word'];

/** Defaults per method (kohya / diffusers conventions; the lr / weight decay / save precision differ by method). */
function defaults(method: Method): Record<string, unknown> {
  const lora = method === 'lora';
  const ft = method === 'finetune';
  return {
    'model.tokenizer': null, 'model.config': null, 'model.backend': null, 'model.prediction_type': null,
    'data.caption_extension': '.txt', 'data.metadata': null, 'data.repeats': 1, 'data.resolution': null,
    'data.center_crop': false, 'data.flip': false, 'data.buckets.enabled': false, 'data.buckets.min_side': 256,
    'data.buckets.max_side': 1024, 'data.buckets.step': 64, 'data.caption_dropout': 0, 'data.shuffle_captions': false,
    'data.keep_tokens': 0, 'data.cache_latents': true, 'data.cache_dir': null, 'data.templates': null,
    'train.max_steps': null, 'train.epochs': 1, 'train.batch_size': 1, 'train.gradient_accumulation': 1,
    'train.lr': lora ? 1e-4 : ft ? 1e-5 : 5e-3, 'train.lr_scheduler': 'constant', 'train.lr_warmup_steps': 0, 'train.lr_num_cycles': 1,
    'train.adam_beta1': 0.9, 'train.adam_beta2': 0.999, 'train.adam_epsilon': 1e-8, 'train.weight_decay': lora || ft ? 1e-2 : 0,
    'train.max_grad_norm': 1, 'train.seed': 42, 'train.noise_offset': 0, 'train.min_snr_gamma': null, 'train.mixed_precision': 'no',
    'train.gradient_checkpointing': false,
    'train.ema.enabled': false, 'train.ema.decay': 0.9999, 'train.ema.min_decay': 0, 'train.ema.update_after_step': 0,
    'train.ema.use_warmup': false, 'train.ema.inv_gamma': 1, 'train.ema.power': 2 / 3, 'output.export_ema': true,
    ...(lora
      ? { 'lora.rank': 16, 'lora.alpha': 8, 'lora.targets': 'attn', 'lora.conv_rank': null, 'lora.conv_alpha': null, 'lora.text_encoder': false, 'lora.text_encoder_lr': null, 'lora.dropout': 0 }
      : ft
        ? { 'finetune.unet': 'all', 'finetune.text_encoder': false, 'finetune.text_encoder_lr': null }
        : { 'textual_inversion.vectors': 1 }),
    'output.dir': null, 'output.name': null, 'output.save_every': null, 'output.keep_last': 3,
    'output.save_precision': lora ? 'fp16' : 'fp32', 'output.sample_every': null, 'output.sample_prompts': [],
    'output.sample_seed': 42, 'output.sample_steps': 20, 'output.sample_sampler': null, 'output.log_dir': null, 'output.logging_dir': null,
    'output.also_diffusers_format': false, 'output.save_as': 'diffusers',
  };
}

// ---- unknown keys: kohya / diffusers spellings first, then the closest valid key ----

const ALIASES: Record<string, string> = {
  learning_rate: 'train.lr', unet_lr: 'train.lr', max_train_steps: 'train.max_steps', num_train_epochs: 'train.epochs',
  max_train_epochs: 'train.epochs', train_batch_size: 'train.batch_size', gradient_accumulation_steps: 'train.gradient_accumulation',
  lr_scheduler_num_cycles: 'train.lr_num_cycles', gradient_checkpointing: 'train.gradient_checkpointing', adam_weight_decay: 'train.weight_decay', snr_gamma: 'train.min_snr_gamma',
  network_dim: 'lora.rank', r: 'lora.rank', network_alpha: 'lora.alpha', lora_alpha: 'lora.alpha', network_dropout: 'lora.dropout',
  lora_dropout: 'lora.dropout', train_text_encoder: 'lora.text_encoder', target_modules: 'lora.targets',
  conv_dim: 'lora.conv_rank', conv_lora_dim: 'lora.conv_rank', conv_alpha: 'lora.conv_alpha',
  placeholder_token: 'textual_inversion.token', token_string: 'textual_inversion.token', initializer_token: 'textual_inversion.init_word',
  num_vectors: 'textual_inversion.vectors', num_vectors_per_token: 'textual_inversion.vectors',
  pretrained_model_name_or_path: 'model.path', tokenizer_name: 'model.tokenizer', v_parameterization: 'model.prediction_type',
  train_data_dir: 'data.dir', num_repeats: 'data.repeats', dataset_repeats: 'data.repeats', random_flip: 'data.flip',
  use_ema: 'train.ema.enabled', ema_decay: 'train.ema.decay', ema_min_decay: 'train.ema.min_decay',
  flip_aug: 'data.flip', enable_bucket: 'data.buckets.enabled', min_bucket_reso: 'data.buckets.min_side',
  max_bucket_reso: 'data.buckets.max_side', bucket_reso_steps: 'data.buckets.step', caption_dropout_rate: 'data.caption_dropout',
  output_dir: 'output.dir', output_name: 'output.name', logging_dir: 'output.logging_dir', save_every_n_steps: 'output.save_every',
  checkpointing_steps: 'output.save_every', checkpoints_total_limit: 'output.keep_last', sample_every_n_steps: 'output.sample_every',
  validation_steps: 'output.sample_every', validation_prompt: 'output.sample_prompts',
};
const NOTES: Record<string, string> = {
  optimizer_type: 'sdtune always uses AdamW (train.adam_*, train.weight_decay)',
  optimizer: 'sdtune always uses AdamW (train.adam_*, train.weight_decay)',
  use_8bit_adam: 'sdtune always uses AdamW (train.adam_*, train.weight_decay)',
  network_args: 'kohya conv_dim / conv_alpha are lora.conv_rank / lora.conv_alpha, with lora.targets: attn+ff+conv',
  network_module: 'sdtune trains kohya networks.lora (LoRA, and LoCon with lora.targets: attn+ff+conv)',
};

/** Edit distance (Levenshtein), for "did you mean". */
function levenshtein(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[b.length];
}

const sectionOf = (key: string) => key.split('.')[0];
const isMethodSection = (s: string): s is Method => (METHODS as readonly string[]).includes(s);
const validKeys = (method: Method) => [...Object.keys(SCHEMA), ...GROUPS].filter((k) => !isMethodSection(sectionOf(k)) || sectionOf(k) === method);

/** The valid key a user most likely meant by `key`, if any. */
function suggest(key: string, method: Method): string | undefined {
  if (key.length > 100) return undefined; // no valid key is that long (and edit distance costs length x length)
  const leaf = key.slice(key.lastIndexOf('.') + 1);
  const valid = validKeys(method);
  const alias = ALIASES[leaf];
  if (alias && valid.includes(alias)) return alias;
  const sameLeaf = valid.find((k) => k.endsWith(`.${leaf}`));
  if (sameLeaf) return sameLeaf;
  let best: string | undefined;
  let bestD = Infinity;
  for (const k of valid) {
    const d = levenshtein(key, k);
    if (d < bestD) [best, bestD] = [k, d];
  }
  if (bestD <= Math.max(2, Math.floor(leaf.length / 3))) return best;
  const depth = (k: string) => k.split('.').length;
  return valid.find((k) => depth(k) === depth(key) && (k.startsWith(key) || key.startsWith(k)));
}

// ---- values ----

const isMap = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const show = (v: unknown): string => {
  const s = v === null ? 'null' : Array.isArray(v) ? JSON.stringify(v) : isMap(v) ? 'a mapping' : typeof v === 'string' ? JSON.stringify(v) : String(v);
  return s.length > 100 ? `${s.slice(0, 97)}...` : s; // one short line, whatever the file holds
};

function expected(s: Spec): string {
  const range = (what: string) => {
    if (s.max === undefined) return `${what} ${s.minOpen ? '>' : '>='} ${s.min}`;
    return `${what} in ${s.minOpen ? '(' : '['}${s.min}, ${s.max}${s.maxOpen ? ')' : ']'}`;
  };
  const base = {
    str: 'a string',
    int: range('an integer') + (s.mult ? `, a multiple of ${s.mult}` : ''),
    num: range('a number'),
    bool: 'true or false',
    enum: `one of ${(s.values ?? []).map((v) => JSON.stringify(v)).join(', ')}`,
    strs: 'a list of strings',
    size: 'a size in pixels, multiple of 8: 512 or [width, height]',
  }[s.t];
  if (!s.nullable) return base;
  return s.t === 'size' ? `${base}, or null for the model's own size` : `${base} or null`;
}

/** Command-line values arrive as strings: read them as YAML scalars (1e-4, true, null, [512, 768]) where the key
 *  is not a string; "768x512" / "768,512" are sizes; a single prompt is a list of one. */
function coerceFlag(s: Spec, v: unknown): unknown {
  if (typeof v !== 'string') return v;
  if (s.t === 'strs') return [v];
  if (s.t === 'size' && /^\d+\s*[x,]\s*\d+$/.test(v.trim())) return v.split(/[x,]/).map((p) => Number(p.trim()));
  if (s.t === 'str') return v;
  try {
    return YAML.parse(v) ?? null;
  } catch {
    return v;
  }
}

/** The value if it fits the spec (sizes normalised to [w, h]), else undefined. */
function conform(s: Spec, v: unknown): unknown {
  if (v === null) return s.nullable ? null : undefined;
  const inRange = (x: number) =>
    (s.min === undefined || (s.minOpen ? x > s.min : x >= s.min)) && (s.max === undefined || (s.maxOpen ? x < s.max : x <= s.max));
  switch (s.t) {
    case 'str':
      return typeof v === 'string' ? v : undefined;
    case 'bool':
      return typeof v === 'boolean' ? v : undefined;
    case 'num':
      return typeof v === 'number' && Number.isFinite(v) && inRange(v) ? v : undefined;
    case 'int':
      return Number.isInteger(v) && inRange(v as number) && (!s.mult || (v as number) % s.mult === 0) ? v : undefined;
    case 'enum':
      return typeof v === 'string' && s.values!.includes(v) ? v : undefined;
    case 'strs':
      return Array.isArray(v) && v.every((x) => typeof x === 'string') ? [...v] : undefined;
    case 'size': {
      const wh = typeof v === 'number' ? [v, v] : v;
      const ok = Array.isArray(wh) && wh.length === 2 && wh.every((x) => Number.isInteger(x) && x >= 8 && x % 8 === 0);
      return ok ? [wh[0], wh[1]] : undefined;
    }
  }
}

// ---- resolve ----

type Origin = Map<string, string>; // dotted key -> "file.yaml:12" or "--lr"

/** "file.yaml:12 " / "--lr " / "" before a key in messages. */
const at = (origin: Origin, key: string) => (origin.has(key) ? `${origin.get(key)}: ` : '');

/** Line of every key in a YAML mapping tree, for messages. */
function keyLines(doc: YAML.Document, lc: YAML.LineCounter, source: string): Origin {
  const out: Origin = new Map();
  const walk = (node: unknown, prefix: string) => {
    if (!YAML.isMap(node)) return;
    for (const it of node.items) {
      const k = YAML.isScalar(it.key) ? String(it.key.value) : String(it.key);
      const key = prefix ? `${prefix}.${k}` : k;
      const range = YAML.isNode(it.key) ? it.key.range : undefined;
      if (range) out.set(key, `${source}:${lc.linePos(range[0]).line}`);
      walk(it.value, key);
    }
  };
  walk(doc.contents, '');
  return out;
}

/** "unknown key x (did you mean y?)", with a note for options sdtune does not have. */
function unknownKey(key: string, method: Method, origin: Origin): SdtuneError {
  const leaf = key.slice(key.lastIndexOf('.') + 1);
  const sec = sectionOf(key);
  const guess = suggest(key, method);
  // the section's own keys, a nested group once by its name (train.ema, not each of its keys)
  const inSection = GROUPS.has(sec) ? [...new Set(validKeys(method).filter((k) => sectionOf(k) === sec && k !== sec).map((k) => k.split('.').slice(0, 2).join('.')))] : [];
  const hint =
    NOTES[leaf] ??
    (guess ? `did you mean ${guess}?`
      : inSection.length ? `valid keys: ${inSection.join(', ')}`
      : `valid sections: ${SECTIONS.filter((s) => !isMethodSection(s) || s === method).join(', ')}`);
  return usageError(`${at(origin, key)}unknown key ${clip(JSON.stringify(key).slice(1, -1))} (${hint})`);
}

/**
 * Put a leaf or a whole group (mapping) under `key` into the flat map; keys the schema does not know are added to
 * `problems` (every one is reported, not just the first).
 */
function addFlat(flat: Map<string, unknown>, key: string, v: unknown, method: Method, origin: Origin, problems: string[]): void {
  if (!GROUPS.has(key)) {
    if (!(key in SCHEMA)) problems.push(unknownKey(key, method, origin).message);
    else flat.set(key, v);
    return;
  }
  if (v === null) return; // an empty section ("lora:" with nothing under it)
  if (!isMap(v)) {
    const inner = validKeys(method).filter((k) => k.startsWith(`${key}.`) && !k.slice(key.length + 1).includes('.'));
    problems.push(`${at(origin, key)}${key}: expected a mapping with keys ${inner.map((k) => k.slice(key.length + 1)).join(', ')}, found ${show(v)}`);
    return;
  }
  for (const [k, x] of Object.entries(v)) {
    if (origin.has(key) && !origin.has(`${key}.${k}`)) origin.set(`${key}.${k}`, origin.get(key)!);
    addFlat(flat, `${key}.${k}`, x, method, origin, problems);
  }
}

/** Set a dotted key in a nested object. */
function setPath(obj: Record<string, unknown>, key: string, v: unknown): void {
  const parts = key.split('.');
  let o = obj;
  for (const p of parts.slice(0, -1)) o = (o[p] ??= {}) as Record<string, unknown>;
  o[parts[parts.length - 1]] = v;
}

// ---- bounded YAML: a config from a stranger costs little time and memory, and every failure is one line ----

/** A training config is a few KB with under 100 keys, so these only stop hostile files. */
export const MAX_CONFIG_BYTES = 1 << 20;
export const MAX_CONFIG_KEYS = 1000;
const MAX_YAML_TOKENS = 50_000; // a config of 1000 keys and 1000 list items has ~15,000; bounds the work of error-heavy input
const MAX_YAML_DEPTH = 64;
const MAX_YAML_ALIASES = 100; // the yaml library's maxAliasCount: aliases resolved in all (billion-laughs guard)

/** `s` cut to `n` characters for a one-line message. */
const clip = (s: string, n = 80) => (s.length > n ? `${s.slice(0, n - 3)}...` : s);
/** 1-based line of character `offset`. */
const lineAt = (text: string, offset: number) => {
  let line = 1;
  for (let i = text.indexOf('\n'); i >= 0 && i < offset; i = text.indexOf('\n', i + 1)) line++;
  return line;
};

/**
 * Parse YAML text with its cost bounded before the yaml library builds anything: size, the number of mapping keys
 * (its duplicate-key check is quadratic per mapping) and the nesting depth (its composer recurses, and deep input
 * can exhaust the stack or the heap) are checked on the lexer's token stream, then exactly on the CST.
 */
function parseYamlBounded(text: string, src: string): { doc: YAML.Document.Parsed; lc: YAML.LineCounter } {
  if (text.length > MAX_CONFIG_BYTES) throw fileError(`${src}: the config is ${text.length.toLocaleString('en-US')} characters, more than the ${MAX_CONFIG_BYTES.toLocaleString('en-US')} a config may have`);
  const tooDeep = (offset: number) => fileError(`${src}:${lineAt(text, offset)}: invalid YAML: nested more than ${MAX_YAML_DEPTH} levels deep`);
  // 1. tokens: keys (":" and "?" indicators), flow depth, block indicators on one line ("- - - x" nests without indent)
  let offset = 0;
  let keys = 0;
  let flow = 0;
  let onLine = 0;
  let count = 0;
  for (const tok of new YAML.Lexer().lex(text)) {
    if (++count > MAX_YAML_TOKENS) throw fileError(`${src}:${lineAt(text, offset)}: the config has more than ${MAX_YAML_TOKENS.toLocaleString('en-US')} YAML tokens (not a training config?)`);
    if (tok === '[' || tok === '{') {
      if (++flow > MAX_YAML_DEPTH) throw tooDeep(offset);
    } else if (tok === ']' || tok === '}') flow = Math.max(0, flow - 1);
    else if (tok === ':' || tok === '?') {
      if (++keys > MAX_CONFIG_KEYS) throw fileError(`${src}:${lineAt(text, offset)}: the config has more than ${MAX_CONFIG_KEYS} keys (a training config has under 100)`);
    } else if (tok === '\n' || tok === '\r\n') onLine = 0;
    if (flow === 0 && (tok === '-' || tok === '?' || tok === ':') && ++onLine > MAX_YAML_DEPTH) throw tooDeep(offset);
    if (tok !== YAML.CST.DOCUMENT && tok !== YAML.CST.FLOW_END && tok !== YAML.CST.SCALAR) offset += tok.length;
  }
  // 2. the CST, depth exactly (iteratively: the depth is what is being bounded)
  const lc = new YAML.LineCounter();
  const tokens = [...new YAML.Parser(lc.addNewLine).parse(text)];
  const stack: [YAML.CST.Token | null | undefined, number][] = tokens.map((t) => [t, 0]);
  while (stack.length) {
    const [t, depth] = stack.pop()!;
    if (!t) continue;
    if (depth > MAX_YAML_DEPTH) throw tooDeep(t.offset);
    if (t.type === 'document') stack.push([t.value, depth]);
    else if (t.type === 'block-map' || t.type === 'block-seq' || t.type === 'flow-collection') {
      for (const it of t.items) stack.push([it.value, depth + 1], [it.key, depth + 1]); // the key first: it names the line
    }
  }
  // 3. compose (as YAML.parseDocument does)
  const composer = new YAML.Composer({ prettyErrors: false });
  const docs: YAML.Document.Parsed[] = [];
  for (const d of composer.compose(tokens, true, text.length)) if (docs.push(d) > 1) break;
  const doc = docs[0]!;
  if (docs.length > 1) throw fileError(`${src}:${lc.linePos(docs[1]!.range[0]).line}: invalid YAML: a config holds one document (found a second "---")`);
  if (doc.errors.length) {
    const e = doc.errors[0]!;
    throw fileError(`${src}:${lc.linePos(e.pos[0]).line}: invalid YAML: ${clip(e.message.split('\n')[0]!, 200)}`);
  }
  return { doc, lc };
}

/** doc.toJS with aliases bounded; its errors (an alias to a missing anchor, too many aliases) name the alias's line. */
function yamlToJs(doc: YAML.Document.Parsed, lc: YAML.LineCounter, src: string): unknown {
  try {
    return doc.toJS({ maxAliasCount: MAX_YAML_ALIASES });
  } catch (e) {
    // the first alias whose anchor is not defined before it (as the library resolves them), else the first alias
    let at: YAML.Alias | undefined;
    const anchors = new Set<string>();
    YAML.visit(doc, (_, n) => {
      if (YAML.isAlias(n)) {
        at ??= n;
        if (!anchors.has(n.source)) return ((at = n), YAML.visit.BREAK);
      } else if (YAML.isNode(n) && n.anchor) anchors.add(n.anchor);
    });
    const line = at?.range ? `:${lc.linePos(at.range[0]).line}` : '';
    throw fileError(`${src}${line}: invalid YAML: ${clip((e as Error).message.split('\n')[0]!, 200)}`);
  }
}

/**
 * Parse YAML text (`source` names it in messages), merge flag overrides (dotted keys like 'train.lr' or the FLAG_KEYS
 * names; undefined values ignored; strings read as YAML scalars), fill the method's defaults and validate types,
 * ranges and cross-field rules. Every problem is an SdtuneError('usage') naming the key, expected vs found.
 */
export function resolveConfig(method: Method, yamlText: string | null, overrides: Record<string, unknown>, source?: string): TrainConfig {
  if (!isMethodSection(method)) throw usageError(`unknown training method ${show(method)}; valid: ${METHODS.join(', ')}`);
  const src = source ?? '<config>';
  const origin: Origin = new Map();
  const flat = new Map<string, unknown>();
  const problems: string[] = []; // everything wrong with the file and the flags, reported together

  // 1. the file
  if (yamlText !== null && yamlText.trim() !== '') {
    const { doc, lc } = parseYamlBounded(yamlText, src);
    for (const [k, v] of keyLines(doc, lc, src)) origin.set(k, v);
    const root = yamlToJs(doc, lc, src);
    if (root !== null && !isMap(root)) throw usageError(`${src}: expected a mapping with sections ${SECTIONS.join(', ')}, found ${show(root)}`);
    for (const [k, v] of Object.entries(root ?? {})) {
      if (isMethodSection(k) && k !== method) {
        throw usageError(`${at(origin, k)}the config has a ${k} section, but this command trains ${method}: a config holds exactly one method section, the command's`);
      }
      addFlat(flat, k, v, method, origin, problems);
    }
  }

  // 2. the flags
  for (const [name, raw] of Object.entries(overrides)) {
    if (raw === undefined || NON_CONFIG_FLAGS.has(name)) continue;
    // --train-text-encoder sets the trained method's own key
    const key = name === 'train-text-encoder' && method === 'finetune' ? 'finetune.text_encoder' : (FLAG_KEYS[name] ?? name);
    const label = FLAG_KEYS[name] ? `--${name}` : `override ${name}`;
    if (!(key in SCHEMA) && !GROUPS.has(key)) {
      problems.push(key.includes('.') ? unknownKey(key, method, new Map([[key, label]])).message : `unknown option --${name}${suggestFlag(name)}`);
      continue;
    }
    if (isMethodSection(sectionOf(key)) && sectionOf(key) !== method) {
      problems.push(`${label}: ${key} is a ${sectionOf(key)} setting, but this command trains ${method}`);
      continue;
    }
    origin.set(key, label);
    if (GROUPS.has(key)) addFlat(flat, key, raw, method, origin, problems);
    else flat.set(key, coerceFlag(SCHEMA[key], raw));
  }

  // 3. defaults, required keys, types and ranges
  const values = new Map<string, unknown>(Object.entries(defaults(method)));
  for (const [k, v] of flat) values.set(k, v);
  const cfg: Record<string, unknown> = {};
  for (const [key, spec] of Object.entries(SCHEMA)) {
    if (isMethodSection(sectionOf(key)) && sectionOf(key) !== method) continue;
    const v = values.get(key);
    if (v === undefined) {
      const flag = Object.keys(FLAG_KEYS).find((f) => FLAG_KEYS[f] === key);
      problems.push(`${key} is required (set it in the config${flag ? ` or with --${flag}` : ''})`);
      continue;
    }
    const ok = conform(spec, v);
    if (ok === undefined) {
      const hint = spec.t === 'strs' && typeof v === 'string' ? ' (write a YAML list, one "- item" per line)' : '';
      problems.push(`${at(origin, key)}${key}: expected ${expected(spec)}, found ${show(v)}${hint}`);
      continue;
    }
    setPath(cfg, key, ok);
  }
  // one line per problem; the CLI prints each as its own "error: ..." line
  if (problems.length) throw usageError(problems.join('\nerror: '));
  const c = cfg as unknown as TrainConfig;

  // 4. rules between keys and beyond types
  crossCheck(c, method, origin);

  // 5. derived values
  // an embedding is named after its token: A1111 loads it by file name (<my-logo> -> my-logo.safetensors)
  c.output.name ??= c.textual_inversion ? embeddingFileStem(c.textual_inversion.token) : source ? path.basename(source).replace(/\.(ya?ml)$/i, '') : method;
  c.output.dir ??= `output/${c.output.name}`;
  // `tensorboard --logdir <logging_dir>` lists the runs by name
  c.output.log_dir ??= c.output.logging_dir ? path.posix.join(c.output.logging_dir.replace(/\\/g, '/'), c.output.name) : path.posix.join(c.output.dir.replace(/\\/g, '/'), 'logs');
  c.data.cache_dir ??= c.output.dir;
  return c;
}

/** " (did you mean --x?)" for a mistyped flag name. */
function suggestFlag(name: string): string {
  const flags = Object.keys(FLAG_KEYS);
  const best = flags.reduce((a, b) => (levenshtein(name, a) <= levenshtein(name, b) ? a : b));
  if (levenshtein(name, best) <= 2) return ` (did you mean --${best}?)`;
  return ` (valid: ${flags.map((f) => `--${f}`).join(', ')}; any key with --set key=value)`;
}

/** Checks that involve several keys or more than a type. */
function crossCheck(c: TrainConfig, method: Method, origin: Origin): void {
  const fail = (key: string, msg: string) => {
    throw usageError(`${at(origin, key)}${msg}`);
  };
  const nonEmpty = (key: string, v: string) => {
    if (v.trim() === '') fail(key, `${key}: expected a non-empty string, found ${show(v)}`);
  };
  nonEmpty('model.path', c.model.path);
  nonEmpty('data.dir', c.data.dir);
  const { train: t, data: d, output: o } = c;

  if (t.mixed_precision !== 'no') {
    const msg = `train.mixed_precision: ${show(t.mixed_precision)} is not supported: TensorFlow.js trains in float32; use "no" (output.save_precision still writes fp16 files)`;
    if (['fp16', 'bf16', 'fp8'].includes(t.mixed_precision)) throw new SdtuneError('unsupported', `${at(origin, 'train.mixed_precision')}${msg}`);
    fail('train.mixed_precision', `train.mixed_precision: expected "no", found ${show(t.mixed_precision)}`);
  }
  if (t.lr_scheduler === 'constant' && t.lr_warmup_steps > 0) {
    fail('train.lr_warmup_steps', `train.lr_warmup_steps is ${t.lr_warmup_steps} but train.lr_scheduler "constant" has no warmup (use "constant_with_warmup")`);
  }
  if (t.max_steps !== null && t.lr_warmup_steps > t.max_steps) {
    fail('train.lr_warmup_steps', `train.lr_warmup_steps (${t.lr_warmup_steps}) exceeds train.max_steps (${t.max_steps})`);
  }
  if (!d.caption_extension.startsWith('.') || d.caption_extension.length < 2) {
    fail('data.caption_extension', `data.caption_extension: expected an extension starting with "." (e.g. ".txt"), found ${show(d.caption_extension)}`);
  }
  const bad = d.templates?.find((s) => !s.includes('{}'));
  if (bad !== undefined) fail('data.templates', `data.templates: every template needs {} where the token goes, found ${show(bad)}`);
  const b = d.buckets;
  if (b.min_side > b.max_side) fail('data.buckets.min_side', `data.buckets.min_side (${b.min_side}) exceeds data.buckets.max_side (${b.max_side})`);
  if (d.resolution) checkBucketRange(d.resolution, b, at(origin, 'data.resolution'));
  if (o.sample_every !== null && o.sample_prompts.length === 0) {
    fail('output.sample_every', 'output.sample_every is set but output.sample_prompts is empty (list the prompts to sample)');
  }
  if (o.sample_sampler !== null) {
    try {
      o.sample_sampler = resolveSampler(o.sample_sampler);
    } catch (e) {
      fail('output.sample_sampler', `output.sample_sampler: ${(e as Error).message}`);
    }
  }
  for (const key of ['output.name', 'output.dir', 'output.log_dir', 'output.logging_dir', 'data.cache_dir'] as const) {
    const [sec, k] = key.split('.') as ['output' | 'data', string];
    const v = (c[sec] as Record<string, unknown>)[k];
    if (v === '' || (key === 'output.name' && typeof v === 'string' && (/[/\\]/.test(v) || v === '.' || v === '..'))) {
      fail(key, `${key}: expected ${key === 'output.name' ? 'a file name without / or \\' : 'a non-empty path'}, found ${show(v)}`);
    }
  }
  if (method !== 'finetune') {
    if (c.output.save_precision === 'bf16') fail('output.save_precision', `output.save_precision bf16 is for full fine-tunes; ${method} results are saved as fp16 or fp32`);
    if (c.output.save_as !== 'diffusers') fail('output.save_as', `output.save_as is for full fine-tunes (${method} writes ${method === 'lora' ? 'LoRA' : 'embedding'} files)`);
  }
  if (method === 'lora') {
    const l = c.lora!;
    if (l.text_encoder_lr !== null && !l.text_encoder) {
      fail('lora.text_encoder_lr', 'lora.text_encoder_lr is set but lora.text_encoder is false (the text encoder is not trained)');
    }
    for (const key of ['conv_rank', 'conv_alpha'] as const) {
      if (l[key] !== null && l.targets !== 'attn+ff+conv') {
        fail(`lora.${key}`, `lora.${key} is set but lora.targets ${show(l.targets)} adapts no 3x3 convolutions (use lora.targets: attn+ff+conv)`);
      }
    }
  } else if (method === 'finetune') {
    const f = c.finetune!;
    if (f.text_encoder_lr !== null && !f.text_encoder) {
      fail('finetune.text_encoder_lr', 'finetune.text_encoder_lr is set but finetune.text_encoder is false (the text encoder is not trained)');
    }
  } else {
    const ti = c.textual_inversion!;
    if (!/^\S+$/.test(ti.token) || ti.token.includes(',')) {
      fail('textual_inversion.token', `textual_inversion.token: expected one word without spaces or commas, like "<my-logo>", found ${show(ti.token)}`);
    }
    nonEmpty('textual_inversion.init_word', ti.init_word);
    if (ti.token === ti.init_word.trim()) fail('textual_inversion.token', `textual_inversion.token must differ from textual_inversion.init_word (both ${show(ti.token)})`);
  }
}

/** With buckets on, the resolution must lie within their side range. */
function checkBucketRange([w, h]: [number, number], b: TrainConfig['data']['buckets'], where: string): void {
  if (b.enabled && (Math.min(w, h) < b.min_side || Math.max(w, h) > b.max_side)) {
    throw usageError(`${where}data.resolution ${w}x${h} must lie within data.buckets.min_side..max_side (${b.min_side}..${b.max_side}) when buckets are enabled`);
  }
}

/** A config whose model-dependent defaults are filled in (what the loop trains with and saves). */
export type ModelResolvedConfig = TrainConfig & { data: TrainConfig['data'] & { resolution: [number, number] } };

/**
 * Fill the defaults that follow the model, once it is loaded: data.resolution null -> the UNet's sample_size x 8
 * (the size the model was trained at, as diffusers' pipelines default to: 512 for SD v1, 64 for the bundled tiny
 * model). Returns a new config; the loop saves this one, so a resume reads back the same resolution.
 */
export function withModelDefaults(c: TrainConfig, unetSampleSize: number, pixelsPerLatent = 8): ModelResolvedConfig {
  if (c.data.resolution) return c as ModelResolvedConfig;
  const side = unetSampleSize * pixelsPerLatent; // the VAE's 2^(levels-1): 8 for SD v1, 4 for the toy world's
  const out = { ...c, data: { ...c.data, resolution: [side, side] as [number, number] } };
  checkBucketRange(out.data.resolution, out.data.buckets, `data.resolution (default: the UNet's sample_size ${unetSampleSize} x ${pixelsPerLatent}): `);
  return out;
}

/** An upscale by more than this (training side / the images' median short side) is warned about. */
export const RESOLUTION_UPSCALE_WARNING = 2;

/**
 * A warning when the training resolution is far above the images' own size: every image is upscaled (no detail is
 * gained) while a step costs as much as at the full resolution (the UNet's work grows with the pixel count).
 * Rule: the resolution's shorter side over the median of the images' shorter sides exceeds
 * RESOLUTION_UPSCALE_WARNING. The suggestion is that median rounded down to a multiple of 8.
 */
export function resolutionWarning(resolution: [number, number], images: readonly { width: number; height: number }[]): string | undefined {
  if (images.length === 0) return undefined;
  const shorts = images.map((i) => Math.min(i.width, i.height)).sort((a, b) => a - b);
  const median = shorts[Math.floor((shorts.length - 1) / 2)];
  const [w, h] = resolution;
  const ratio = Math.min(w, h) / median;
  if (!(ratio > RESOLUTION_UPSCALE_WARNING)) return undefined;
  const largest = images.reduce((a, i) => (i.width * i.height > a.width * a.height ? i : a));
  const suggest = Math.max(8, Math.floor(median / 8) * 8);
  const same = images.every((i) => i.width === largest.width && i.height === largest.height);
  const sizes = same ? `${largest.width}x${largest.height}` : `median short side ${median} px, largest ${largest.width}x${largest.height}`;
  return (
    `data.resolution ${w}x${h} is ${ratio.toFixed(1)}x the images' size (${images.length} images, ${sizes}): every image is ` +
    `upscaled and each step costs as much as at ${w}x${h}; to train at the images' size use --resolution ${suggest}`
  );
}

/** Read a YAML config file (null = flags only) and resolveConfig it; a missing file is an SdtuneError('file'). */
export async function loadConfigFile(method: Method, file: string | null, overrides: Record<string, unknown>): Promise<TrainConfig> {
  if (file === null) return resolveConfig(method, null, overrides);
  let text: string;
  try {
    const { size } = await stat(file);
    if (size > MAX_CONFIG_BYTES) throw fileError(`${file}: the config is ${size.toLocaleString('en-US')} bytes, more than the ${MAX_CONFIG_BYTES.toLocaleString('en-US')} a config may have`);
    text = await readFile(file, 'utf8');
  } catch (e) {
    if (e instanceof SdtuneError) throw e;
    throw fileError(`cannot read config ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  return resolveConfig(method, text, overrides, file);
}

/** Split a yargs argv into config overrides (FLAG_KEYS flags and --set key=value), the --config file and --resume. */
export function flagOverrides(argv: Record<string, unknown>): { overrides: Record<string, unknown>; configPath: string | null; resume: string | null } {
  const overrides: Record<string, unknown> = {};
  for (const s of [argv.set ?? []].flat()) {
    const i = String(s).indexOf('=');
    if (i < 1) throw usageError(`--set ${s}: expected key=value, e.g. --set train.lr=1e-4`);
    overrides[String(s).slice(0, i).trim()] = String(s).slice(i + 1);
  }
  for (const flag of Object.keys(FLAG_KEYS)) if (argv[flag] !== undefined) overrides[flag] = argv[flag];
  const opt = (k: string) => (typeof argv[k] === 'string' ? (argv[k] as string) : null);
  return { overrides, configPath: opt('config'), resume: opt('resume') };
}

/** YAML of the resolved config (saved next to the outputs as config.resolved.yaml); resolveConfig reads it back to
 *  an identical object. */
export function dumpConfig(c: TrainConfig): string {
  const method = METHODS.find((m) => c[m] !== undefined) ?? 'lora';
  const doc = new YAML.Document(c);
  YAML.visit(doc, {
    Seq(_, n) {
      if (n.items.every((i) => YAML.isScalar(i) && typeof i.value === 'number')) n.flow = true;
    },
  });
  doc.commentBefore = ` sdtune ${method} training config, fully resolved (reusable with --config)`;
  return doc.toString({ lineWidth: 0 });
}

/**
 * How many optimizer steps training runs, as diffusers / kohya count them: batches per epoch = ceil(images x repeats /
 * batch), or, when `bucketSamples` gives the samples of each aspect bucket (repeats already applied, so kohya's
 * per-folder repeats count), the sum of ceil(samples / batch) over buckets; steps per epoch = ceil(batches / gradient
 * accumulation); total = max_steps if set (epochs = ceil(max_steps / steps per epoch)) else steps x epochs.
 */
export function describeSteps(
  c: TrainConfig,
  numImages: number,
  bucketSamples?: number[],
): { totalSteps: number; stepsPerEpoch: number; epochs: number; line: string } {
  if (numImages < 1) throw fileError(`no training images found in ${c.data.dir}`);
  const { batch_size: bs, gradient_accumulation: ga, max_steps: maxSteps } = c.train;
  const r = c.data.repeats;
  const samples = bucketSamples ? bucketSamples.reduce((a, n) => a + n, 0) : numImages * r;
  const batches = bucketSamples ? bucketSamples.reduce((a, n) => a + Math.ceil(n / bs), 0) : Math.ceil(samples / bs);
  const stepsPerEpoch = Math.ceil(batches / ga);
  const totalSteps = maxSteps ?? stepsPerEpoch * c.train.epochs;
  const epochs = maxSteps !== null ? Math.ceil(maxSteps / stepsPerEpoch) : c.train.epochs;
  if (c.train.lr_warmup_steps > totalSteps) {
    throw usageError(`train.lr_warmup_steps (${c.train.lr_warmup_steps}) exceeds the ${totalSteps} training steps`);
  }
  const perEpoch =
    `${numImages} images x ${bucketSamples ? '' : `${r} `}repeats = ${samples} samples / batch ${bs} = ${batches} batches` +
    (bucketSamples && bucketSamples.length > 1 ? ` (over ${bucketSamples.length} buckets)` : '') +
    (ga > 1 ? ` / ${ga} accumulation` : '') +
    ` = ${stepsPerEpoch} steps per epoch`;
  const total = maxSteps !== null ? `max_steps decides: ${totalSteps} steps (${epochs} epochs)` : `x ${epochs} epochs = ${totalSteps} steps`;
  return { totalSteps, stepsPerEpoch, epochs, line: `${perEpoch}; ${total}` };
}
