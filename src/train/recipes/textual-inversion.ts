/**
 * Textual inversion recipe (Gal et al. 2022, as diffusers' textual_inversion.py): placeholder tokens `<t>`,
 * `<t>_1`, ... are added to the tokenizer, their embedding rows start from the init word's embedding and are the
 * only trainable parameters (every other row stays bitwise unchanged). Exported as A1111 and diffusers embeddings.
 */
import * as tf from '@tensorflow/tfjs';
import path from 'node:path';
import { writeEmbeddingA1111, writeEmbeddingDiffusers } from '../../adapters/embeddings.js';
import { ownedVariable } from '../../adapters/lora-inject.js';
import { usageError } from '../../errors.js';
import type { LoadedModel } from '../../io/model.js';
import { leaf, sub } from '../../models/params.js';
import { clipText } from '../../models/clip-text.js';
import type { Recipe } from '../recipe.js';

export interface TiRecipeOptions {
  token: string;
  initWord: string;
  vectors: number;
  /** caption templates with {} for the placeholder, used when an image has no caption mentioning the token */
  templates: string[];
  clipSkip?: number;
}

export { TI_TEMPLATES } from '../config.js';

let tiCounter = 0;

/** Add the placeholder tokens and their trainable rows. */
export function createTiRecipe(model: LoadedModel, o: TiRecipeOptions): Recipe & { ids: number[]; tokens: string[] } {
  const tok = model.tokenizer!;
  if (!Number.isInteger(o.vectors) || o.vectors < 1) throw usageError(`textual_inversion.vectors must be a positive integer, got ${o.vectors}`);
  const tokens = Array.from({ length: o.vectors }, (_, i) => (i === 0 ? o.token : `${o.token}_${i}`));
  for (const t of tokens) {
    if (tok.tokenToId(t) !== undefined) throw usageError(`token "${t}" is already in the vocabulary; choose another placeholder (e.g. "<my-thing>")`);
  }
  const initIds = tok.encodeIds(o.initWord);
  if (!initIds.length) throw usageError(`textual_inversion.init_word "${o.initWord}" has no tokens`);
  if (initIds.length > 1) {
    process.stderr.write(`note: init word "${o.initWord}" is ${initIds.length} tokens; vector i starts from token i mod ${initIds.length}\n`);
  }
  const node = sub(model.textEncoder!.params, 'text_model', 'embeddings', 'token_embedding');
  const base = leaf(node, 'weight');
  const ids = tok.addTokens(tokens);
  if (ids[0] !== base.shape[0]) throw usageError(`tokenizer has ${ids[0]} ids but the token table has ${base.shape[0]} rows`);
  // rows start as the init word's embedding (cycled over its tokens for multi-vector placeholders)
  const rows = ownedVariable(
    tf.tidy(() => tf.gather(base, tf.tensor1d(tokens.map((_, i) => initIds[i % initIds.length]), 'int32'))),
    `ti/${o.token}#${tiCounter++}`,
  );
  const placeholder = tokens.join(' ');
  const vocab = base.shape[0]!;
  /** A caption with the placeholder tokens: the token expanded where it is written, else in a template. */
  const captionFor = (caption: string, pick: (n: number) => number): string => {
    if (caption.includes(o.token)) return caption.split(o.token).join(placeholder);
    return o.templates[pick(o.templates.length)].replace('{}', placeholder);
  };
  /**
   * Token embeddings with the trainable rows: the frozen table is gathered as usual, the new ids pick their rows by
   * a one-hot matmul. (A gather from the grown table would route the gradient through a dense [vocab, dim]
   * segment sum, which tfjs' cpu backend computes one row at a time.)
   */
  const embeds = (ids: tf.Tensor2D): tf.Tensor3D =>
    tf.tidy(() => {
      const [b, l] = ids.shape;
      const isNew = tf.greaterEqual(ids, vocab);
      const fromBase = tf.gather(base, tf.where(isNew, tf.zerosLike(ids), ids));
      const newIdx = tf.clipByValue(tf.sub(ids, vocab), 0, o.vectors - 1).reshape([-1]) as tf.Tensor1D;
      const hot = tf.oneHot(tf.cast(newIdx, 'int32'), Math.max(2, o.vectors)).slice([0, 0], [-1, o.vectors]); // tfjs needs depth >= 2
      const pick = tf.mul(hot, tf.cast(isNew, 'float32').reshape([-1, 1]));
      const fromRows = tf.matMul(pick, rows).reshape([b, l, -1]);
      return tf.add(tf.mul(fromBase, tf.cast(tf.logicalNot(isNew), 'float32').expandDims(-1)), fromRows) as tf.Tensor3D;
    });
  return {
    method: 'textual_inversion',
    ids,
    tokens,
    trainables: new Map([[`embedding.${o.token}`, rows]]),
    textEncoderTrainable: true,
    uncaptioned: 'templates',
    captionFor,
    samplePrompt: (prompt) => captionFor(prompt, () => 0),
    expandPrompt: (prompt) => prompt.split(o.token).join(placeholder),
    encodeIds: (idsT) =>
      tf.tidy(() => clipText(model.textEncoder!.params, model.textEncoder!.config, idsT, { clipSkip: o.clipSkip, inputEmbeds: embeds(idsT) }).hidden),
    async withInference(fn) {
      const grown = tf.concat([base, rows]);
      node.weight = grown;
      try {
        return await fn();
      } finally {
        node.weight = base;
        grown.dispose();
      }
    },
    async export(dir, name, step) {
      const vectors = { shape: [o.vectors, base.shape[1]!] as [number, number], data: (await rows.data()) as Float32Array };
      const e = { token: o.token, vectors, path: '', format: 'a1111' as const, step };
      const a1111 = path.join(dir, `${name}.safetensors`);
      const diffusers = path.join(dir, `${name}.diffusers.safetensors`);
      await writeEmbeddingA1111(a1111, { ...e, path: a1111 });
      await writeEmbeddingDiffusers(diffusers, { ...e, path: diffusers, format: 'diffusers' });
      return [a1111, diffusers];
    },
    dispose() {
      node.weight = base;
      rows.dispose();
    },
  };
}
