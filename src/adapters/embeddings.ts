/**
 * Textual-inversion embeddings (spec: shared/spec/embeddings-and-hypernetworks.md §1-2): read and write the A1111 /
 * kohya (`emb_params`) and diffusers (`{token: vectors}`) safetensors forms, and put embeddings into a prompt the
 * diffusers way: new tokens `<t>`, `<t>_1`, ... with their rows appended to the token-embedding table.
 */
import * as tf from '@tensorflow/tfjs';
import path from 'node:path';
import { SdtuneError, fmtShape, formatError, usageError } from '../errors.js';
import { isPickleFile, openTensorFile } from '../io/pickle.js';
import { writeSafetensors } from '../io/safetensors.js';
import { type ParamTree, leaf, sub } from '../models/params.js';
import type { ClipTokenizer } from '../tokenizer/clip.js';

export interface Embedding {
  /** the prompt word: diffusers token, or A1111's file-name stem */
  token: string;
  /** n vectors of the token-embedding width, [n, dim] */
  vectors: { shape: [number, number]; data: Float32Array };
  path: string;
  format: 'a1111' | 'diffusers';
  /** training step, when the file records it */
  step?: number;
}

/** Extra tokens of an n-vector embedding: `<t>`, `<t>_1`, ... (diffusers _extend_tokens_and_embeddings). */
const tokensOf = (e: Embedding) => Array.from({ length: e.vectors.shape[0] }, (_, i) => (i === 0 ? e.token : `${e.token}_${i}`));

/**
 * Read an A1111/kohya (`emb_params`, `string_to_param.*`) or diffusers (`{token: [dim] | [n,dim]}`) safetensors
 * embedding, or an A1111 `.pt` / diffusers `.bin` (pickles, read as data) (A1111 create_embedding_from_data, diffusers _retrieve_tokens_and_embeddings). The token is
 * opts.token, else the diffusers key, else the file-name stem as A1111 uses. SDXL (clip_l/clip_g) is refused.
 */
export async function readEmbedding(file: string, opts: { token?: string; expectedDim?: number } = {}): Promise<Embedding> {
  if (!/\.safetensors$/i.test(file) && !isPickleFile(file)) {
    throw new SdtuneError('unsupported', `${file}: embeddings are read from .safetensors, or .pt/.bin files (PyTorch pickles, read as data)`);
  }
  if (opts.token !== undefined && !opts.token.trim()) throw usageError(`${file}: the embedding token cannot be empty`);
  const f = await openTensorFile(file); // a pickle: A1111's {string_to_param: {"*": tensor}} flattens to "string_to_param.*"
  try {
    const keys = f.keys().filter((k) => !k.startsWith('string_to_token')); // legacy id map of the original TI repo
    if (keys.includes('clip_l') || keys.includes('clip_g')) {
      throw new SdtuneError('unsupported', `${file}: an SDXL embedding (clip_l / clip_g vectors); SD v1 models cannot use it`);
    }
    const a1111 = keys.filter((k) => k === 'emb_params' || k.startsWith('string_to_param'));
    const key = a1111.length === 1 ? a1111[0] : keys.length === 1 ? keys[0] : undefined;
    if (key === undefined) {
      throw formatError(`${file}: not a textual-inversion embedding: expected one tensor (emb_params, string_to_param.* or a token), found ${keys.length}: ${keys.slice(0, 8).join(', ')}`);
    }
    const t = await f.readFloat(key);
    if (!(t.data instanceof Float32Array) || t.shape.length < 1 || t.shape.length > 2) {
      throw formatError(`${file}: "${key}" is ${t.dtype} ${fmtShape(t.shape)}, expected float vectors [dim] or [n, dim]`);
    }
    const shape: [number, number] = t.shape.length === 1 ? [1, t.shape[0]] : [t.shape[0], t.shape[1]];
    if (shape[0] < 1) throw formatError(`${file}: "${key}" holds no vectors`);
    if (opts.expectedDim !== undefined && shape[1] !== opts.expectedDim) {
      throw formatError(`${file}: embedding vectors have width ${shape[1]}, but the text encoder's token embeddings have width ${opts.expectedDim} (made for another model?)`);
    }
    const format = key === 'emb_params' || key.startsWith('string_to_param') ? 'a1111' : 'diffusers';
    const token = opts.token ?? (format === 'diffusers' ? key : path.basename(file).replace(/\.(safetensors|pt|pth|bin|ckpt)$/i, ''));
    const step = Number.parseInt(f.metadata.step ?? '', 10);
    return { token, vectors: { shape, data: t.data }, path: file, format, ...(Number.isFinite(step) ? { step } : {}) };
  } finally {
    await f.close();
  }
}

/**
 * diffusers load_textual_inversion: add `<t>`, `<t>_1`, ... to the tokenizer, append their rows to
 * text_model.embeddings.token_embedding.weight (a new leaf swapped in), and return the ids plus the prompt rewriter
 * (maybe_convert_prompt). restore() puts the original table back; the tokenizer keeps the tokens (it cannot forget
 * them), and applying the same embeddings again reuses their ids.
 */
export function applyEmbeddings(
  textEncoderParams: ParamTree,
  tokenizer: ClipTokenizer,
  embeddings: Embedding[],
): { ids: Map<string, number[]>; rewritePrompt: (p: string) => string; usedIn: (...prompts: string[]) => Embedding[]; restore: () => void } {
  const node = sub(textEncoderParams, 'text_model', 'embeddings', 'token_embedding');
  const old = leaf(node, 'weight');
  const [rows, dim] = old.shape as [number, number];
  // 1. check everything before touching the tokenizer
  const seen = new Set<string>();
  for (const e of embeddings) {
    if (e.vectors.shape[1] !== dim) {
      throw formatError(`${e.path}: embedding "${e.token}" has width ${e.vectors.shape[1]}, the text encoder's token embeddings have width ${dim}`);
    }
    for (const t of tokensOf(e)) {
      const id = tokenizer.tokenToId(t);
      // ids >= rows are tokens without a row: left by an earlier apply + restore, so they can take one again
      if (id !== undefined && id < rows) throw usageError(`${e.path}: token "${t}" is already in the tokenizer vocabulary (id ${id}); choose another token`);
      if (seen.has(t)) throw usageError(`${e.path}: token "${t}" is given by two embeddings`);
      seen.add(t);
    }
  }
  // 2. register tokens, then grow the table by the new rows
  const ids = new Map(embeddings.map((e) => [e.token, tokenizer.addTokens(tokensOf(e))]));
  const all = [...ids.values()].flat();
  if (all.some((id) => id < rows)) throw formatError(`tokenizer has fewer ids (${tokenizer.size}) than the token embedding table has rows (${rows})`);
  const total = Math.max(rows, ...all.map((id) => id + 1));
  const extra = new Float32Array((total - rows) * dim);
  for (const e of embeddings) ids.get(e.token)!.forEach((id, i) => extra.set(e.vectors.data.subarray(i * dim, (i + 1) * dim), (id - rows) * dim));
  const grown = total === rows ? old : tf.tidy(() => tf.concat([old, tf.tensor2d(extra, [total - rows, dim])]));
  node.weight = grown;

  // 3. maybe_convert_prompt: each added token T found in the prompt becomes "T T_1 ... T_{n-1}" (str.replace)
  const rewritePrompt = (prompt: string) => {
    const present = new Set(tokenizer.tokenize(prompt));
    let out = prompt;
    for (const e of embeddings) if (e.vectors.shape[0] > 1 && present.has(e.token)) out = out.split(e.token).join(tokensOf(e).join(' '));
    return out;
  };
  // the embeddings whose token the tokenizer finds in any of the prompts (added tokens match verbatim, case-sensitive)
  const usedIn = (...prompts: string[]) => {
    const present = new Set(prompts.flatMap((p) => tokenizer.tokenize(p)));
    return embeddings.filter((e) => present.has(e.token));
  };
  let restored = false;
  const restore = () => {
    if (restored || grown === old) return;
    if (node.weight !== grown) throw new Error('embeddings restore: the token embedding table was replaced since applying (restore in reverse order)');
    node.weight = old;
    grown.dispose();
    restored = true;
  };
  return { ids, rewritePrompt, usedIn, restore };
}

/**
 * What to tell the user at sample time: one line naming the embeddings found in the prompts (`embeddings used:
 * my-logo (2 vectors)`), and a warning for each loaded embedding whose token occurs in neither prompt.
 */
export function describeEmbeddingUse(loaded: Embedding[], used: Embedding[]): string[] {
  const n = (e: Embedding) => `${e.vectors.shape[0]} vector${e.vectors.shape[0] === 1 ? '' : 's'}`;
  const lines = used.length ? [`embeddings used: ${used.map((e) => `${e.token} (${n(e)})`).join(', ')}`] : [];
  for (const e of loaded) {
    if (!used.includes(e)) lines.push(`warning: embedding ${e.path} is loaded as "${e.token}", but "${e.token}" occurs in neither the prompt nor the negative prompt (tokens match exactly, case included; set another with FILE:TOKEN)`);
  }
  return lines;
}

export { embeddingFileStem } from './file-names.js';

/** Write the A1111 / kohya safetensors form: `emb_params` [n,dim] with name/step metadata (A1111 Embedding.save fields). */
export async function writeEmbeddingA1111(file: string, e: Embedding): Promise<void> {
  const metadata: Record<string, string> = { name: e.token };
  if (e.step !== undefined) metadata.step = String(e.step);
  await writeSafetensors(file, { emb_params: e.vectors }, { metadata });
}

/** Write the diffusers form `{token: [dim]}` (one vector, as textual_inversion.py saves it) or `{token: [n,dim]}`. */
export async function writeEmbeddingDiffusers(file: string, e: Embedding): Promise<void> {
  const shape = e.vectors.shape[0] === 1 ? [e.vectors.shape[1]] : e.vectors.shape;
  await writeSafetensors(file, { [e.token]: { shape, data: e.vectors.data } }, { metadata: { format: 'pt' } });
}
