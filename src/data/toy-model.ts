/**
 * The toy world's model (shared/toyworld.md's table): SD v1's architecture at the smallest sizes that learned the
 * world, with random weights and the toy vocabulary. This is what the base training starts from: the VAE and the
 * UNet are then trained, the text encoder stays as drawn here (random, frozen, saved with the model).
 *   - VAE (AutoencoderKL): block_out (32, 64, 64), 1 layer per block, GroupNorm 8 groups, 4 latent channels, 4x down
 *   - text encoder (CLIPTextModel): hidden 64, 2 layers, 2 heads, MLP 128, max length 12
 *   - UNet: block_out (32, 64, 64), CrossAttnDown x2 + Down, Up + CrossAttnUp x2, 1 layer per block, 4 heads,
 *     cross-attention width 64, sample_size 8 (8x8x4 latents = 32x32 images)
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { type ConvertResult, type SavePrecision, saveModel } from '../io/convert.js';
import type { LoadedModel } from '../io/model.js';
import { randomParams } from '../models/build.js';
import { clipTextParamShapes } from '../models/clip-text.js';
import { clipTextConfig, unetConfig, vaeConfig } from '../models/configs.js';
import { countParams, disposeParams } from '../models/params.js';
import { SD15_SCHEDULER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, sd15ModelIndex } from '../models/presets.js';
import { unetParamShapes } from '../models/unet.js';
import { vaeParamShapes } from '../models/vae.js';
import { ClipTokenizer } from '../tokenizer/clip.js';
import { TOY_MAX_LENGTH, toyTokenizerFiles, toyVocabulary, writeToyVocabulary } from './toy-vocab.js';

/** Width of the text encoder = the UNet's cross-attention width. */
const TOY_TEXT_WIDTH = 64;

/** First randomParams seed of each component (each tensor takes the next seed; the ranges never overlap). */
export const TOY_SEEDS = { text_encoder: 1_000_000, unet: 2_000_000, vae: 3_000_000 } as const;

export type ToyComponent = 'unet' | 'vae' | 'text_encoder';

/**
 * The diffusers / transformers configs of the toy model. `scalingFactor` is the VAE's latent scale (1 / std of the
 * latents, measured after the VAE is trained; 1 for random weights).
 */
export function toyModelConfigs(opts: { scalingFactor?: number } = {}): Record<ToyComponent | 'scheduler', Record<string, unknown>> {
  const vocab = toyVocabulary();
  return {
    unet: {
      ...SD15_UNET_CONFIG,
      block_out_channels: [32, 64, 64],
      down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
      up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
      layers_per_block: 1,
      attention_head_dim: 4, // SD v1's naming quirk: the number of heads
      cross_attention_dim: TOY_TEXT_WIDTH,
      norm_num_groups: 8,
      sample_size: 8,
    },
    vae: {
      ...SD15_VAE_CONFIG,
      block_out_channels: [32, 64, 64],
      down_block_types: ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
      up_block_types: ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D'],
      layers_per_block: 1,
      norm_num_groups: 8,
      latent_channels: 4,
      sample_size: 32,
      scaling_factor: opts.scalingFactor ?? 1,
    },
    text_encoder: {
      ...SD15_TEXT_ENCODER_CONFIG,
      hidden_size: TOY_TEXT_WIDTH,
      intermediate_size: 2 * TOY_TEXT_WIDTH,
      num_attention_heads: 2,
      num_hidden_layers: 2,
      max_position_embeddings: TOY_MAX_LENGTH,
      projection_dim: TOY_TEXT_WIDTH,
      vocab_size: vocab.eosId + 1,
      bos_token_id: vocab.bosId,
      eos_token_id: vocab.eosId,
      pad_token_id: vocab.eosId, // SD v1: pad = eos
    },
    scheduler: { ...SD15_SCHEDULER_CONFIG },
  };
}

/** Options of buildToyModel / makeToyModel. */
export interface ToyModelOptions {
  /** offset added to every component's first randomParams seed (default 0: TOY_SEEDS) */
  seed?: number;
  scalingFactor?: number;
}

/**
 * The toy model in memory with random weights, as loadModel would return it (the tokenizer is the toy vocabulary).
 * Its tensors live on the current backend; dispose with disposeModel. `source.tokenizerDir` is unset: saveModel needs
 * one, which makeToyModel provides.
 */
export function buildToyModel(opts: ToyModelOptions = {}): LoadedModel {
  const raw = toyModelConfigs(opts);
  const files = toyTokenizerFiles();
  const tokenizer = ClipTokenizer.fromTexts(files, (name) => `(toy vocabulary) ${name}`);
  const off = opts.seed ?? 0;
  const ucfg = unetConfig(raw.unet), vcfg = vaeConfig(raw.vae), tcfg = clipTextConfig(raw.text_encoder);
  const unet = { config: ucfg, params: randomParams(unetParamShapes(ucfg), TOY_SEEDS.unet + off) };
  const vae = { config: vcfg, params: randomParams(vaeParamShapes(vcfg), TOY_SEEDS.vae + off) };
  const textEncoder = { config: tcfg, params: randomParams(clipTextParamShapes(tcfg), TOY_SEEDS.text_encoder + off) };
  return {
    path: '(toy model)',
    layout: 'diffusers',
    variant: 'v1',
    unet,
    vae,
    textEncoder,
    tokenizer,
    schedulerConfig: raw.scheduler,
    notes: [],
    source: { configs: { unet: raw.unet, vae: raw.vae, text_encoder: raw.text_encoder }, modelIndex: sd15ModelIndex() },
  };
}

/** Parameter counts of each network of a model. */
export function modelParamCounts(m: LoadedModel): Record<ToyComponent, number> {
  return {
    vae: m.vae ? countParams(m.vae.params) : 0,
    text_encoder: m.textEncoder ? countParams(m.textEncoder.params) : 0,
    unet: m.unet ? countParams(m.unet.params) : 0,
  };
}

/**
 * Write the toy model with random weights as a diffusers folder at `out` (the project's writer, saveModel: atomic,
 * refuses a non-empty folder unless `overwrite`). Returns what was written and the parameter counts.
 */
export async function makeToyModel(
  out: string,
  opts: ToyModelOptions & { precision?: SavePrecision; overwrite?: boolean } = {},
): Promise<ConvertResult & { params: Record<ToyComponent, number> }> {
  const m = buildToyModel(opts);
  const tok = await mkdtemp(path.join(tmpdir(), 'sdtune-toy-tokenizer-'));
  try {
    await writeToyVocabulary(tok);
    const r = await saveModel({ ...m, source: { ...m.source!, tokenizerDir: tok } }, out, { to: 'diffusers', precision: opts.precision ?? 'fp32', overwrite: opts.overwrite });
    return { ...r, params: modelParamCounts(m) };
  } finally {
    for (const part of [m.unet, m.vae, m.textEncoder]) if (part) disposeParams(part.params);
    await rm(tok, { recursive: true, force: true });
  }
}
