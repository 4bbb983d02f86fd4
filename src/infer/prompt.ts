/**
 * Prompt -> text conditioning. A1111 semantics (weights, 75-token chunks each with BOS/EOS, BREAK, emphasis with the
 * mean restored), which for a prompt of <= 75 tokens without syntax is exactly diffusers' encode_prompt.
 */
import * as tf from '@tensorflow/tfjs';
import { clipText } from '../models/clip-text.js';
import type { ClipTextConfig } from '../models/configs.js';
import type { ParamTree } from '../models/params.js';
import type { ClipTokenizer } from '../tokenizer/clip.js';
import { type PromptChunk, applyEmphasis, chunkPrompt, padChunks } from '../tokenizer/prompt.js';

export interface TextEncoder {
  config: ClipTextConfig;
  params: ParamTree;
}

/** Encode prepared chunks: each chunk through CLIP (clip skip), emphasis, chunks concatenated -> [1, 77k, C]. */
export function encodeChunks(te: TextEncoder, chunks: PromptChunk[], clipSkip = 1): tf.Tensor3D {
  return tf.tidy(() => {
    const ids = tf.tensor2d(chunks.flatMap((c) => Array.from(c.ids)), [chunks.length, chunks[0].ids.length], 'int32');
    const weights = tf.tensor2d(chunks.flatMap((c) => Array.from(c.weights)), [1, chunks.length * chunks[0].ids.length]);
    const z = clipText(te.params, te.config, ids, { clipSkip }).hidden; // [k, 77, C]
    const [k, l, c] = z.shape;
    // no emphasis anywhere: the rescale is the identity (diffusers' encode_prompt), skip it
    if (chunks.every((ch) => Array.prototype.every.call(ch.weights, (w: number) => w === 1))) return z.reshape([1, k * l, c]) as tf.Tensor3D;
    return applyEmphasis(z.reshape([1, k * l, c]), weights, l);
  });
}

/** Positive and negative conditioning with the same number of chunks (A1111 pads the shorter one with empty chunks). */
export function encodePromptPair(
  te: TextEncoder,
  tokenizer: ClipTokenizer,
  prompt: string,
  negative: string,
  clipSkip = 1,
): { cond: tf.Tensor3D; uncond: tf.Tensor3D; chunks: number } {
  const [pos, neg] = padChunks(chunkPrompt(tokenizer, prompt), chunkPrompt(tokenizer, negative), tokenizer);
  return { cond: encodeChunks(te, pos, clipSkip), uncond: encodeChunks(te, neg, clipSkip), chunks: pos.length };
}
