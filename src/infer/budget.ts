/**
 * Memory estimates for sampling, made from the model configs before any allocation (design: "a limit is checked
 * before work starts, with a clear error"), and the check that refuses a size the backend cannot hold.
 *
 * The estimate follows how the networks hold memory. Each block runs in its own tidy and returns only its output,
 * but the UNet's (and the VAE's) own tidy keeps every block output until the network returns; so the peak of a
 * forward is the sum of the block outputs (and the up blocks' skip concats) produced so far plus the working set
 * of the block that runs, maximised over blocks. A block's working set is counted in feature maps of its size, with
 * factors measured with runtime/memory.ts's measurePeak (unique tensor bytes) on the wasm backend:
 *   resnet      6 maps of its input channels + 11 of its output channels (+2 with a 1x1 shortcut, +1 with a time
 *               embedding)
 *   transformer 58 maps of its channels (the GEGLU feed-forward: 8x wide projection, its halves and GELU terms), or
 *               13 maps + twice the largest attention-score chunk (scores and softmax) when that is larger
 *   up/down     3.5 maps of the output (nearest 2x then conv) / 1.6 maps of the input (padded copy then conv)
 * The VAE decodes one image at a time, at full resolution (SD v1's peak at 512x512: ~3.9 GB). Sampling's peak is
 * the weights plus 1.25x (MARGIN) the largest of the text encoder, the UNet step and the VAE decode (encode for
 * img2img) with the latents, sampler history and conditioning held across the loop. Checked against a backend, a
 * second copy of the weights is added where the backend keeps one (wasm). test/infer/budget.test.ts keeps the
 * estimate an upper bound within 2x of measurements on the bundled tiny model.
 */
import { SdtuneError } from '../errors.js';
import type { LoadedModel } from '../io/model.js';
import { type ClipTextConfig, CLIP_MAX_LENGTH, type UNetConfig, VAE_SCALE, type VaeConfig, vaeScaleFactor } from '../models/configs.js';
import { attentionChunks, getAttentionChunkElements } from '../models/layers.js';
import { countParams } from '../models/params.js';
import { type MemoryBudget, memoryBudget } from '../runtime/backend.js';

const F32 = 4;

/**
 * Headroom on the activations: scratch memory kernels allocate inside one call (invisible to the engine), the
 * allocator's fragmentation, and small differences between backends. The factors above match measurements within
 * 5%; this keeps the estimate an upper bound.
 */
const MARGIN = 1.25;

/**
 * Largest image side accepted at all (pixels), checked before anything else: a 2048-pixel latent is far past what
 * any SD v1 model can decode in memory (SD v1's VAE would need ~4 TB at 16384x16384), so nothing beyond reaches an
 * estimate or an allocation.
 */
export const MAX_IMAGE_SIDE = 16384;

/** What one sampling call runs. */
export interface SamplingShape {
  width: number;
  height: number;
  /** images per UNet step (default 1) */
  batchSize?: number;
  /** classifier-free guidance on (the UNet runs on 2x the batch) */
  cfg?: boolean;
  /** an init image is encoded (img2img, inpainting) */
  encode?: boolean;
  /** attention score elements per chunk (default: the current setting, within the device's limit) */
  attentionChunk?: number;
  /** text chunks of 77 tokens (long prompts; default 1) */
  textChunks?: number;
}

export interface MemoryEstimate {
  /** float32 weights of the loaded networks */
  weightsBytes: number;
  /** peak activation bytes of each stage */
  textBytes: number;
  unetBytes: number;
  vaeDecodeBytes: number;
  vaeEncodeBytes: number;
  /** latents, noise, sampler history and conditioning held across the loop */
  loopBytes: number;
  /** weights + the largest stage + the loop's tensors */
  peakBytes: number;
  /** the largest single tensor (a WebGPU device binds each tensor in one buffer) */
  largestTensorBytes: number;
}

/** Walks a network's blocks: `live` bytes kept by the network's tidy, `peak` = max over blocks of live + working set. */
class Walk {
  live = 0;
  peak = 0;
  largest = 0;
  /** every block's working set added up: what a gradient tape, which keeps each op's inputs, holds at most */
  total = 0;
  /** a block whose working set (output included) is `work` bytes and which leaves `out` bytes alive */
  block(work: number, out: number, largest = 0): void {
    this.peak = Math.max(this.peak, this.live + work);
    this.total += work;
    this.live += out;
    this.largest = Math.max(this.largest, largest, out);
  }
}

/** Side of level l (each downsample halves, rounding up: 3x3 stride-2 conv with padding). */
const down = (side: number, l: number) => {
  let s = side;
  for (let i = 0; i < l; i++) s = Math.ceil(s / 2);
  return s;
};

function resnetWork(w: Walk, perCh: number, cin: number, cout: number, temb: boolean): void {
  const maps = 6 * cin + 11 * cout + (cin !== cout ? 2 * cout : 0) + (temb ? cout : 0);
  w.block(maps * perCh, cout * perCh, cin * perCh);
}

/** Bytes of the largest attention-score chunk attention() materialises for [bh, nq, nk] scores. */
function scoreChunkBytes(bh: number, nq: number, nk: number, budget: number): number {
  const { group, rows } = attentionChunks(bh, nq, nk, budget);
  return group * rows * nk * F32;
}

/** Peak activation bytes of one UNet call on a [b, lh, lw, in_channels] latent batch (b includes the CFG doubling). */
export function unetPeakBytes(cfg: UNetConfig, b: number, lh: number, lw: number, chunk = getAttentionChunkElements(), ctxLen = CLIP_MAX_LENGTH): { peak: number; largest: number; total: number } {
  const ch = cfg.block_out_channels;
  const n = ch.length;
  const w = new Walk();
  const perCh = (l: number) => b * down(lh, l) * down(lw, l) * F32;
  const tokens = (l: number) => down(lh, l) * down(lw, l);
  const transformer = (l: number, c: number, heads: number) => {
    const m = c * perCh(l);
    const selfScores = scoreChunkBytes(b * heads, tokens(l), tokens(l), chunk);
    const crossScores = scoreChunkBytes(b * heads, tokens(l), ctxLen, chunk);
    const layers = cfg.transformer_layers_per_block;
    // stage outputs of every layer stay in the transformer's tidy
    w.block(Math.max(58 * m, 13 * m + 2 * Math.max(selfScores, crossScores)) + 3 * (layers - 1) * m, m, Math.max(8 * m, selfScores));
  };
  const attn = (type: string) => type.startsWith('CrossAttn');
  w.block(ch[0] * perCh(0), ch[0] * perCh(0)); // conv_in
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < cfg.layers_per_block; j++) {
      resnetWork(w, perCh(i), j === 0 ? (i === 0 ? ch[0] : ch[i - 1]) : ch[i], ch[i], true);
      if (attn(cfg.down_block_types[i])) transformer(i, ch[i], cfg.heads[i]);
    }
    if (i < n - 1) w.block(1.6 * ch[i] * perCh(i), ch[i] * perCh(i + 1), ch[i] * perCh(i));
  }
  const top = ch[n - 1];
  resnetWork(w, perCh(n - 1), top, top, true);
  transformer(n - 1, top, cfg.heads[n - 1]);
  resnetWork(w, perCh(n - 1), top, top, true);
  const rc = [...ch].reverse();
  const heads = [...cfg.heads].reverse();
  let prev = rc[0];
  for (let i = 0; i < n; i++) {
    const l = n - 1 - i;
    for (let j = 0; j <= cfg.layers_per_block; j++) {
      const skip = j === cfg.layers_per_block ? rc[Math.min(i + 1, n - 1)] : rc[i];
      const cin = (j === 0 ? prev : rc[i]) + skip;
      w.block(cin * perCh(l), cin * perCh(l)); // the concat is made in the UNet's tidy
      resnetWork(w, perCh(l), cin, rc[i], true);
      if (attn(cfg.up_block_types[i])) transformer(l, rc[i], heads[i]);
    }
    if (i < n - 1) w.block(3.5 * rc[i] * perCh(l - 1), rc[i] * perCh(l - 1), rc[i] * perCh(l - 1));
    prev = rc[i];
  }
  w.block(8 * ch[0] * perCh(0), cfg.out_channels * perCh(0)); // norm, SiLU, conv_out
  return { peak: w.peak, largest: w.largest, total: w.total };
}

/** The VAE's mid block (resnet, single-head self-attention over every latent pixel, resnet) at `tokens` pixels. */
function vaeMid(w: Walk, cfg: VaeConfig, perCh: number, tokens: number, b: number, chunk: number): void {
  const c = cfg.block_out_channels[cfg.block_out_channels.length - 1];
  resnetWork(w, perCh, c, c, false);
  if (cfg.mid_block_add_attention) {
    const scores = scoreChunkBytes(b, tokens, tokens, chunk);
    w.block(16 * c * perCh + 2 * scores, c * perCh, scores);
  }
  resnetWork(w, perCh, c, c, false);
}

/** Peak activation bytes of decoding [b, lh, lw, latent] latents to [b, 8lh, 8lw, 3]. */
export function vaeDecodePeakBytes(cfg: VaeConfig, b: number, lh: number, lw: number, chunk = getAttentionChunkElements()): { peak: number; largest: number } {
  const ch = cfg.block_out_channels;
  const n = ch.length;
  const w = new Walk();
  // level k of the decoder is at the latent size times 2^k
  const perCh = (k: number) => b * lh * lw * 4 ** k * F32;
  const top = ch[n - 1];
  w.block(3 * cfg.latent_channels * perCh(0), cfg.latent_channels * perCh(0)); // scaling, post_quant_conv
  w.block(top * perCh(0), top * perCh(0)); // conv_in
  vaeMid(w, cfg, perCh(0), lh * lw, b, chunk);
  const rc = [...ch].reverse();
  let prev = rc[0];
  for (let i = 0; i < n; i++) {
    for (let j = 0; j <= cfg.layers_per_block; j++) {
      resnetWork(w, perCh(i), j === 0 ? prev : rc[i], rc[i], false);
      prev = rc[i];
    }
    if (i < n - 1) w.block(3.5 * rc[i] * perCh(i + 1), rc[i] * perCh(i + 1), rc[i] * perCh(i + 1));
  }
  // norm, SiLU, conv_out, then the pipeline's /2 + 0.5 and clip to [0, 1]
  w.block(8 * ch[0] * perCh(n - 1) + 4 * cfg.out_channels * perCh(n - 1), cfg.out_channels * perCh(n - 1));
  return { peak: w.peak, largest: w.largest };
}

/** Peak activation bytes of encoding a [b, h, w, 3] image (h, w multiples of 8). */
export function vaeEncodePeakBytes(cfg: VaeConfig, b: number, h: number, wd: number, chunk = getAttentionChunkElements()): { peak: number; largest: number } {
  const ch = cfg.block_out_channels;
  const n = ch.length;
  const w = new Walk();
  const perCh = (k: number) => b * (h / 2 ** k) * (wd / 2 ** k) * F32;
  w.block(ch[0] * perCh(0), ch[0] * perCh(0)); // conv_in
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < cfg.layers_per_block; j++) resnetWork(w, perCh(i), j === 0 ? (i === 0 ? ch[0] : ch[i - 1]) : ch[i], ch[i], false);
    if (i < n - 1) w.block(1.6 * ch[i] * perCh(i), ch[i] * perCh(i + 1), ch[i] * perCh(i));
  }
  vaeMid(w, cfg, perCh(n - 1), (h / 2 ** (n - 1)) * (wd / 2 ** (n - 1)), b, chunk);
  w.block(8 * ch[n - 1] * perCh(n - 1) + 6 * cfg.latent_channels * perCh(n - 1), 2 * cfg.latent_channels * perCh(n - 1));
  return { peak: w.peak, largest: w.largest };
}

/** Peak activation bytes of the text encoder on `chunks` prompts of 77 tokens (upper bound: nothing freed). */
export function clipPeakBytes(cfg: ClipTextConfig, chunks: number): number {
  const t = chunks * CLIP_MAX_LENGTH;
  const perLayer = t * (12 * cfg.hidden_size + 4 * cfg.intermediate_size) + 2 * chunks * cfg.num_attention_heads * CLIP_MAX_LENGTH ** 2;
  return cfg.num_hidden_layers * perLayer * F32;
}

type SamplingModel = Pick<LoadedModel, 'unet' | 'vae' | 'textEncoder'>;

/** Float32 bytes of the loaded networks' weights. */
export function weightsBytes(m: SamplingModel): number {
  let n = 0;
  for (const part of [m.unet, m.vae, m.textEncoder]) if (part) n += countParams(part.params);
  return n * F32;
}

/** Estimate the peak tensor bytes of sampling `s` with model `m` (see the module comment). */
export function estimateSampling(m: SamplingModel, s: SamplingShape, weights = weightsBytes(m)): MemoryEstimate {
  if (!m.unet || !m.vae || !m.textEncoder) throw new SdtuneError('usage', 'a memory estimate for sampling needs unet, vae and text_encoder');
  const b = s.batchSize ?? 1;
  const chunk = s.attentionChunk ?? getAttentionChunkElements();
  const lh = s.height / vaeScaleFactor(m.vae.config);
  const lw = s.width / vaeScaleFactor(m.vae.config);
  const bu = s.cfg ? 2 * b : b;
  const un = unetPeakBytes(m.unet.config, bu, lh, lw, chunk, CLIP_MAX_LENGTH * (s.textChunks ?? 1));
  const dec = vaeDecodePeakBytes(m.vae.config, 1, lh, lw, chunk);
  const enc = s.encode ? vaeEncodePeakBytes(m.vae.config, 1, s.height, s.width, chunk) : { peak: 0, largest: 0 };
  const text = clipPeakBytes(m.textEncoder.config, s.textChunks ?? 1);
  // latents, noise, image latents, mask and up to 4 history tensors of a multi-step sampler, the CFG copy, the
  // inpainting extra channels: 16 latent-sized tensors; the conditioning [2b, 77k, C] twice
  const latent = b * lh * lw * Math.max(m.vae.config.latent_channels, m.unet.config.in_channels) * F32;
  const loop = 16 * latent + 2 * bu * CLIP_MAX_LENGTH * (s.textChunks ?? 1) * m.textEncoder.config.hidden_size * F32;
  const peak = weights + MARGIN * (loop + Math.max(text, un.peak, dec.peak, enc.peak));
  return {
    weightsBytes: weights,
    textBytes: text,
    unetBytes: un.peak,
    vaeDecodeBytes: dec.peak,
    vaeEncodeBytes: enc.peak,
    loopBytes: loop,
    peakBytes: peak,
    largestTensorBytes: Math.max(un.largest, dec.largest, enc.largest),
  };
}

/** "1.23 GB" / "45.6 MB". */
export function fmtBytes(n: number): string {
  if (!Number.isFinite(n)) return 'unlimited';
  if (n >= 1024 ** 4) return `${(n / 1024 ** 4).toFixed(1)} TB`;
  if (n >= 1024 ** 3) return `${(n / 1024 ** 3).toFixed(2)} GB`;
  return `${(n / 1024 ** 2).toFixed(1)} MB`;
}

/** The estimate on this backend: plus the copies of the weights it keeps besides the tensors (wasm's packed ones). */
const onBackend = (e: MemoryEstimate, budget: MemoryBudget) => e.peakBytes + (budget.weightCopies - 1) * e.weightsBytes;
const fits = (e: MemoryEstimate, budget: MemoryBudget) => onBackend(e, budget) <= budget.bytes && e.largestTensorBytes <= budget.maxTensorBytes;

/** Width/height (those given) within [8, MAX_IMAGE_SIDE] and multiples of 8: checked before any estimate or allocation. */
export function checkImageSize(width: number | undefined, height: number | undefined): void {
  for (const [k, v] of [['width', width], ['height', height]] as const) {
    if (v === undefined) continue;
    if (!Number.isInteger(v) || v < VAE_SCALE || v > MAX_IMAGE_SIDE || v % VAE_SCALE !== 0) {
      throw new SdtuneError('usage', `${k} must be a multiple of ${VAE_SCALE} from ${VAE_SCALE} to ${MAX_IMAGE_SIDE}, got ${v}`);
    }
  }
}

/**
 * Estimate sampling `s` and refuse it, before any work, when it cannot fit the backend's memory: the error names the
 * size, the estimate, the budget, the largest square size that fits at this batch size and the batch size that
 * fits at this size. Returns the estimate and the budget when it fits.
 */
export function assertSamplingFits(
  m: SamplingModel,
  s: SamplingShape,
  budget: MemoryBudget = memoryBudget(weightsBytes(m)),
): { estimate: MemoryEstimate; budget: MemoryBudget; onBackend: number } {
  checkImageSize(s.width, s.height);
  const weights = weightsBytes(m);
  const e = estimateSampling(m, s, weights);
  if (fits(e, budget)) return { estimate: e, budget, onBackend: onBackend(e, budget) };
  const b = s.batchSize ?? 1;
  const at = (side: number, batch: number) => estimateSampling(m, { ...s, width: side, height: side, batchSize: batch }, weights);
  // the largest square side (a multiple of 8) that fits at this batch: the estimate grows with the side
  let lo = 0;
  let hi = Math.min(MAX_IMAGE_SIDE, Math.max(s.width, s.height)) / VAE_SCALE;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (fits(at(mid * VAE_SCALE, b), budget)) lo = mid;
    else hi = mid - 1;
  }
  let bLo = 0;
  let bHi = b;
  while (bLo < bHi) {
    const mid = Math.ceil((bLo + bHi) / 2);
    if (fits(estimateSampling(m, { ...s, batchSize: mid }, weights), budget)) bLo = mid;
    else bHi = mid - 1;
  }
  const what = `${s.width}x${s.height}, batch ${b}${s.cfg ? ' with guidance' : ''}`;
  const copies = budget.weightCopies > 1 ? ` x ${budget.weightCopies} with the backend's packed copy` : '';
  const need =
    onBackend(e, budget) > budget.bytes
      ? `needs an estimated ${fmtBytes(onBackend(e, budget))} (weights ${fmtBytes(e.weightsBytes)}${copies}, activations ${fmtBytes(e.peakBytes - e.weightsBytes)}) but ${budget.what} allows ${fmtBytes(budget.bytes)}`
      : `needs a ${fmtBytes(e.largestTensorBytes)} tensor but ${budget.what} binds at most ${fmtBytes(budget.maxTensorBytes)} per tensor`;
  const square = lo > 0 ? `the largest square size that fits at batch ${b} is ${lo * VAE_SCALE}x${lo * VAE_SCALE}` : `no size fits at batch ${b}`;
  const batch = bLo > 0 ? `at ${s.width}x${s.height} a batch of ${bLo} fits` : `no batch size fits at ${s.width}x${s.height}`;
  throw new SdtuneError('usage', `${what} ${need}; ${square}; ${batch}`);
}

/**
 * A floor on the tensor bytes of one training step at `resolution` [w, h] and `batchSize`: the weights plus every
 * UNet block's working set added up (the gradient tape keeps each op's inputs until the backward pass), or with
 * gradient checkpointing the UNet's inference peak (it still holds every block output). Measured steps hold more
 * (~4x the plain floor: gradients, the text encoder, the optimizer; tiny model and SD v1 shapes, README), so this
 * only refuses what certainly cannot fit.
 */
export function trainingFloorBytes(m: Pick<LoadedModel, 'unet' | 'vae' | 'textEncoder'>, resolution: readonly [number, number], batchSize: number, gradientCheckpointing: boolean): number {
  if (!m.unet) throw new SdtuneError('usage', 'a memory estimate for training needs a unet');
  const f = vaeScaleFactor(m.vae?.config);
  const u = unetPeakBytes(m.unet.config, batchSize, Math.ceil(resolution[1] / f), Math.ceil(resolution[0] / f));
  return weightsBytes(m) + (gradientCheckpointing ? u.peak : u.total);
}

/** Refuse a training size whose floor (trainingFloorBytes) exceeds the backend's budget, before the first step. */
export function assertTrainingFits(
  m: Pick<LoadedModel, 'unet' | 'vae' | 'textEncoder'>,
  resolution: readonly [number, number],
  batchSize: number,
  gradientCheckpointing: boolean,
  budget: MemoryBudget = memoryBudget(weightsBytes(m)),
): void {
  const need = trainingFloorBytes(m, resolution, batchSize, gradientCheckpointing) + (budget.weightCopies - 1) * weightsBytes(m);
  if (need <= budget.bytes) return;
  throw new SdtuneError(
    'usage',
    `training at ${resolution[0]}x${resolution[1]}, batch ${batchSize} needs at least ${fmtBytes(need)} (weights and the UNet's activations under the gradient tape) ` +
      `but ${budget.what} allows ${fmtBytes(budget.bytes)}; lower data.resolution or train.batch_size${gradientCheckpointing ? '' : ', or set train.gradient_checkpointing'}`,
  );
}
