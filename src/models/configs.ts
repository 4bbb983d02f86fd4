/**
 * Typed model configs with diffusers / transformers `config.json` field names. `xxxConfig(raw)` fills the library
 * defaults, validates what SD v1 (and SD 2-style linear projections / per-block heads) needs, and refuses
 * non-default values of features we do not implement (instead of silently computing something else).
 */
import { SdtuneError } from '../errors.js';

/** Named constants used across the project. */
export const CLIP_MAX_LENGTH = 77;
export const SD_LATENT_SCALE = 0.18215;
export const VAE_SCALE = 8;

/** Pixels per latent of a VAE: 2^(levels - 1), as diffusers' pipelines compute vae_scale_factor (SD v1: 8; the toy world's: 4). */
export function vaeScaleFactor(cfg: { block_out_channels: readonly number[] } | undefined): number {
  return cfg ? 2 ** (cfg.block_out_channels.length - 1) : VAE_SCALE;
}

export interface UNetConfig {
  in_channels: number;
  out_channels: number;
  block_out_channels: number[];
  layers_per_block: number;
  down_block_types: string[];
  up_block_types: string[];
  mid_block_type: string;
  /** heads per block (diffusers' `num_attention_heads ?? attention_head_dim`, SD v1's naming quirk) */
  heads: number[];
  cross_attention_dim: number;
  norm_num_groups: number;
  norm_eps: number;
  flip_sin_to_cos: boolean;
  freq_shift: number;
  use_linear_projection: boolean;
  sample_size: number;
  act_fn: string;
  transformer_layers_per_block: number;
  downsample_padding: number;
  mid_block_scale_factor: number;
  center_input_sample: boolean;
  only_cross_attention: boolean;
  /** the raw config as read (kept for saving / inspect) */
  raw: Record<string, unknown>;
}

export interface VaeConfig {
  in_channels: number;
  out_channels: number;
  latent_channels: number;
  block_out_channels: number[];
  layers_per_block: number;
  norm_num_groups: number;
  act_fn: string;
  scaling_factor: number;
  shift_factor: number | null;
  sample_size: number;
  use_quant_conv: boolean;
  use_post_quant_conv: boolean;
  mid_block_add_attention: boolean;
  raw: Record<string, unknown>;
}

export interface ClipTextConfig {
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  max_position_embeddings: number;
  hidden_act: string;
  layer_norm_eps: number;
  bos_token_id: number;
  eos_token_id: number;
  pad_token_id: number;
  projection_dim: number;
  raw: Record<string, unknown>;
}

type Raw = Record<string, unknown>;

const bad = (what: string, msg: string) => new SdtuneError('format', `${what} config: ${msg}`);

function num(raw: Raw, key: string, def: number | undefined, what: string): number {
  const v = raw[key] ?? def;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw bad(what, `"${key}" must be a number, found ${JSON.stringify(raw[key])}`);
  return v;
}
function bool(raw: Raw, key: string, def: boolean, what: string): boolean {
  const v = raw[key] ?? def;
  if (typeof v !== 'boolean') throw bad(what, `"${key}" must be true or false, found ${JSON.stringify(raw[key])}`);
  return v;
}
function str(raw: Raw, key: string, def: string, what: string): string {
  const v = raw[key] ?? def;
  if (typeof v !== 'string') throw bad(what, `"${key}" must be a string, found ${JSON.stringify(raw[key])}`);
  return v;
}
function numList(raw: Raw, key: string, def: number[], what: string): number[] {
  const v = raw[key] ?? def;
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'number')) throw bad(what, `"${key}" must be a list of numbers`);
  return v as number[];
}
function strList(raw: Raw, key: string, def: string[], what: string): string[] {
  const v = raw[key] ?? def;
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw bad(what, `"${key}" must be a list of strings`);
  return v as string[];
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
  const block_out_channels = numList(raw, 'block_out_channels', [320, 640, 1280, 1280], W);
  const n = block_out_channels.length;
  const down_block_types = strList(raw, 'down_block_types', ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'], W);
  const up_block_types = strList(raw, 'up_block_types', ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'], W);
  if (down_block_types.length !== n || up_block_types.length !== n) throw bad(W, `down/up_block_types must have ${n} entries like block_out_channels`);
  for (const t of down_block_types) if (!DOWN_TYPES.includes(t)) throw new SdtuneError('unsupported', `unet config: down block type ${t} (supported: ${DOWN_TYPES.join(', ')})`);
  for (const t of up_block_types) if (!UP_TYPES.includes(t)) throw new SdtuneError('unsupported', `unet config: up block type ${t} (supported: ${UP_TYPES.join(', ')})`);
  const mid_block_type = str(raw, 'mid_block_type', 'UNetMidBlock2DCrossAttn', W);
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
  return {
    in_channels: num(raw, 'in_channels', 4, W),
    out_channels: num(raw, 'out_channels', 4, W),
    block_out_channels,
    layers_per_block: num(raw, 'layers_per_block', 2, W),
    down_block_types,
    up_block_types,
    mid_block_type,
    heads,
    cross_attention_dim: ca,
    norm_num_groups: num(raw, 'norm_num_groups', 32, W),
    norm_eps: num(raw, 'norm_eps', 1e-5, W),
    flip_sin_to_cos: bool(raw, 'flip_sin_to_cos', true, W),
    freq_shift: num(raw, 'freq_shift', 0, W),
    use_linear_projection: bool(raw, 'use_linear_projection', false, W),
    sample_size: num(raw, 'sample_size', 64, W),
    act_fn: str(raw, 'act_fn', 'silu', W),
    transformer_layers_per_block: tlpb,
    downsample_padding: num(raw, 'downsample_padding', 1, W),
    mid_block_scale_factor: num(raw, 'mid_block_scale_factor', 1, W),
    center_input_sample: bool(raw, 'center_input_sample', false, W),
    only_cross_attention: false,
    raw,
  };
}

/** AutoencoderKL config. */
export function vaeConfig(raw: Raw): VaeConfig {
  const W = 'vae';
  refuse(raw, W, { latents_mean: null, latents_std: null });
  const block_out_channels = numList(raw, 'block_out_channels', [64], W);
  const down = strList(raw, 'down_block_types', new Array(block_out_channels.length).fill('DownEncoderBlock2D'), W);
  const up = strList(raw, 'up_block_types', new Array(block_out_channels.length).fill('UpDecoderBlock2D'), W);
  if (down.some((t) => t !== 'DownEncoderBlock2D') || up.some((t) => t !== 'UpDecoderBlock2D')) {
    throw new SdtuneError('unsupported', `vae config: block types ${[...down, ...up].join(', ')}`);
  }
  const sf = raw.shift_factor ?? null;
  return {
    in_channels: num(raw, 'in_channels', 3, W),
    out_channels: num(raw, 'out_channels', 3, W),
    latent_channels: num(raw, 'latent_channels', 4, W),
    block_out_channels,
    layers_per_block: num(raw, 'layers_per_block', 1, W),
    norm_num_groups: num(raw, 'norm_num_groups', 32, W),
    act_fn: str(raw, 'act_fn', 'silu', W),
    scaling_factor: num(raw, 'scaling_factor', SD_LATENT_SCALE, W),
    shift_factor: typeof sf === 'number' ? sf : null,
    sample_size: num(raw, 'sample_size', 32, W),
    use_quant_conv: bool(raw, 'use_quant_conv', true, W),
    use_post_quant_conv: bool(raw, 'use_post_quant_conv', true, W),
    mid_block_add_attention: bool(raw, 'mid_block_add_attention', true, W),
    raw,
  };
}

/** transformers CLIPTextConfig. */
export function clipTextConfig(raw: Raw): ClipTextConfig {
  const W = 'text_encoder';
  const hidden = num(raw, 'hidden_size', 512, W);
  const heads = num(raw, 'num_attention_heads', 8, W);
  if (hidden % heads !== 0) throw bad(W, `hidden_size ${hidden} is not divisible by num_attention_heads ${heads}`);
  return {
    vocab_size: num(raw, 'vocab_size', 49408, W),
    hidden_size: hidden,
    intermediate_size: num(raw, 'intermediate_size', 2048, W),
    num_hidden_layers: num(raw, 'num_hidden_layers', 12, W),
    num_attention_heads: heads,
    max_position_embeddings: num(raw, 'max_position_embeddings', 77, W),
    hidden_act: str(raw, 'hidden_act', 'quick_gelu', W),
    layer_norm_eps: num(raw, 'layer_norm_eps', 1e-5, W),
    bos_token_id: num(raw, 'bos_token_id', 49406, W),
    eos_token_id: num(raw, 'eos_token_id', 49407, W),
    pad_token_id: num(raw, 'pad_token_id', 1, W),
    projection_dim: num(raw, 'projection_dim', 512, W),
    raw,
  };
}
