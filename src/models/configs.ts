/**
 * Typed model configs with diffusers / transformers `config.json` field names. `xxxConfig(raw)` fills the library
 * defaults, validates what SD v1 (and SD 2-style linear projections / per-block heads) needs, and refuses
 * non-default values of features we do not implement (instead of silently computing something else).
 */
import { z } from 'zod';
import { SdtuneError } from '../errors.js';

/** Named constants used across the project. */
export const CLIP_MAX_LENGTH = 77;
export const SD_LATENT_SCALE = 0.18215;
export const VAE_SCALE = 8;

/** Pixels per latent of a VAE: 2^(levels - 1), as diffusers' pipelines compute vae_scale_factor (SD v1: 8; the toy world's: 4). */
export function vaeScaleFactor(cfg: { block_out_channels: readonly number[] } | undefined): number {
  return cfg ? 2 ** (cfg.block_out_channels.length - 1) : VAE_SCALE;
}

// ---- config.json fields: one declaration each (type, default, validation); unknown keys are ignored ----

const n = (d: number) => z.number().default(d); // finite (zod refuses NaN and Infinity)
const b = (d: boolean) => z.boolean().default(d);
const s = (d: string) => z.string().default(d);
const nums = (d: number[]) => z.array(z.number()).default(d);

const UNET_FIELDS = z.object({
  in_channels: n(4),
  out_channels: n(4),
  block_out_channels: nums([320, 640, 1280, 1280]),
  layers_per_block: n(2),
  down_block_types: z.array(z.string()).default(['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D']),
  up_block_types: z.array(z.string()).default(['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']),
  mid_block_type: s('UNetMidBlock2DCrossAttn'),
  norm_num_groups: n(32),
  norm_eps: n(1e-5),
  flip_sin_to_cos: b(true),
  freq_shift: n(0),
  use_linear_projection: b(false),
  sample_size: n(64),
  act_fn: s('silu'),
  downsample_padding: n(1),
  mid_block_scale_factor: n(1),
  center_input_sample: b(false),
});

export type UNetConfig = z.output<typeof UNET_FIELDS> & {
  /** heads per block (diffusers' `num_attention_heads ?? attention_head_dim`, SD v1's naming quirk) */
  heads: number[];
  cross_attention_dim: number;
  transformer_layers_per_block: number;
  only_cross_attention: boolean;
  /** the raw config as read (kept for saving / inspect) */
  raw: Record<string, unknown>;
};

const VAE_FIELDS = z.object({
  in_channels: n(3),
  out_channels: n(3),
  latent_channels: n(4),
  block_out_channels: nums([64]),
  down_block_types: z.array(z.string()).optional(), // default: DownEncoderBlock2D per block
  up_block_types: z.array(z.string()).optional(), // default: UpDecoderBlock2D per block
  layers_per_block: n(1),
  norm_num_groups: n(32),
  act_fn: s('silu'),
  scaling_factor: n(SD_LATENT_SCALE),
  sample_size: n(32),
  use_quant_conv: b(true),
  use_post_quant_conv: b(true),
  mid_block_add_attention: b(true),
});

export type VaeConfig = Omit<z.output<typeof VAE_FIELDS>, 'down_block_types' | 'up_block_types'> & {
  shift_factor: number | null;
  raw: Record<string, unknown>;
};

const CLIP_FIELDS = z.object({
  vocab_size: n(49408),
  hidden_size: n(512),
  intermediate_size: n(2048),
  num_hidden_layers: n(12),
  num_attention_heads: n(8),
  max_position_embeddings: n(77),
  hidden_act: s('quick_gelu'),
  layer_norm_eps: n(1e-5),
  bos_token_id: n(49406),
  eos_token_id: n(49407),
  pad_token_id: n(1),
  projection_dim: n(512),
});

export type ClipTextConfig = z.output<typeof CLIP_FIELDS> & { raw: Record<string, unknown> };

type Raw = Record<string, unknown>;

const bad = (what: string, msg: string) => new SdtuneError('format', `${what} config: ${msg}`);

/** What a field accepts, in words. */
function wording(f: z.ZodType): string {
  const t = f instanceof z.ZodDefault || f instanceof z.ZodOptional ? (f.unwrap() as z.ZodType) : f;
  if (t instanceof z.ZodNumber) return 'a number';
  if (t instanceof z.ZodBoolean) return 'true or false';
  if (t instanceof z.ZodArray) return t.element instanceof z.ZodNumber ? 'a list of numbers' : 'a list of strings';
  return 'a string';
}

/** The fields of `raw` as `schema` declares them (null = the default, as diffusers reads it); the first wrong one
 *  is a 'format' error naming it. */
function readFields<T extends z.ZodObject>(schema: T, raw: Raw, what: string): z.output<T> {
  const given = Object.fromEntries(Object.keys(schema.shape).filter((k) => raw[k] != null).map((k) => [k, raw[k]]));
  const r = schema.safeParse(given);
  if (r.success) return r.data;
  const key = String(r.error.issues[0]!.path[0]);
  const v = raw[key];
  const found = typeof v === 'number' ? String(v) : (JSON.stringify(v) ?? String(v));
  throw bad(what, `"${key}" must be ${wording(schema.shape[key] as z.ZodType)}, found ${found.length > 100 ? `${found.slice(0, 97)}...` : found}`);
}
/** Fields whose non-default values select features we do not implement. */
function refuse(raw: Raw, what: string, defaults: Record<string, unknown>): void {
  for (const [k, d] of Object.entries(defaults)) {
    const v = raw[k];
    if (v !== undefined && JSON.stringify(v) !== JSON.stringify(d)) {
      throw new SdtuneError('unsupported', `${what} config: "${k}" = ${JSON.stringify(v)} is not supported (only ${JSON.stringify(d)})`);
    }
  }
}

const DOWN_TYPES = ['CrossAttnDownBlock2D', 'DownBlock2D'];
const UP_TYPES = ['CrossAttnUpBlock2D', 'UpBlock2D'];

/** UNet2DConditionModel config (SD v1 family). */
export function unetConfig(raw: Raw): UNetConfig {
  const W = 'unet';
  refuse(raw, W, {
    class_embed_type: null,
    addition_embed_type: null,
    time_cond_proj_dim: null,
    encoder_hid_dim: null,
    resnet_time_scale_shift: 'default',
    time_embedding_type: 'positional',
    conv_in_kernel: 3,
    conv_out_kernel: 3,
    dual_cross_attention: false,
    num_class_embeds: null,
    resnet_skip_time_act: false,
    resnet_out_scale_factor: 1.0,
    timestep_post_act: null,
    time_embedding_dim: null,
    time_embedding_act_fn: null,
    attention_type: 'default',
    cross_attention_norm: null,
    class_embeddings_concat: false,
    mid_block_only_cross_attention: null,
    reverse_transformer_layers_per_block: null,
  });
  const f = readFields(UNET_FIELDS, raw, W);
  const { block_out_channels, down_block_types, up_block_types, mid_block_type } = f;
  const n = block_out_channels.length;
  if (down_block_types.length !== n || up_block_types.length !== n) throw bad(W, `down/up_block_types must have ${n} entries like block_out_channels`);
  for (const t of down_block_types) if (!DOWN_TYPES.includes(t)) throw new SdtuneError('unsupported', `unet config: down block type ${t} (supported: ${DOWN_TYPES.join(', ')})`);
  for (const t of up_block_types) if (!UP_TYPES.includes(t)) throw new SdtuneError('unsupported', `unet config: up block type ${t} (supported: ${UP_TYPES.join(', ')})`);
  if (mid_block_type !== 'UNetMidBlock2DCrossAttn') throw new SdtuneError('unsupported', `unet config: mid block type ${mid_block_type}`);
  // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (the latter is a head COUNT in SD v1/v2 configs)
  const headsRaw = raw.num_attention_heads ?? raw.attention_head_dim ?? 8;
  const heads = typeof headsRaw === 'number' ? new Array<number>(n).fill(headsRaw) : (headsRaw as number[]);
  if (!Array.isArray(heads) || heads.length !== n || !heads.every((h) => Number.isInteger(h) && h > 0)) {
    throw bad(W, `attention_head_dim / num_attention_heads must be a positive integer or a list of ${n}`);
  }
  const tlpb = raw.transformer_layers_per_block ?? 1;
  if (typeof tlpb !== 'number') throw new SdtuneError('unsupported', 'unet config: per-block transformer_layers_per_block');
  const ca = raw.cross_attention_dim ?? 1280;
  if (typeof ca !== 'number') throw new SdtuneError('unsupported', 'unet config: per-block cross_attention_dim');
  const only = raw.only_cross_attention ?? false;
  if (only !== false) throw new SdtuneError('unsupported', 'unet config: only_cross_attention');
  return { ...f, heads, cross_attention_dim: ca, transformer_layers_per_block: tlpb, only_cross_attention: false, raw };
}

/** AutoencoderKL config. */
export function vaeConfig(raw: Raw): VaeConfig {
  const W = 'vae';
  refuse(raw, W, { latents_mean: null, latents_std: null });
  const { down_block_types, up_block_types, ...f } = readFields(VAE_FIELDS, raw, W);
  const down = down_block_types ?? new Array<string>(f.block_out_channels.length).fill('DownEncoderBlock2D');
  const up = up_block_types ?? new Array<string>(f.block_out_channels.length).fill('UpDecoderBlock2D');
  if (down.some((t) => t !== 'DownEncoderBlock2D') || up.some((t) => t !== 'UpDecoderBlock2D')) {
    throw new SdtuneError('unsupported', `vae config: block types ${[...down, ...up].join(', ')}`);
  }
  const sf = raw.shift_factor ?? null;
  return { ...f, shift_factor: typeof sf === 'number' ? sf : null, raw };
}

/** transformers CLIPTextConfig. */
export function clipTextConfig(raw: Raw): ClipTextConfig {
  const W = 'text_encoder';
  const f = readFields(CLIP_FIELDS, raw, W);
  if (f.hidden_size % f.num_attention_heads !== 0) throw bad(W, `hidden_size ${f.hidden_size} is not divisible by num_attention_heads ${f.num_attention_heads}`);
  return { ...f, raw };
}
