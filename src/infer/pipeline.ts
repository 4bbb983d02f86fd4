/**
 * The one sampling path: txt2img, img2img and inpainting with any of the eight samplers and classifier-free
 * guidance, following diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline step by step (noise draw order included),
 * with A1111's seed convention for batches (image i uses its own torch generator seeded seed + i, so batch size 1
 * equals diffusers with generator=torch.manual_seed(seed)).
 */
import * as tf from '@tensorflow/tfjs';
import { SdtuneError, usageError } from '../errors.js';
import type { LoadedModel } from '../io/model.js';
import { vaeScaleFactor } from '../models/configs.js';
import type { ContextAdapter } from '../models/layers.js';
import { unet } from '../models/unet.js';
import { vaeDecode, vaeEncode } from '../models/vae.js';
import { TorchGenerator, randnNHWC, randomSeed } from '../runtime/rng.js';
import {
  type SamplerName,
  type SamplerPlan,
  addNoiseForPlan,
  disposeState,
  initialState,
  planSampler,
  samplerFromConfig,
  scaleModelInput,
  step,
  truncateForStrength,
} from '../schedulers/index.js';
import { type MemoryEstimate, assertSamplingFits, checkImageSize } from './budget.js';
import { type DepthMap, depthCondition } from './depth.js';
import { parseExtraNetworks } from '../tokenizer/prompt-schedule.js';
import { PromptConditioning } from './prompt-schedule.js';

/** An RGB image, values in [0,1], row-major [height, width, 3]. */
export interface RgbImage {
  data: Float32Array;
  width: number;
  height: number;
}

/** Defaults of generate() and sampleToFiles() (diffusers' pipelines use 50 steps; A1111 and we use 30). */
export const DEFAULT_STEPS = 30;
export const DEFAULT_CFG = 7.5;

export interface GenerateOptions {
  /**
   * A1111 syntax: emphasis `(a:1.2)`, `BREAK`, prompt editing `[from:to:when]`, alternation `[a|b]`, `AND` with
   * `:weight` (infer/prompt-schedule.ts). Extra-network tags (`<lora:...>`) are refused here: sampleToFiles resolves them.
   */
  prompt: string;
  negativePrompt?: string;
  /** default: the model's scheduler config */
  sampler?: SamplerName;
  /** default 30 */
  steps?: number;
  /** classifier-free guidance scale; 1 skips the unconditional pass. Default 7.5 */
  cfg?: number;
  /** multiples of 8; default: the init image's size, else the UNet's sample_size x 8 */
  width?: number;
  height?: number;
  /** image i of the batch uses seed + i; default (or -1): random */
  seed?: number;
  batchSize?: number;
  /** A1111 CLIP skip (1 = last layer) */
  clipSkip?: number;
  /** DDIM eta */
  eta?: number;
  /** img2img / inpaint source image */
  initImage?: RgbImage;
  /** 0..1, how much of the schedule to run from the noised init image (img2img default 0.75, inpaint 1.0) */
  strength?: number;
  /** inpainting mask, same size as initImage; white (>= 0.5) = repaint. Values read from the first channel. */
  mask?: RgbImage;
  /** depth-to-image (a 5-channel depth UNet, with initImage): near = bright, any size (resized to the latents) */
  depthMap?: DepthMap;
  /** the depth map has near = dark: flip it */
  depthInvert?: boolean;
  /** called after each sampler step with the current latents (NHWC) */
  onStep?: (i: number, total: number, latents: tf.Tensor4D) => void;
  /** supply generators instead of seeding them (one per image) */
  generators?: TorchGenerator[];
  /** called before the VAE decodes image `index` of `count` */
  onDecode?: (index: number, count: number) => void;
  /** refuse sizes whose estimated memory exceeds the backend's budget (infer/budget.ts); default true */
  memoryCheck?: boolean;
  /** adapts every attention's context before to_k / to_v (hypernetworks: adapters/hypernetwork.ts hypernetworkAdapter) */
  context?: ContextAdapter;
}

/** GenerateOptions with every default filled in. */
export type ResolvedGenerateOptions = GenerateOptions & Required<Pick<GenerateOptions, 'sampler' | 'steps' | 'cfg' | 'width' | 'height' | 'seed' | 'batchSize'>>;

/** Fill generate()'s defaults (see GenerateOptions): what sampleToFiles writes into the PNG text too. */
export function resolveGenerateOptions(m: LoadedModel, o: GenerateOptions): ResolvedGenerateOptions {
  const side = (m.unet?.config.sample_size ?? 64) * vaeScaleFactor(m.vae?.config);
  return {
    ...o,
    sampler: o.sampler ?? samplerFromConfig(m.schedulerConfig),
    steps: o.steps ?? DEFAULT_STEPS,
    cfg: o.cfg ?? DEFAULT_CFG,
    width: o.width ?? o.initImage?.width ?? side,
    height: o.height ?? o.initImage?.height ?? side,
    seed: o.seed === undefined || o.seed === -1 ? randomSeed() : o.seed,
    batchSize: o.batchSize ?? 1,
  };
}

export interface GenerateResult {
  images: RgbImage[];
  seeds: number[];
  /** the model timesteps actually used, in order */
  timesteps: number[];
  /** the memory estimate the size was checked against (absent with memoryCheck: false) */
  memory?: MemoryEstimate;
}

/**
 * Validate sizes and options before any work (clear errors, never a silent fix). Messages name the options as
 * GenerateOptions spells them (the CLI's flags are the same words in kebab case).
 */
function validate(m: LoadedModel, o: ResolvedGenerateOptions): void {
  if (!m.unet || !m.vae || !m.textEncoder || !m.tokenizer) throw usageError(`${m.path}: sampling needs unet, vae, text_encoder and tokenizer`);
  checkImageSize(o.width, o.height);
  if (!(o.cfg >= 0 && Number.isFinite(o.cfg))) throw usageError(`cfg must be a number >= 0, got ${o.cfg}`);
  const bs = o.batchSize;
  if (!Number.isInteger(bs) || bs < 1) throw usageError(`batchSize must be a positive integer, got ${bs}`);
  if (o.generators && o.generators.length !== bs) throw usageError(`${o.generators.length} generators for a batch of ${bs}`);
  if (o.mask && !o.initImage) throw usageError('a mask needs an initImage');
  const tags = parseExtraNetworks(o.prompt).tags;
  if (tags.length) throw usageError(`prompt: ${tags[0]!.text} is an extra-network tag; generate() does not load files (sampleToFiles resolves tags from loraDir / hypernetworkDir)`);
  for (const img of [o.initImage, o.mask]) {
    if (img && (img.width !== o.width || img.height !== o.height)) {
      throw usageError(`image is ${img.width}x${img.height} but the output size is ${o.width}x${o.height}; resize the image or leave width and height unset`);
    }
  }
  const inCh = m.unet.config.in_channels;
  if (inCh === 9 && !o.mask) throw usageError(`${m.path} is an inpainting model (9 input channels): it needs an initImage and a mask`);
  if (inCh === 5 && (!o.depthMap || !o.initImage || o.mask))
    throw usageError(`${m.path} is a depth-to-image model (5 input channels: latents + depth): it needs an initImage and a depthMap${o.mask ? ', and no mask' : ''}`);
  if (o.depthMap && inCh !== 5) throw usageError(`a depthMap needs a depth-to-image model (UNet with 5 input channels, e.g. stable-diffusion-2-depth); ${m.path} has ${inCh}`);
  if (inCh !== 4 && inCh !== 9 && inCh !== 5) throw new SdtuneError('unsupported', `UNet with ${inCh} input channels (only 4, 5 or 9)`);
  if (o.strength !== undefined && !(o.strength > 0 && o.strength <= 1)) throw usageError(`strength must be in (0, 1], got ${o.strength}`);
}

/** An [H,W,3] image in [0,1] -> [1,H,W,3] in [-1,1] (diffusers VaeImageProcessor normalize). */
const toModelRange = (img: RgbImage) => tf.tidy(() => tf.sub(tf.mul(tf.tensor4d(img.data, [1, img.height, img.width, 3]), 2), 1) as tf.Tensor4D);

/** One NCHW-ordered torch draw per image from its own generator, as an NHWC batch. */
const drawNoise = (gens: TorchGenerator[], shape: [number, number, number, number]) =>
  tf.tidy(() => tf.concat(gens.map((g) => randnNHWC(g, shape)), 0) as tf.Tensor4D);

/** Latents of an image: scaling_factor * (mean + std * noise), noise drawn from each image's generator (latent_dist.sample). */
function encodeImage(m: LoadedModel, image: tf.Tensor4D, gens: TorchGenerator[]): tf.Tensor4D {
  const vae = m.vae!;
  return tf.tidy(() => {
    const d = vaeEncode(vae.params, vae.config, image);
    const [, h, w, c] = d.mean.shape;
    const noise = drawNoise(gens, [1, c, h, w]);
    return tf.mul(tf.add(d.mean, tf.mul(d.std, noise)), vae.config.scaling_factor) as tf.Tensor4D;
  });
}

/** Run the sampler loop and decode; see the module comment. Only `prompt` is required (defaults: GenerateOptions). */
export async function generate(m: LoadedModel, options: GenerateOptions): Promise<GenerateResult> {
  const o = resolveGenerateOptions(m, options);
  validate(m, o);
  const un = m.unet!;
  const vae = m.vae!;
  const b = o.batchSize;
  const seeds = Array.from({ length: b }, (_, i) => o.seed + i);
  const gens = o.generators ?? seeds.map((s) => new TorchGenerator(s));
  const f = vaeScaleFactor(vae.config);
  const lat: [number, number, number, number] = [1, vae.config.latent_channels, o.height / f, o.width / f];
  const inpaint9 = un.config.in_channels === 9;
  // depth-to-image: the normalised depth at latent size (the 5th input channel of every image and CFG half)
  const depth = o.depthMap && depthCondition(o.depthMap, lat[3], lat[2], { invert: o.depthInvert });
  const owned: tf.Tensor[] = [];
  const keep = <T extends tf.Tensor>(t: T) => (owned.push(t), t);
  let text: PromptConditioning | undefined;
  try {
    // 1. text conditioning: every distinct text of the prompt's schedule (prompt editing, alternation, AND) encoded
    // once; the UNet rows per image are [uncond, cond_1, ..., cond_k] (uncond first, as diffusers)
    text = new PromptConditioning(m.textEncoder!, m.tokenizer!, { prompt: o.prompt, negativePrompt: o.negativePrompt, steps: o.steps, clipSkip: o.clipSkip, cfg: o.cfg });
    const rows = text.rows;
    // the size against the backend's memory, before the UNet and the VAE allocate anything at it
    const memory =
      o.memoryCheck === false
        ? undefined
        : assertSamplingFits(m, { width: o.width, height: o.height, batchSize: b * Math.ceil(rows / 2), cfg: rows > 1, encode: Boolean(o.initImage), textChunks: text.maxChunks }).estimate;
    // 2. timesteps (img2img / inpaint with strength < 1 run only the end of the schedule)
    let plan: SamplerPlan = planSampler(o.sampler, m.schedulerConfig, o.steps, { eta: o.eta });
    const strength = o.strength ?? (o.initImage && !o.mask ? 0.75 : 1);
    const fromImage = Boolean(o.initImage) && strength < 1;
    if (o.initImage && strength < 1) plan = truncateForStrength(plan, strength).plan;
    // 3. initial latents, drawing noise in diffusers' order for each pipeline
    const image = o.initImage ? keep(toModelRange(o.initImage)) : undefined;
    let imageLatents: tf.Tensor4D | undefined;
    let latents: tf.Tensor4D;
    let noise: tf.Tensor4D | undefined;
    if (!o.mask) {
      if (image) {
        imageLatents = keep(encodeImage(m, image, gens)); // draw 1: latent_dist.sample
        noise = keep(drawNoise(gens, lat)); // draw 2
        latents = addNoiseForPlan(plan, imageLatents, noise) as tf.Tensor4D;
      } else {
        latents = tf.tidy(() => tf.mul(drawNoise(gens, lat), plan.initNoiseSigma) as tf.Tensor4D);
      }
    } else {
      // StableDiffusionInpaintPipeline.prepare_latents: the image is encoded first when a 4-channel UNet needs it
      // for blending or when strength < 1; then the noise; then prepare_mask_latents encodes the masked image
      if (!inpaint9 || fromImage) imageLatents = keep(encodeImage(m, image!, gens));
      noise = keep(drawNoise(gens, lat));
      latents = fromImage
        ? (addNoiseForPlan(plan, imageLatents!, noise) as tf.Tensor4D)
        : (tf.mul(noise, plan.initNoiseSigma) as tf.Tensor4D);
    }
    // inpainting conditioning: binarised mask (1 = repaint) at latent size and the masked image's latents
    let maskLat: tf.Tensor4D | undefined;
    let maskedLatents: tf.Tensor4D | undefined;
    if (o.mask) {
      const mk = o.mask;
      const maskFull = keep(
        tf.tidy(() => {
          const first = tf.tensor3d(mk.data, [mk.height, mk.width, 3]).slice([0, 0, 0], [-1, -1, 1]);
          return tf.cast(tf.greaterEqual(first, 0.5), 'float32').reshape([1, mk.height, mk.width, 1]) as tf.Tensor4D;
        }),
      );
      maskLat = keep(tf.image.resizeNearestNeighbor(maskFull, [lat[2], lat[3]]));
      const maskedImage = keep(tf.tidy(() => tf.mul(image!, tf.sub(1, maskFull)) as tf.Tensor4D));
      maskedLatents = keep(encodeImage(m, maskedImage, gens)); // last draw of the inpaint pipeline
    }
    const unetExtra = depth
      ? keep(tf.tidy(() => tf.tile(tf.tensor4d(depth, [1, lat[2], lat[3], 1]), [rows * b, 1, 1, 1]) as tf.Tensor4D))
      : inpaint9
      ? keep(
          tf.tidy(() => {
            const ml = tf.tile(maskLat!, [b, 1, 1, 1]);
            const mi = maskedLatents!.shape[0] === b ? maskedLatents! : tf.tile(maskedLatents!, [b, 1, 1, 1]);
            const one = tf.concat([ml, mi], 3);
            return rows > 1 ? tf.concat(Array.from({ length: rows }, () => one), 0) : one;
          }),
        )
      : undefined;
    // 4. the loop
    let state = initialState(plan);
    const n = plan.timesteps.length;
    const stepNoise = () => drawNoise(gens, lat);
    for (let i = 0; i < n; i++) {
      const t = plan.timesteps[i];
      const { ctx, weights } = text.at(i, b); // the schedule's texts at this step (encoded before the loop)
      const eps = tf.tidy(() => {
        const x = rows > 1 ? tf.concat(Array.from({ length: rows }, () => latents), 0) : latents;
        let inp = scaleModelInput(plan, state, x, i) as tf.Tensor4D;
        if (unetExtra) inp = tf.concat([inp, unetExtra], 3);
        return text!.combine(unet(un.params, un.config, inp, t, ctx, { context: o.context }), weights, o.cfg);
      });
      const r = step(plan, state, eps, i, latents, stepNoise);
      eps.dispose();
      r.predOriginal.dispose();
      disposeState(state);
      state = r.state;
      latents.dispose();
      latents = r.prevSample as tf.Tensor4D;
      if (o.mask && !inpaint9) {
        // regular model: keep the known region from the source image, noised to the next step's level (diffusers)
        const next = tf.tidy(() => {
          const known = i < n - 1 ? addNoiseForPlan(plan, imageLatents!, noise!, i + 1) : imageLatents!;
          const mk = tf.tile(maskLat!, [b, 1, 1, 1]);
          return tf.add(tf.mul(tf.sub(1, mk), known), tf.mul(mk, latents)) as tf.Tensor4D;
        });
        latents.dispose();
        latents = next;
      }
      // wait for the step's result: on a GPU backend work is queued, and progress must count finished steps
      await latents.data();
      o.onStep?.(i, n, latents);
    }
    disposeState(state);
    // 5. decode one image at a time
    const images: RgbImage[] = [];
    for (let k = 0; k < b; k++) {
      o.onDecode?.(k, b);
      const data = tf.tidy(() => {
        const z = tf.div(latents.slice([k, 0, 0, 0], [1, -1, -1, -1]), vae.config.scaling_factor) as tf.Tensor4D;
        return tf.clipByValue(tf.add(tf.div(vaeDecode(vae.params, vae.config, z), 2), 0.5), 0, 1);
      });
      images.push({ data: (await data.data()) as Float32Array, width: o.width, height: o.height });
      data.dispose();
    }
    latents.dispose();
    return { images, seeds, timesteps: Array.from(plan.timesteps), memory };
  } finally {
    text?.dispose();
    tf.dispose(owned);
  }
}

/** [0,1] floats -> uint8 exactly as diffusers' numpy_to_pil: (x * 255).round() with numpy's round-half-to-even. */
export function toUint8(img: RgbImage): Uint8Array {
  const out = new Uint8Array(img.data.length);
  for (let i = 0; i < out.length; i++) {
    const v = Math.fround(img.data[i] * 255); // numpy multiplies in float32
    let r = Math.round(v);
    if (r - v === 0.5 && r % 2 === 1) r -= 1; // tie: round to even
    out[i] = r;
  }
  return out;
}
