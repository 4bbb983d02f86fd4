/**
 * What a training method declares (design principle 8): its trainable parameters, how captions become the text
 * conditioning (inside the gradient tape when the text encoder trains), and how its result is exported. The loop,
 * data, optimizer and checkpoints are shared by every recipe.
 */
import * as tf from '@tensorflow/tfjs';
import type { LoadedModel } from '../io/model.js';
import { clipText } from '../models/clip-text.js';

export interface Recipe {
  readonly method: string;
  /** trainable variables keyed by stable names (checkpoint and optimizer-state keys) */
  readonly trainables: Map<string, tf.Variable>;
  /** learning rate of one parameter: its group's base lr (e.g. a separate text-encoder lr) x the schedule factor */
  lrFor?(name: string, factor: number, baseLr: number): number;
  /** true when gradients flow through the text encoder (text embeddings cannot be cached then) */
  readonly textEncoderTrainable: boolean;
  /** the caption actually trained on (TI: placeholder expansion / templates); `pick` draws in [0, n) */
  captionFor(caption: string, pick: (n: number) => number): string;
  /** images without a caption: trained on an empty caption (default) or on the recipe's templates (TI) */
  readonly uncaptioned?: 'empty' | 'templates';
  /** the prompt a validation sample of `prompt` is drawn with (TI: the placeholder in; default: the prompt) */
  samplePrompt?(prompt: string): string;
  /** text conditioning [B, 77, C] for token ids [B, 77] (called inside the tape) */
  encodeIds(ids: tf.Tensor2D): tf.Tensor3D;
  /** run `fn` with the trained state visible to the plain inference path (pipelines, sample) */
  withInference<T>(fn: () => Promise<T>): Promise<T>;
  /** write the adapter files; returns their paths */
  export(dir: string, name: string, step: number): Promise<string[]>;
  /** undo every change to the model and free the recipe's tensors */
  dispose(): void;
}

/** Plain text conditioning through the (possibly LoRA-injected) text encoder. */
export function encodeWithTextEncoder(model: LoadedModel, ids: tf.Tensor2D, clipSkip = 1): tf.Tensor3D {
  const te = model.textEncoder!;
  return tf.tidy(() => {
    const o = clipText(te.params, te.config, ids, { clipSkip });
    return o.hidden;
  });
}

/** Token ids [B, 77] for captions with the plain (diffusers training scripts') tokenizer: truncate + pad to 77. */
export function captionIds(model: LoadedModel, captions: string[]): tf.Tensor2D {
  const tok = model.tokenizer!;
  const rows = captions.map((c) => Array.from(tok.encode(c).inputIds));
  return tf.tensor2d(rows, [captions.length, tok.maxLength], 'int32');
}
