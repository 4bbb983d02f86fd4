/**
 * SD v1.5's diffusers configs, verbatim as diffusers 0.35 / transformers 4.57 write them, and the inference of every
 * structural field from tensor shapes (diffusers keys): what a single-file checkpoint without configs is opened with.
 * Heads cannot be read from shapes: the UNet keeps SD v1's 8 heads, CLIP uses head size 64.
 */
import type { Component } from '../io/ldm-keymap.js';
import { formatError } from '../errors.js';

export const SD15_UNET_CONFIG: Readonly<Record<string, unknown>> = {
  _class_name: 'UNet2DConditionModel', _diffusers_version: '0.35.2', act_fn: 'silu', addition_embed_type: null,
  addition_embed_type_num_heads: 64, addition_time_embed_dim: null, attention_head_dim: 8, attention_type: 'default',
  block_out_channels: [320, 640, 1280, 1280], center_input_sample: false, class_embed_type: null,
  class_embeddings_concat: false, conv_in_kernel: 3, conv_out_kernel: 3, cross_attention_dim: 768,
  cross_attention_norm: null,
  down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  downsample_padding: 1, dropout: 0.0, dual_cross_attention: false, encoder_hid_dim: null, encoder_hid_dim_type: null,
  flip_sin_to_cos: true, freq_shift: 0, in_channels: 4, layers_per_block: 2, mid_block_only_cross_attention: null,
  mid_block_scale_factor: 1, mid_block_type: 'UNetMidBlock2DCrossAttn', norm_eps: 1e-5, norm_num_groups: 32,
  num_attention_heads: null, num_class_embeds: null, only_cross_attention: false, out_channels: 4,
  projection_class_embeddings_input_dim: null, resnet_out_scale_factor: 1.0, resnet_skip_time_act: false,
  resnet_time_scale_shift: 'default', reverse_transformer_layers_per_block: null, sample_size: 64,
  time_cond_proj_dim: null, time_embedding_act_fn: null, time_embedding_dim: null, time_embedding_type: 'positional',
  timestep_post_act: null, transformer_layers_per_block: 1,
  up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
  upcast_attention: false, use_linear_projection: false,
};

export const SD15_VAE_CONFIG: Readonly<Record<string, unknown>> = {
  _class_name: 'AutoencoderKL', _diffusers_version: '0.35.2', act_fn: 'silu', block_out_channels: [128, 256, 512, 512],
  down_block_types: ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
  force_upcast: true, in_channels: 3, latent_channels: 4, latents_mean: null, latents_std: null, layers_per_block: 2,
  mid_block_add_attention: true, norm_num_groups: 32, out_channels: 3, sample_size: 512, scaling_factor: 0.18215,
  shift_factor: null,
  up_block_types: ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D'],
  use_post_quant_conv: true, use_quant_conv: true,
};

/** CLIP ViT-L/14 text tower (SD v1). */
export const SD15_TEXT_ENCODER_CONFIG: Readonly<Record<string, unknown>> = {
  architectures: ['CLIPTextModel'], attention_dropout: 0.0, bos_token_id: 49406, dtype: 'float32', eos_token_id: 49407,
  hidden_act: 'quick_gelu', hidden_size: 768, initializer_factor: 1.0, initializer_range: 0.02, intermediate_size: 3072,
  layer_norm_eps: 1e-5, max_position_embeddings: 77, model_type: 'clip_text_model', num_attention_heads: 12,
  num_hidden_layers: 12, pad_token_id: 49407, projection_dim: 768, transformers_version: '4.57.6', vocab_size: 49408,
};

/**
 * OpenCLIP ViT-H/14 text tower as diffusers' SD 2.x text_encoder/config.json has it: 23 of OpenCLIP's 24 layers
 * (SD 2 conditions on the penultimate layer), exact-erf gelu, bos/eos/pad ids 0/2/1 as in stabilityai's configs.
 */
export const SD2_TEXT_ENCODER_CONFIG: Readonly<Record<string, unknown>> = {
  ...SD15_TEXT_ENCODER_CONFIG, bos_token_id: 0, eos_token_id: 2, hidden_act: 'gelu', hidden_size: 1024, intermediate_size: 4096,
  num_attention_heads: 16, num_hidden_layers: 23, pad_token_id: 1, projection_dim: 512,
};

export const SD15_SCHEDULER_CONFIG: Readonly<Record<string, unknown>> = {
  _class_name: 'PNDMScheduler', _diffusers_version: '0.35.2', beta_end: 0.012, beta_schedule: 'scaled_linear',
  beta_start: 0.00085, clip_sample: false, num_train_timesteps: 1000, set_alpha_to_one: false, skip_prk_steps: true,
  steps_offset: 1, trained_betas: null,
};

/** model_index.json of an SD v1 (or v1-inpainting) pipeline folder; `depth`: StableDiffusionDepth2ImgPipeline's. */
export function sd15ModelIndex(inpaint = false, depth = false): Record<string, unknown> {
  if (depth) {
    return {
      _class_name: 'StableDiffusionDepth2ImgPipeline', _diffusers_version: '0.35.2', depth_estimator: [null, null], feature_extractor: [null, null],
      scheduler: ['diffusers', 'PNDMScheduler'], text_encoder: ['transformers', 'CLIPTextModel'], tokenizer: ['transformers', 'CLIPTokenizer'],
      unet: ['diffusers', 'UNet2DConditionModel'], vae: ['diffusers', 'AutoencoderKL'],
    };
  }
  return {
    _class_name: inpaint ? 'StableDiffusionInpaintPipeline' : 'StableDiffusionPipeline', _diffusers_version: '0.35.2',
    feature_extractor: [null, null], image_encoder: [null, null], requires_safety_checker: false,
    safety_checker: [null, null], scheduler: ['diffusers', 'PNDMScheduler'], text_encoder: ['transformers', 'CLIPTextModel'],
    tokenizer: ['transformers', 'CLIPTokenizer'], unet: ['diffusers', 'UNet2DConditionModel'], vae: ['diffusers', 'AutoencoderKL'],
  };
}

/** Config fields that tensor shapes determine (compared against a checkpoint's shapes when a config is given). */
export const STRUCTURAL_FIELDS: Record<Component, readonly string[]> = {
  unet: ['in_channels', 'out_channels', 'block_out_channels', 'layers_per_block', 'cross_attention_dim', 'down_block_types',
    'up_block_types', 'mid_block_type', 'use_linear_projection', 'transformer_layers_per_block', 'conv_in_kernel', 'conv_out_kernel'],
  vae: ['in_channels', 'out_channels', 'latent_channels', 'block_out_channels', 'layers_per_block', 'down_block_types',
    'up_block_types', 'mid_block_add_attention', 'use_quant_conv', 'use_post_quant_conv'],
  text_encoder: ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'vocab_size', 'max_position_embeddings'],
};

type Shapes = ReadonlyMap<string, readonly number[]>;
const need = (s: Shapes, c: Component, key: string) => {
  const v = s.get(key);
  if (!v) throw formatError(`cannot infer the ${c} config from tensor shapes: missing "${key}"`);
  return v;
};
/** Count of `<prefix>.<i>.` indices present (max i + 1). */
const count = (s: Shapes, re: RegExp) => {
  let m = -1;
  for (const k of s.keys()) {
    const r = re.exec(k);
    if (r) m = Math.max(m, +r[1]);
  }
  return m + 1;
};
const hasPrefix = (s: Shapes, p: string) => [...s.keys()].some((k) => k.startsWith(p));
const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/**
 * SD v1.5 UNet config with every structural field taken from the shapes (diffusers keys). `sd2`: SD 2.x's heads,
 * channels / 64 per block (its configs' attention_head_dim [5, 10, 20, 20]), instead of SD v1's 8; an error asking
 * for --config when a width is not a multiple of 64 (`requireHeads: false` skips the heads, for structural checks).
 */
export function inferUnetConfig(s: Shapes, opts: { sd2?: boolean; requireHeads?: boolean } = {}): Record<string, unknown> {
  const levels = count(s, /^down_blocks\.(\d+)\./);
  const boc = range(levels).map((b) => need(s, 'unet', `down_blocks.${b}.resnets.0.conv1.weight`)[0]);
  const convIn = need(s, 'unet', 'conv_in.weight'), convOut = need(s, 'unet', 'conv_out.weight');
  const temb = need(s, 'unet', 'time_embedding.linear_1.weight')[0];
  const k = [...s.keys()].find((x) => /attn2\.to_k\.weight$/.test(x));
  const projIn = [...s.keys()].find((x) => /\.proj_in\.weight$/.test(x));
  const depth = count(s, /attentions\.\d+\.transformer_blocks\.(\d+)\./);
  const heads = opts.sd2 && boc.every((c) => c % 64 === 0) ? { attention_head_dim: boc.map((c) => c / 64) } : {};
  if (opts.sd2 && !heads.attention_head_dim && opts.requireHeads !== false)
    throw formatError(`cannot infer the UNet's attention heads for block widths ${JSON.stringify(boc)} (SD 2 uses head size 64; not multiples of 64); pass --config DIR (a diffusers folder with the configs)`);
  return {
    ...SD15_UNET_CONFIG,
    ...heads,
    block_out_channels: boc,
    layers_per_block: count(s, /^down_blocks\.0\.resnets\.(\d+)\./),
    in_channels: convIn[1],
    out_channels: convOut[0],
    conv_in_kernel: convIn[2],
    conv_out_kernel: convOut[2],
    cross_attention_dim: k ? s.get(k)![1] : SD15_UNET_CONFIG.cross_attention_dim,
    down_block_types: range(levels).map((b) => (hasPrefix(s, `down_blocks.${b}.attentions.`) ? 'CrossAttnDownBlock2D' : 'DownBlock2D')),
    up_block_types: range(count(s, /^up_blocks\.(\d+)\./)).map((b) => (hasPrefix(s, `up_blocks.${b}.attentions.`) ? 'CrossAttnUpBlock2D' : 'UpBlock2D')),
    mid_block_type: hasPrefix(s, 'mid_block.attentions.') ? 'UNetMidBlock2DCrossAttn' : 'UNetMidBlock2D',
    use_linear_projection: projIn ? s.get(projIn)!.length === 2 : false,
    transformer_layers_per_block: Math.max(depth, 1),
    time_embedding_dim: temb === 4 * boc[0] ? null : temb,
  };
}

/** SD v1.5 VAE config with every structural field taken from the shapes (diffusers keys). */
export function inferVaeConfig(s: Shapes): Record<string, unknown> {
  const levels = count(s, /^encoder\.down_blocks\.(\d+)\./);
  return {
    ...SD15_VAE_CONFIG,
    block_out_channels: range(levels).map((i) => need(s, 'vae', `encoder.down_blocks.${i}.resnets.0.conv1.weight`)[0]),
    layers_per_block: count(s, /^encoder\.down_blocks\.0\.resnets\.(\d+)\./),
    in_channels: need(s, 'vae', 'encoder.conv_in.weight')[1],
    out_channels: need(s, 'vae', 'decoder.conv_out.weight')[0],
    latent_channels: need(s, 'vae', 'decoder.conv_in.weight')[1],
    down_block_types: range(levels).map(() => 'DownEncoderBlock2D'),
    up_block_types: range(count(s, /^decoder\.up_blocks\.(\d+)\./)).map(() => 'UpDecoderBlock2D'),
    mid_block_add_attention: hasPrefix(s, 'encoder.mid_block.attentions.0.'),
    use_quant_conv: s.has('quant_conv.weight'),
    use_post_quant_conv: s.has('post_quant_conv.weight'),
  };
}

/**
 * CLIP text config from the shapes; heads = width / 64 (ViT-L/14 convention) or, when that does not divide, an error
 * asking for --config (`requireHeads: false` keeps the preset's heads instead, for structural comparisons only).
 */
export function inferTextEncoderConfig(s: Shapes, opts: { requireHeads?: boolean; sd2?: boolean } = {}): Record<string, unknown> {
  const [vocab, width] = need(s, 'text_encoder', 'text_model.embeddings.token_embedding.weight');
  const preset = opts.sd2 ? SD2_TEXT_ENCODER_CONFIG : SD15_TEXT_ENCODER_CONFIG;
  if (width % 64 !== 0 && opts.requireHeads !== false)
    throw formatError(`cannot infer the text encoder's attention heads for width ${width} (not a multiple of 64); pass --config DIR (a diffusers folder with the configs)`);
  return {
    ...preset,
    hidden_size: width,
    intermediate_size: need(s, 'text_encoder', 'text_model.encoder.layers.0.mlp.fc1.weight')[0],
    num_hidden_layers: count(s, /^text_model\.encoder\.layers\.(\d+)\./),
    num_attention_heads: width % 64 === 0 ? width / 64 : preset.num_attention_heads,
    vocab_size: vocab,
    max_position_embeddings: need(s, 'text_encoder', 'text_model.embeddings.position_embedding.weight')[0],
    projection_dim: opts.sd2 ? preset.projection_dim : width,
  };
}

/** Dispatch to the inference of one component (`sd2`: SD 2.x presets and head rules). */
export function inferConfig(c: Component, s: Shapes, opts: { requireHeads?: boolean; sd2?: boolean } = {}): Record<string, unknown> {
  return c === 'unet' ? inferUnetConfig(s, opts) : c === 'vae' ? inferVaeConfig(s) : inferTextEncoderConfig(s, opts);
}

/** Structural fields of `inferred` (an inference result, heads aside) that `config` contradicts, as messages. */
export function structuralMismatches(c: Component, config: Record<string, unknown>, inferred: Record<string, unknown>): string[] {
  const eq = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);
  const dflt: Record<string, unknown> = { transformer_layers_per_block: 1, conv_in_kernel: 3, conv_out_kernel: 3, use_linear_projection: false,
    mid_block_type: 'UNetMidBlock2DCrossAttn', mid_block_add_attention: true, use_quant_conv: true, use_post_quant_conv: true };
  return STRUCTURAL_FIELDS[c]
    .filter((f) => !eq(config[f] ?? dflt[f], inferred[f]))
    .map((f) => `${f} is ${JSON.stringify(config[f] ?? dflt[f])} in the config but ${JSON.stringify(inferred[f])} in the weights`);
}
