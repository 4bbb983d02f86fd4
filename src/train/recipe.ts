/**
 * What a training method declares (design principle 8): its trainable parameters, how captions become the text
 * conditioning (inside the gradient tape when the text encoder trains), and how its result is exported; and, where
 * it differs from the loop's defaults, its batches, its loss, what happens after a step and what else its
 * checkpoints hold. The loop, data, optimizer, EMA and checkpoints are shared by every recipe.
 */
import * as tf from '@tensorflow/tfjs';
import type { DataItem } from '../data/dataset.js';
import type { Batch, DataLoader } from '../data/loader.js';
import { SdtuneError, fmtShape } from '../errors.js';
import type { LoadedModel } from '../io/model.js';
import { clipText } from '../models/clip-text.js';
import type { ContextAdapter, Forward } from '../models/layers.js';

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
  /** a prompt as the model reads it, written as is otherwise (textual inversion: the token expanded to its
   *  placeholder tokens, no template): what the judges sample (output.eval_prompts) */
  expandPrompt?(prompt: string): string;
  /** text conditioning [B, 77, C] for token ids [B, 77] (called inside the tape) */
  encodeIds(ids: tf.Tensor2D): tf.Tensor3D;
  /** run `fn` with the trained state visible to the plain inference path (pipelines, sample); `use` holds what
   *  the pipeline must be given besides the model (a hypernetwork's context adapter) */
  withInference<T>(fn: (use?: InferenceUse) => Promise<T>): Promise<T>;
  /** write the result files (adapter, embedding, model); returns their paths. The trainables hold the weights of
   *  output.export_ema; `withEma` (present with train.ema) runs a write with the EMA average in their place */
  export(dir: string, name: string, step: number, ctx?: ExportContext): Promise<string[]>;
  /** undo every change to the model and free the recipe's tensors */
  dispose(): void;

  // ---- optional: each replaces one default of the loop ----
  /** the training images when the recipe read them itself (DreamBooth: the instance images with their prompt, plus
   *  the class images when they are shuffled in); the loop then does not scan data.dir (default: it does) */
  readonly items?: readonly DataItem[];
  /** the batch of one forward pass (default: `loader.next()`). A recipe may add data (DreamBooth: class images
   *  from its own loader, appended); the loop disposes what it returns (disposeBatch) and passes that same object
   *  to reduceLoss / loss. Random draws come from the generator `create` got, so a resume repeats them. */
  nextBatch?(loader: DataLoader): Promise<Batch>;
  /** the scalar trained on, from the diffusion loss of each item [B] (min-SNR weights applied): prior
   *  preservation, masks, per-item weights (default: the mean). Called inside the gradient tape. */
  reduceLoss?(perItem: tf.Tensor1D, batch: Batch): tf.Scalar;
  /** the whole loss, for a method that is not diffusion training (a VAE: reconstruction + KL on batch.pixels): the
   *  loop then draws no noise or timesteps and runs no UNet. Called inside the gradient tape. */
  loss?(batch: Batch): tf.Scalar;
  /** the UNet forward's options in the training step (LossOptions.forward): `training` + `rng` for dropout (LoRA
   *  dropout, a hypernetwork's), `context` for a hypernetwork. The rng must be the generator `create` got, so that a
   *  resume repeats the masks */
  readonly forward?: Forward;
  /** after every optimizer step, after the loop's EMA update; `step` counts the steps completed */
  afterStep?(step: number): void;
  /** what this recipe's checkpoints hold beyond the trainables and the optimizer, restored exactly on resume */
  readonly checkpoint?: RecipeCheckpoint;
}

/** What inference needs from a recipe besides the model (generate()'s options of the same names). */
export interface InferenceUse {
  /** adapts every attention's context (a hypernetwork: adapters/hypernetwork.ts hypernetworkAdapter) */
  context?: ContextAdapter;
}

/** What the loop gives a recipe's export. */
export interface ExportContext {
  /** run `fn` with the EMA average in the trainables' place (restored after); absent without train.ema */
  withEma?<T>(fn: () => Promise<T>): Promise<T>;
}

/** A recipe's own checkpoint state. */
export interface RecipeCheckpoint {
  /** small JSON state (e.g. its own data loader's `getState()`), taken before every step, so that a step cut short
   *  saves the state from before it; return a fresh value */
  json?(): unknown;
  /** named float32 tensors (recipe.safetensors in the checkpoint folder), read when a checkpoint is written:
   *  change them only in afterStep (between steps) */
  tensors?(): Map<string, tf.Tensor>;
  /** put the saved state back on resume: `json` as json() gave it, `tensors` with the names and shapes tensors()
   *  gives (checked before the call; the loop disposes them after it) */
  restore(saved: { json: unknown; tensors: Map<string, tf.Tensor> }): void;
}

/** Give a recipe the state its checkpoint saved (strictly: the same tensor names and shapes as it has now). */
export function restoreRecipeState(recipe: Recipe, dir: string, json: unknown, saved: Map<string, { shape: number[]; data: Float32Array }> | undefined): void {
  const got = saved ?? new Map<string, { shape: number[]; data: Float32Array }>();
  const ck = recipe.checkpoint;
  if (!ck) {
    if (got.size) throw new SdtuneError('format', `${dir}: the checkpoint holds recipe state (${[...got.keys()].slice(0, 4).join(', ')}) that the ${recipe.method} recipe does not have`);
    return;
  }
  const now = ck.tensors?.() ?? new Map<string, tf.Tensor>();
  const missing = [...now.keys()].filter((k) => !got.has(k));
  const extra = [...got.keys()].filter((k) => !now.has(k));
  if (missing.length || extra.length) {
    throw new SdtuneError('format', `${dir}: the recipe state does not match this training setup (missing: ${missing.slice(0, 4).join(', ') || '-'}; unexpected: ${extra.slice(0, 4).join(', ') || '-'})`);
  }
  for (const [k, t] of now) {
    const s = got.get(k)!.shape;
    if (fmtShape(s) !== fmtShape(t.shape)) throw new SdtuneError('format', `${dir}: recipe state ${k} is ${fmtShape(s)} in the checkpoint, ${fmtShape(t.shape)} now`);
  }
  const tensors = new Map([...got].map(([k, t]) => [k, tf.tensor(t.data, t.shape, 'float32')] as const));
  try {
    ck.restore({ json, tensors });
  } finally {
    tf.dispose([...tensors.values()]);
  }
}

/** Plain text conditioning through the (possibly LoRA-injected) text encoder; `f` carries LoRA dropout in training. */
export function encodeWithTextEncoder(model: LoadedModel, ids: tf.Tensor2D, clipSkip = 1, f: Pick<Forward, 'training' | 'rng' | 'loraDropout'> = {}): tf.Tensor3D {
  const te = model.textEncoder!;
  return tf.tidy(() => {
    const o = clipText(te.params, te.config, ids, { ...f, clipSkip });
    return o.hidden;
  });
}

/** Token ids [B, 77] for captions with the plain (diffusers training scripts') tokenizer: truncate + pad to 77. */
export function captionIds(model: LoadedModel, captions: string[]): tf.Tensor2D {
  const tok = model.tokenizer!;
  const rows = captions.map((c) => Array.from(tok.encode(c).inputIds));
  return tf.tensor2d(rows, [captions.length, tok.maxLength], 'int32');
}
