// Model configs (config.json as diffusers / transformers write them): defaults, null as the default, one clear
// 'format' error naming a wrong field, 'unsupported' for features not implemented.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { clipTextConfig, unetConfig, vaeConfig } from '../../src/models/configs.js';

const TINY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../checkpoints/tiny-sd-v1');
const raw = (c: string) => JSON.parse(readFileSync(path.join(TINY, c, 'config.json'), 'utf8')) as Record<string, unknown>;
const errorOf = (fn: () => unknown): SdtuneError => {
  try {
    fn();
  } catch (e) {
    if (e instanceof SdtuneError) return e;
    throw e;
  }
  throw new Error('expected an SdtuneError');
};

describe('model configs', () => {
  it('fill the SD v1 defaults; null reads as the default; unknown keys are kept in raw only', () => {
    const u = unetConfig({});
    expect(u).toMatchObject({ in_channels: 4, block_out_channels: [320, 640, 1280, 1280], heads: [8, 8, 8, 8], cross_attention_dim: 1280, sample_size: 64, flip_sin_to_cos: true });
    expect(unetConfig({ ...raw('unet'), sample_size: null }).sample_size).toBe(64);
    const v = vaeConfig({ ...raw('vae'), some_new_field: 1 });
    expect('down_block_types' in v).toBe(false); // checked, not kept (always DownEncoderBlock2D)
    expect(v).toMatchObject({ scaling_factor: 0.18215, shift_factor: null });
    expect((v as Record<string, unknown>).some_new_field).toBeUndefined();
    expect(v.raw.some_new_field).toBe(1);
    expect(clipTextConfig({}).max_position_embeddings).toBe(77);
  });

  it('a wrong field is one format error naming it, expected vs found', () => {
    const e = errorOf(() => unetConfig({ ...raw('unet'), in_channels: 'x' }));
    expect(e.kind).toBe('format');
    expect(e.message).toBe('unet config: "in_channels" must be a number, found "x"');
    expect(errorOf(() => unetConfig({ block_out_channels: [1, 'a'] })).message).toBe('unet config: "block_out_channels" must be a list of numbers, found [1,"a"]');
    expect(errorOf(() => vaeConfig({ use_quant_conv: 1 })).message).toBe('vae config: "use_quant_conv" must be true or false, found 1');
    expect(errorOf(() => vaeConfig({ down_block_types: [3] })).message).toBe('vae config: "down_block_types" must be a list of strings, found [3]');
    expect(errorOf(() => clipTextConfig({ hidden_act: 5 })).message).toBe('text_encoder config: "hidden_act" must be a string, found 5');
    expect(errorOf(() => clipTextConfig({ layer_norm_eps: Infinity })).message).toBe('text_encoder config: "layer_norm_eps" must be a number, found Infinity');
    expect(errorOf(() => clipTextConfig({ hidden_size: 100, num_attention_heads: 8 })).message).toMatch(/hidden_size 100 is not divisible by num_attention_heads 8/);
  });

  it('features not implemented are refused as unsupported', () => {
    expect(errorOf(() => unetConfig({ mid_block_type: 'UNetMidBlock2D' })).kind).toBe('unsupported');
    expect(errorOf(() => unetConfig({ class_embed_type: 'timestep' })).message).toMatch(/"class_embed_type" = "timestep" is not supported/);
    expect(errorOf(() => vaeConfig({ down_block_types: ['X'] })).message).toMatch(/vae config: block types X/);
  });
});
