/** Small numeric helpers for tests. */
import * as tf from '@tensorflow/tfjs';
import { crc32 } from 'node:zlib';
import type { RawTensor } from '../src/io/safetensors.js';
import { clipTextConfig, unetConfig, vaeConfig } from '../src/models/configs.js';

/** max |a - b| over all elements (shapes must match). */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length mismatch ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** max |a - b| over max |b| (the error relative to the largest reference entry; d itself when b is all zero). */
export function relMaxErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let d = 0;
  let s = 0;
  for (let i = 0; i < a.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    s = Math.max(s, Math.abs(b[i]));
  }
  return s === 0 ? d : d / s;
}

/** A golden NCHW tensor as an NHWC tf tensor. */
export function nhwc(t: RawTensor): tf.Tensor4D {
  return tf.tidy(() => tf.tensor4d(t.data as Float32Array, t.shape as [number, number, number, number]).transpose([0, 2, 3, 1]));
}

/** NHWC host data of `shape` reordered to NCHW (on the host: no kernel, so it also works inside onStep callbacks). */
export function nhwcToNchw(d: ArrayLike<number>, shape: readonly number[]): Float32Array {
  const [n, h, w, c] = shape;
  const out = new Float32Array(n * c * h * w);
  for (let b = 0; b < n; b++)
    for (let y = 0; y < h; y++)
      for (let x = 0; x < w; x++)
        for (let k = 0; k < c; k++) out[((b * c + k) * h + y) * w + x] = d[((b * h + y) * w + x) * c + k];
  return out;
}

/** A tf NHWC result as NCHW host data, for comparing with goldens (an async read: GPU backends have no sync one). */
export async function toNchw(x: tf.Tensor4D): Promise<Float32Array> {
  return nhwcToNchw((await x.data()) as Float32Array, x.shape);
}

/** Sync variant for a tensor whose data is already on the host (e.g. the pipeline's latents in onStep, read after each step). */
export function toNchwData(x: tf.Tensor4D): Float32Array {
  return nhwcToNchw(x.dataSync() as Float32Array, x.shape);
}

export function rawTensor(t: RawTensor | undefined, name: string): RawTensor {
  if (!t) throw new Error(`golden tensor ${name} missing`);
  return t;
}

/** Tiny random-model configs shared by the unit tests (two UNet levels, 16-wide CLIP, two-level VAE). */
export const TINY_UNET = unetConfig({
  block_out_channels: [32, 64],
  down_block_types: ['CrossAttnDownBlock2D', 'DownBlock2D'],
  up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D'],
  layers_per_block: 1,
  cross_attention_dim: 16,
  attention_head_dim: 4,
  norm_num_groups: 8,
  sample_size: 8,
});
export const TINY_CLIP = clipTextConfig({ hidden_size: 16, intermediate_size: 24, num_hidden_layers: 2, num_attention_heads: 2, vocab_size: 100, max_position_embeddings: 12, eos_token_id: 99 });
export const TINY_VAE = vaeConfig({ block_out_channels: [16, 32], down_block_types: ['DownEncoderBlock2D', 'DownEncoderBlock2D'], up_block_types: ['UpDecoderBlock2D', 'UpDecoderBlock2D'], layers_per_block: 1, norm_num_groups: 8 });

/** One PNG chunk: length, type, data and the CRC over type + data (for splicing text chunks into test PNGs). */
export function pngChunk(type: string, data: Buffer): Buffer {
  const td = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  td.copy(out, 4);
  out.writeUInt32BE(crc32(td), 8 + data.length);
  return out;
}
