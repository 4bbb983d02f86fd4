/**
 * AUTOMATIC1111 prompt syntax (spec samplers.md §9): emphasis parsing, 75-token chunking, "Original" emphasis.
 *
 * Two behaviours exist for turning a prompt into text-encoder input:
 *  - diffusers parity: no weighting syntax (parentheses are plain text), one 77-token window, longer prompts are
 *    truncated with a warning (`ClipTokenizer.encode`).
 *  - A1111: `(a:1.3)`, `(a)`, `[a]`, `\(` escapes and `BREAK` are parsed; the prompt is split into any number of
 *    75-token chunks (each BOS + 75 + EOS, encoded separately and concatenated), and per-token weights are applied
 *    to the encoder output with the mean restored.
 * `sdtune sample` defaults to the A1111 behaviour. For a prompt with no syntax (`hasPromptSyntax` false) and <= 75
 * tokens it is identical to diffusers: one chunk with exactly `ClipTokenizer.encode`'s ids, all weights 1.0, and
 * `applyEmphasis` with all-ones weights returns z bit for bit (tested in test/tokenizer/prompt.test.ts).
 * Not handled here (they run before this step, in tokenizer/prompt-schedule.ts, as in A1111): `AND`, prompt editing
 * `[a:b:when]`, alternation `[a|b]`, `<lora:...>` / `<hypernet:...>` tags.
 */
import * as tf from '@tensorflow/tfjs';
import { SdtuneError } from '../errors.js';
import type { ClipTokenizer } from './clip.js';

// A1111 prompt_parser.re_attention / re_break (Python `\w` is Unicode-aware, hence the explicit word class).
const RE_ATTENTION = /\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()[\]:]+|:/gu;
const RE_BREAK = /\s*(?<![\p{L}\p{N}_])BREAK(?![\p{L}\p{N}_])\s*/u;
const ROUND = 1.1;
const SQUARE = 1 / 1.1;

/** A1111 `parse_prompt_attention`: "(a:1.3) [b] \(c\) BREAK d" -> [[text, weight], ...], equal neighbours merged, BREAK -> ["BREAK", -1]. */
export function parsePromptAttention(text: string): [string, number][] {
  const res: [string, number][] = [];
  const round: number[] = [];
  const square: number[] = [];
  const multiply = (start: number, m: number) => {
    for (let p = start; p < res.length; p++) res[p]![1] *= m;
  };
  for (const m of text.matchAll(RE_ATTENTION)) {
    const tok = m[0];
    const weight = m[1];
    if (tok.startsWith('\\')) res.push([tok.slice(1), 1.0]);
    else if (tok === '(') round.push(res.length);
    else if (tok === '[') square.push(res.length);
    else if (weight !== undefined && round.length > 0) {
      const w = Number(weight); // Python float(): "1.2.3" or "." raise there, so they are errors here too
      if (Number.isNaN(w)) throw new SdtuneError('usage', `prompt: invalid emphasis weight "${weight}" in "${tok}"`);
      multiply(round.pop()!, w);
    } else if (tok === ')' && round.length > 0) multiply(round.pop()!, ROUND);
    else if (tok === ']' && square.length > 0) multiply(square.pop()!, SQUARE);
    else {
      tok.split(RE_BREAK).forEach((part, i) => {
        if (i > 0) res.push(['BREAK', -1]);
        res.push([part, 1.0]);
      });
    }
  }
  for (const p of round) multiply(p, ROUND); // unclosed brackets still apply, in A1111's order
  for (const p of square) multiply(p, SQUARE);
  if (res.length === 0) res.push(['', 1.0]);
  for (let i = 0; i + 1 < res.length; ) {
    if (res[i]![1] === res[i + 1]![1]) res[i]![0] += res.splice(i + 1, 1)[0]![0];
    else i++;
  }
  return res;
}

/** True when A1111 parsing changes anything (weights, escapes, BREAK): then only the A1111 path is faithful. */
export function hasPromptSyntax(text: string): boolean {
  const p = parsePromptAttention(text);
  return !(p.length === 1 && p[0]![0] === text && p[0]![1] === 1);
}

/** A textual-inversion embedding slot in a chunk: rows [position, position + vectors) of the token embeddings get its vectors. */
export interface PromptFix {
  /** index in `ids` (BOS counted; A1111's PromptChunkFix.offset is position - 1) */
  position: number;
  name: string;
  vectors: number;
}

/** One 77-token chunk: ids [77] and weights [77] (1.0 on BOS/EOS/padding). */
export interface PromptChunk {
  ids: Int32Array;
  weights: Float32Array;
  /** which positions hold real prompt tokens: ids[1 .. length] (for TI / debugging) */
  length: number;
  /** textual-inversion placeholders in this chunk (their ids are 0, as in A1111) */
  fixes: PromptFix[];
}

export interface ChunkOptions {
  /** embeddings matched by the token ids of their name (A1111 `find_embedding_at_position`); each takes `vectors` slots */
  embeddings?: ReadonlyArray<{ name: string; vectors: number }>;
  /** A1111 option comma_padding_backtrack (default 20; 0 disables) */
  commaBacktrack?: number;
}

/** A1111 `tokenize_line` (sd_hijack_clip.py): 75-token chunks with BREAK, the comma back-off rule and TI placeholders; at least one chunk. */
export function chunkPrompt(tokenizer: ClipTokenizer, text: string, opts: ChunkOptions = {}): PromptChunk[] {
  const size = tokenizer.maxLength - 2;
  const backtrack = opts.commaBacktrack ?? 20;
  const comma = tokenizer.tokenToId(',</w>');
  const lookup = new Map<number, Array<{ ids: number[]; name: string; vectors: number }>>();
  for (const { name, vectors } of opts.embeddings ?? []) {
    if (!Number.isInteger(vectors) || vectors < 1 || vectors > size) {
      throw new SdtuneError('usage', `prompt: embedding "${name}" has ${vectors} vectors (1..${size} fit in a chunk)`);
    }
    const ids = tokenizer.encodeIds(name);
    if (ids.length === 0) continue;
    const list = lookup.get(ids[0]!) ?? [];
    list.push({ ids, name, vectors });
    list.sort((a, b) => b.ids.length - a.ids.length); // stable: longest name first, as A1111
    lookup.set(ids[0]!, list);
  }

  const chunks: PromptChunk[] = [];
  let tokens: number[] = [];
  let mults: number[] = [];
  let fixes: PromptFix[] = [];
  let lastComma = -1;
  const nextChunk = () => {
    chunks.push(makeChunk(tokenizer, tokens, mults, fixes));
    tokens = [];
    mults = [];
    fixes = [];
    lastComma = -1;
  };

  for (const [frag, weight] of parsePromptAttention(text)) {
    if (frag === 'BREAK' && weight === -1) {
      nextChunk();
      continue;
    }
    const ids = tokenizer.encodeIds(frag);
    for (let pos = 0; pos < ids.length; ) {
      const id = ids[pos]!;
      if (id === comma) lastComma = tokens.length;
      else if (backtrack !== 0 && tokens.length === size && lastComma !== -1 && tokens.length - lastComma <= backtrack) {
        // move the words after the last comma into the next chunk
        const cut = lastComma + 1;
        const relocTokens = tokens.splice(cut);
        const relocMults = mults.splice(cut);
        // A1111 leaves the TI fixes of moved tokens behind (a bug: vectors land on padding); we move them along
        const relocFixes = fixes.filter((f) => f.position > cut).map((f) => ({ ...f, position: f.position - cut }));
        fixes = fixes.filter((f) => f.position <= cut);
        nextChunk();
        tokens = relocTokens;
        mults = relocMults;
        fixes = relocFixes;
      }
      if (tokens.length === size) nextChunk();

      const emb = lookup.get(id)?.find((e) => e.ids.every((v, k) => ids[pos + k] === v));
      if (!emb) {
        tokens.push(id);
        mults.push(weight);
        pos++;
        continue;
      }
      if (tokens.length + emb.vectors > size) nextChunk(); // embeddings never straddle chunks
      fixes.push({ position: tokens.length + 1, name: emb.name, vectors: emb.vectors });
      for (let k = 0; k < emb.vectors; k++) (tokens.push(0), mults.push(weight));
      pos += emb.ids.length;
    }
  }
  if (tokens.length > 0 || chunks.length === 0) nextChunk();
  return chunks;
}

/** BOS + tokens + EOS padding (+ A1111 process_tokens: after the first EOS use the pad id, a no-op for SD v1 where pad = EOS). */
function makeChunk(tokenizer: ClipTokenizer, tokens: number[], mults: number[], fixes: PromptFix[]): PromptChunk {
  const n = tokenizer.maxLength;
  const ids = new Int32Array(n).fill(tokenizer.eosTokenId);
  const weights = new Float32Array(n).fill(1);
  ids[0] = tokenizer.bosTokenId;
  ids.set(tokens, 1);
  weights.set(mults, 1);
  if (tokenizer.padTokenId !== tokenizer.eosTokenId) ids.fill(tokenizer.padTokenId, ids.indexOf(tokenizer.eosTokenId) + 1);
  return { ids, weights, length: tokens.length, fixes };
}

/** A1111 pad_cond_uncond / batch padding: append empty-prompt chunks to the shorter list so both have the same count. */
export function padChunks(a: PromptChunk[], b: PromptChunk[], tokenizer: ClipTokenizer): [PromptChunk[], PromptChunk[]] {
  const n = Math.max(a.length, b.length);
  const pad = (c: PromptChunk[]) => [...c, ...Array.from({ length: n - c.length }, () => chunkPrompt(tokenizer, '')[0]!)];
  return [pad(a), pad(b)];
}

/**
 * A1111 "Original" emphasis (sd_emphasis.EmphasisOriginal), per 77-token chunk of z [B, 77k, C] with weights [B, 77k]:
 * z *= weights; z *= mean_before / mean_after, each mean over the chunk's whole [B, 77, C] block. Encode positive and
 * negative prompts separately (A1111 does), since the mean spans the batch. All-ones weights return z bit-exactly.
 */
export function applyEmphasis(z: tf.Tensor3D, weights: tf.Tensor2D, chunkLength = 77): tf.Tensor3D {
  const [b, t, c] = z.shape;
  if (weights.shape[0] !== b || weights.shape[1] !== t || t % chunkLength !== 0) {
    throw new SdtuneError('usage', `applyEmphasis: z [${z.shape}] and weights [${weights.shape}] must be [B,${chunkLength}k,C] and [B,${chunkLength}k]`);
  }
  return tf.tidy(() => {
    const k = t / chunkLength;
    const zc = z.reshape([b, k, chunkLength, c]);
    const before = zc.mean([0, 2, 3], true);
    const scaled = zc.mul(weights.reshape([b, k, chunkLength, 1]));
    const after = scaled.mean([0, 2, 3], true);
    // a mean of exactly 0 (a layer norm without bias gives per-token means of ~0) would make the ratio 0/0 = NaN
    const ratio = tf.where(tf.equal(after, 0), tf.onesLike(after), before.div(after));
    return scaled.mul(ratio).reshape([b, t, c]) as tf.Tensor3D;
  });
}
