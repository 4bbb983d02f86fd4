/**
 * Per-step text conditioning with A1111's prompt editing, alternation and `AND` (composable diffusion), encoded once.
 *
 * As A1111 (prompt_parser.get_multicond_learned_conditioning / get_learned_conditioning, sd_hijack_clip, and
 * sd_samplers_cfg_denoiser.CFGDenoiser): the prompt splits on AND into weighted sub-prompts; each sub-prompt and the
 * negative prompt get their schedule of texts (tokenizer/prompt-schedule.ts); the texts of one schedule are encoded
 * as one batch (padded with empty chunks to the same chunk count, the emphasis mean taken over the whole batch,
 * repeated texts counted as often as they occur), but each distinct text goes through CLIP once. At sampler call i
 * (0-based) each schedule's entry with end >= i is used; the UNet runs on [uncond, cond_1, ..., cond_k] and
 * eps = uncond + Σ_j (cond_j − uncond)·(w_j·cfg) (combine_denoised). Sub-prompt conditionings of different lengths
 * are padded by repeating their last vector (stack_conds); conditioning and unconditioning of different lengths by
 * appending encoded empty chunks (A1111's "pad prompt/negative prompt to be same length").
 * A prompt with none of this syntax gives exactly encodePromptPair's tensors and the plain CFG formula.
 */
import * as tf from '@tensorflow/tfjs';
import { usageError } from '../errors.js';
import { clipText } from '../models/clip-text.js';
import type { ClipTokenizer } from '../tokenizer/clip.js';
import { type PromptChunk, chunkPrompt } from '../tokenizer/prompt.js';
import { type ScheduleOptions, type ScheduledText, promptSchedule, scheduleIndexAt, splitAnd } from '../tokenizer/prompt-schedule.js';
import { type TextEncoder, encodeChunks } from './prompt.js';

/** The most `AND` parts a prompt may have. */
export const MAX_AND_PARTS = 64;

/** One schedule: its entries and, for each, the index of its tensor in PromptConditioning.tensors. */
interface EncodedSchedule {
  entries: ScheduledText[];
  tensor: number[];
}

export interface ConditioningOptions extends ScheduleOptions {
  prompt: string;
  negativePrompt?: string;
  /** the sampler steps the schedule is laid out over (A1111: the requested steps, also for img2img) */
  steps: number;
  clipSkip?: number;
  /** guidance scale: with 1 and a single sub-prompt of weight 1 the unconditional pass is skipped */
  cfg: number;
}

/** The UNet's context for one step, and how to combine its outputs. */
export interface StepContext {
  /** [rows·B, T, C]: B copies of uncond (when `uncond`), then B copies of each sub-prompt's conditioning */
  ctx: tf.Tensor3D;
  /** the sub-prompts' weights, in row order */
  weights: number[];
}

export class PromptConditioning {
  /** distinct encoded conditionings [1, 77k, C] */
  readonly tensors: tf.Tensor3D[] = [];
  /** per AND part, in prompt order (a repeated part is repeated, as in A1111) */
  readonly conds: { weight: number; schedule: EncodedSchedule }[] = [];
  readonly uncond?: EncodedSchedule;
  /** UNet rows per image: the sub-prompts plus the unconditional one when guidance needs it */
  readonly rows: number;
  /** the most 77-token chunks of any conditioning (for the memory estimate) */
  readonly maxChunks: number;
  private empty?: tf.Tensor3D;
  private cache = new Map<string, StepContext>();
  private te: TextEncoder;
  private tokenizer: ClipTokenizer;
  private clipSkip: number;

  constructor(te: TextEncoder, tokenizer: ClipTokenizer, o: ConditioningOptions) {
    this.te = te;
    this.tokenizer = tokenizer;
    this.clipSkip = o.clipSkip ?? 1;
    try {
      const parts = splitAnd(o.prompt);
      // each part is one more UNet row per image: a bound before any encoding
      if (parts.length > MAX_AND_PARTS) throw usageError(`prompt: ${parts.length} AND parts (at most ${MAX_AND_PARTS}, each one more UNet pass per step)`);
      const byText = new Map<string, EncodedSchedule>();
      for (const { text, weight } of parts) {
        let s = byText.get(text);
        if (!s) byText.set(text, (s = this.encodeSchedule(promptSchedule(text, o.steps, o))));
        this.conds.push({ weight, schedule: s });
      }
      const useUncond = !(o.cfg === 1 && parts.length === 1 && parts[0]!.weight === 1);
      // A1111 runs the negative prompt through the schedule too, but never splits it on AND
      if (useUncond) this.uncond = this.encodeSchedule(promptSchedule(o.negativePrompt ?? '', o.steps, o));
      this.rows = this.conds.length + (useUncond ? 1 : 0);
      this.maxChunks = Math.max(...this.tensors.map((t) => t.shape[1] / tokenizer.maxLength));
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  /** Encode a schedule's texts as one A1111 batch; each distinct text once. */
  private encodeSchedule(entries: ScheduledText[]): EncodedSchedule {
    const counts = new Map<string, number>();
    for (const e of entries) counts.set(e.text, (counts.get(e.text) ?? 0) + 1);
    const texts = [...counts.keys()];
    const chunks = texts.map((t) => chunkPrompt(this.tokenizer, t));
    const base = this.tensors.length;
    if (texts.length === 1) this.tensors.push(encodeChunks(this.te, chunks[0]!, this.clipSkip));
    else this.tensors.push(...encodeBatch(this.te, this.tokenizer, chunks, texts.map((t) => counts.get(t)!), this.clipSkip));
    return { entries, tensor: entries.map((e) => base + texts.indexOf(e.text)) };
  }

  /** Tensor indices in force at sampler call i: [uncond or -1, cond_1, ..., cond_k]. */
  indicesAt(i: number): number[] {
    const pick = (s: EncodedSchedule) => s.tensor[scheduleIndexAt(s.entries, i)]!;
    return [this.uncond ? pick(this.uncond) : -1, ...this.conds.map((c) => pick(c.schedule))];
  }

  /** The context for sampler call i and batch size b (cached: a schedule with few distinct texts builds few contexts). */
  at(i: number, b: number): StepContext {
    const idx = this.indicesAt(i);
    const key = `${b}:${idx.join(',')}`;
    const hit = this.cache.get(key);
    if (hit) return hit;
    if (this.cache.size >= 8) {
      const [oldKey, old] = this.cache.entries().next().value as [string, StepContext];
      old.ctx.dispose();
      this.cache.delete(oldKey);
    }
    const ctx = tf.tidy(() => {
      // stack_conds: sub-prompts padded to the longest by repeating their last vector
      let conds = idx.slice(1).map((k) => this.tensors[k]!);
      const tc = Math.max(...conds.map((t) => t.shape[1]));
      conds = conds.map((t) => (t.shape[1] === tc ? t : padLastVector(t, tc)));
      let rows = conds;
      if (idx[0]! >= 0) {
        let u = this.tensors[idx[0]!]!;
        // uncond vs cond: encoded empty chunks appended to the shorter
        if (u.shape[1] < tc) u = this.padEmpty(u, tc);
        else if (u.shape[1] > tc) rows = conds.map((t) => this.padEmpty(t, u.shape[1]));
        rows = [u, ...rows];
      }
      return tf.concat(rows.map((t) => (b === 1 ? t : tf.tile(t, [b, 1, 1]))), 0) as tf.Tensor3D;
    });
    const step = { ctx, weights: this.conds.map((c) => c.weight) };
    this.cache.set(key, step);
    return step;
  }

  private padEmpty(t: tf.Tensor3D, len: number): tf.Tensor3D {
    this.empty ??= tf.keep(encodeChunks(this.te, chunkPrompt(this.tokenizer, ''), this.clipSkip));
    const n = (len - t.shape[1]) / this.empty.shape[1];
    return tf.concat([t, ...Array.from({ length: n }, () => this.empty!)], 1) as tf.Tensor3D;
  }

  /** Guidance over the UNet output for `rows` groups of b: uncond + Σ_j (cond_j − uncond)·(w_j·cfg); one group passes through. */
  combine(out: tf.Tensor4D, weights: readonly number[], cfg: number): tf.Tensor4D {
    if (!this.uncond) return out;
    return tf.tidy(() => {
      const parts = tf.split(out, this.rows, 0);
      const u = parts[0]!;
      let acc: tf.Tensor = u;
      weights.forEach((w, j) => (acc = tf.add(acc, tf.mul(tf.sub(parts[j + 1]!, u), w * cfg))));
      return acc as tf.Tensor4D;
    });
  }

  dispose(): void {
    for (const s of this.cache.values()) s.ctx.dispose();
    this.cache.clear();
    tf.dispose(this.tensors);
    this.tensors.length = 0;
    this.empty?.dispose();
    this.empty = undefined;
  }
}

/** stack_conds: extend [1, T, C] to [1, len, C] with copies of its last vector. */
function padLastVector(t: tf.Tensor3D, len: number): tf.Tensor3D {
  const last = t.slice([0, t.shape[1] - 1, 0], [1, 1, -1]);
  return tf.concat([t, tf.tile(last, [1, len - t.shape[1], 1])], 1) as tf.Tensor3D;
}

/**
 * A1111's FrozenCLIPEmbedderWithCustomWords.forward over a batch of texts (text j occurring counts[j] times): chunk
 * lists padded with empty chunks to the same count; per chunk index, "Original" emphasis with the means taken over
 * the whole batch (z·w, then times mean(z)/mean(z·w)). CLIP runs once per distinct text, as encodeChunks does.
 */
export function encodeBatch(te: TextEncoder, tokenizer: ClipTokenizer, chunkLists: PromptChunk[][], counts: number[], clipSkip = 1): tf.Tensor3D[] {
  const k = Math.max(...chunkLists.map((c) => c.length));
  const empty = chunkPrompt(tokenizer, '')[0]!;
  const padded = chunkLists.map((c) => [...c, ...Array.from({ length: k - c.length }, () => empty)]);
  const l = tokenizer.maxLength;
  return tf.tidy(() => {
    const zs = padded.map((chunks) => {
      const ids = tf.tensor2d(chunks.flatMap((c) => Array.from(c.ids)), [k, l], 'int32');
      return clipText(te.params, te.config, ids, { clipSkip }).hidden; // [k, 77, C]
    });
    const c = zs[0]!.shape[2];
    const plain = padded.every((chunks) => chunks.every((ch) => ch.weights.every((w) => w === 1)));
    if (plain) return zs.map((z) => z.reshape([1, k * l, c]) as tf.Tensor3D);
    const w = tf.tensor4d(padded.flatMap((chunks) => chunks.flatMap((ch) => Array.from(ch.weights))), [padded.length, k, l, 1]);
    const out = emphasizeBatch(tf.stack(zs) as tf.Tensor4D, w, counts);
    return tf.unstack(out).map((o) => o.reshape([1, k * l, c]) as tf.Tensor3D);
  });
}

/**
 * "Original" emphasis over a batch, per chunk index: z [J, k, 77, C] (text j occurring counts[j] times), weights
 * [J, k, 77, 1]: z·w·(mean(z) / mean(z·w)), both means over every occurrence's [77, C] block of that chunk index.
 */
export function emphasizeBatch(z: tf.Tensor4D, weights: tf.Tensor4D, counts: readonly number[]): tf.Tensor4D {
  return tf.tidy(() => {
    const [, , l, c] = z.shape;
    const n = tf.tensor4d(counts as number[], [counts.length, 1, 1, 1]);
    const total = counts.reduce((a, v) => a + v, 0) * l * c;
    const before = tf.div(tf.sum(tf.mul(z, n), [0, 2, 3], true), total);
    const scaled = tf.mul(z, weights);
    const after = tf.div(tf.sum(tf.mul(scaled, n), [0, 2, 3], true), total);
    const ratio = tf.where(tf.equal(after, 0), tf.onesLike(after), tf.div(before, after));
    return tf.mul(scaled, ratio) as tf.Tensor4D;
  });
}
