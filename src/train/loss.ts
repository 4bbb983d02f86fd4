/**
 * The diffusion training objective shared by every recipe: DDPM forward noising with the same schedule module the
 * samplers use, epsilon or v target, per-sample MSE, optional min-SNR-gamma weighting (Hang et al. 2023, as
 * diffusers' train_text_to_image compute_snr); per item, for the recipe to reduce (default: the mean over the batch).
 */
import * as tf from '@tensorflow/tfjs';
import type { UNetConfig } from '../models/configs.js';
import type { Forward } from '../models/layers.js';
import type { ParamTree } from '../models/params.js';
import { type UNetOptions, unet } from '../models/unet.js';
import { type Schedule, addNoise, snr, velocity } from '../schedulers/index.js';

export type PredictionType = 'epsilon' | 'v_prediction';

export interface DiffusionBatch {
  /** clean latents, already scaled by the VAE scaling factor, NHWC */
  latents: tf.Tensor4D;
  noise: tf.Tensor4D;
  /** one integer timestep per item */
  timesteps: Int32Array;
  /** text conditioning [B, L, C] */
  context: tf.Tensor3D;
}

export interface LossOptions {
  predictionType: PredictionType;
  /** min-SNR gamma; undefined/null = plain mean */
  minSnrGamma?: number | null;
  /** recompute UNet blocks in the backward pass instead of keeping their activations (train.gradient_checkpointing) */
  gradientCheckpointing?: UNetOptions['gradientCheckpointing'];
  /**
   * the UNet forward's training options: `training` + `rng` for dropout (LoRA's `loraDropout`, a hypernetwork's),
   * `context` for a hypernetwork being trained (adapters/hypernetwork.ts hypernetworkAdapter)
   */
  forward?: Forward;
}

/** Per-item loss weights of min-SNR-gamma: min(snr, gamma) / snr for epsilon, / (snr + 1) for v-prediction. */
export function minSnrWeights(schedule: Schedule, timesteps: Int32Array, gamma: number, pred: PredictionType): tf.Tensor1D {
  return tf.tidy(() => {
    const s = snr(schedule, Array.from(timesteps));
    const m = tf.minimum(s, gamma);
    return (pred === 'epsilon' ? tf.div(m, s) : tf.div(m, tf.add(s, 1))) as tf.Tensor1D;
  });
}

/** Per-item training losses [B] of the UNet on a batch: each item's MSE, times its min-SNR-gamma weight when set
 *  (runs inside the caller's gradient tape; returns only the [B] tensor, for a recipe to reduce). */
export function diffusionLossPerItem(unetParams: ParamTree, cfg: UNetConfig, schedule: Schedule, b: DiffusionBatch, o: LossOptions): tf.Tensor1D {
  return tf.tidy(() => {
    const t = Array.from(b.timesteps);
    const noisy = addNoise(schedule, b.latents, b.noise, t) as tf.Tensor4D;
    const pred = unet(unetParams, cfg, noisy, tf.tensor1d(b.timesteps, 'int32'), b.context, { ...o.forward, gradientCheckpointing: o.gradientCheckpointing });
    const target = o.predictionType === 'epsilon' ? b.noise : velocity(schedule, b.latents, b.noise, t);
    const perItem = tf.mean(tf.square(tf.sub(pred, target)), [1, 2, 3]) as tf.Tensor1D;
    if (o.minSnrGamma == null) return perItem;
    return tf.mul(perItem, minSnrWeights(schedule, b.timesteps, o.minSnrGamma, o.predictionType)) as tf.Tensor1D;
  });
}

/** Scalar training loss of the UNet on a batch: the mean of diffusionLossPerItem (runs inside the caller's tape). */
export function diffusionLoss(unetParams: ParamTree, cfg: UNetConfig, schedule: Schedule, b: DiffusionBatch, o: LossOptions): tf.Scalar {
  return tf.tidy(() => tf.mean(diffusionLossPerItem(unetParams, cfg, schedule, b, o)) as tf.Scalar);
}
