/**
 * The shared noise schedule of the diffusers schedulers, as plain data and pure functions (spec samplers.md §1):
 * scheduler_config.json parsing with diffusers field names and each class's defaults, betas -> alphas_cumprod
 * bit-exactly as torch computes them, the k-diffusion sigma table, timestep spacings, Karras sigmas, and the
 * training side (addNoise, velocity, snr) on the very same tables so that training and sampling cannot drift.
 * Scalar coefficients are rounded to float32 the way torch's 0-d float32 tensors round them (`f32`).
 */
import * as tf from '@tensorflow/tfjs';
import { z } from 'zod';
import { SdtuneError, usageError } from '../errors.js';

/** Round to float32 (torch float32 scalar arithmetic). */
export const f32 = Math.fround;

export type SamplerName = 'ddim' | 'pndm' | 'lms' | 'euler' | 'euler_a' | 'dpmpp_2m' | 'dpmpp_2m_karras' | 'ddpm';
export type SchedulerClass =
  | 'DDIMScheduler' | 'PNDMScheduler' | 'LMSDiscreteScheduler' | 'EulerDiscreteScheduler'
  | 'EulerAncestralDiscreteScheduler' | 'DPMSolverMultistepScheduler' | 'DDPMScheduler';
export type Spacing = 'leading' | 'linspace' | 'trailing';
export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';

/** The scheduler_config.json of SD v1.x (a PNDMScheduler config; spec §1.1), for models that ship none. */
export const SD_V1_SCHEDULER_CONFIG: Readonly<Record<string, unknown>> = Object.freeze({
  _class_name: 'PNDMScheduler', num_train_timesteps: 1000, beta_start: 0.00085, beta_end: 0.012,
  beta_schedule: 'scaled_linear', steps_offset: 1, set_alpha_to_one: false, skip_prk_steps: true,
  clip_sample: false, prediction_type: 'epsilon', trained_betas: null,
});

/** A scheduler config resolved for one diffusers class (missing keys take that class's __init__ default). */
export interface ScheduleConfig {
  cls: SchedulerClass;
  numTrainTimesteps: number;
  betaStart: number;
  betaEnd: number;
  betaSchedule: 'linear' | 'scaled_linear' | 'squaredcos_cap_v2';
  trainedBetas: number[] | null;
  predictionType: PredictionType;
  stepsOffset: number;
  timestepSpacing: Spacing;
  /** DDIM/PNDM: alphas_cumprod "before" t=0 is 1 (else ac[0]) */
  setAlphaToOne: boolean;
  /** DDIM/DDPM: clamp the x0 prediction to ±clipSampleRange */
  clipSample: boolean;
  clipSampleRange: number;
  /** LMS/Euler/DPM-Solver */
  useKarrasSigmas: boolean;
  sigmaMin: number | null;
  sigmaMax: number | null;
  /** Euler/DPM-Solver: the sigma after the last step */
  finalSigmasType: 'zero' | 'sigma_min';
  /** DPM-Solver */
  lowerOrderFinal: boolean;
  eulerAtFinal: boolean;
  solverType: 'midpoint' | 'heun';
  /** DDPM */
  varianceType: 'fixed_small' | 'fixed_small_log' | 'fixed_large';
}

const CLASS_DEFAULT_SPACING: Record<SchedulerClass, Spacing> = {
  DDIMScheduler: 'leading', PNDMScheduler: 'leading', DDPMScheduler: 'leading', LMSDiscreteScheduler: 'linspace',
  EulerDiscreteScheduler: 'linspace', EulerAncestralDiscreteScheduler: 'linspace', DPMSolverMultistepScheduler: 'linspace',
};

const unsupported = (msg: string) => new SdtuneError('unsupported', `scheduler config: ${msg}`);
const bad = (key: string, v: unknown, want: string) =>
  new SdtuneError('format', `scheduler config: ${key} = ${JSON.stringify(v)} (expected ${want})`);

// ---- scheduler_config.json fields: one declaration each (type, range, default); unknown keys are ignored ----
// `want` is the wording of the error; a field without a default takes its class's default below.
const field = <T extends z.ZodType>(t: T, want: string) => t.meta({ want });
const finite = () => z.number();
const FIELDS = z.object({
  num_train_timesteps: field(z.number().int().min(2).default(1000), 'an integer >= 2'),
  beta_start: field(finite().default(0.0001), 'a number'),
  beta_end: field(finite().default(0.02), 'a number'),
  beta_schedule: field(z.enum(['linear', 'scaled_linear', 'squaredcos_cap_v2']).default('linear'), 'linear | scaled_linear | squaredcos_cap_v2'),
  trained_betas: field(z.array(z.number()).nullable().default(null), 'a list of numbers or null'),
  prediction_type: field(z.enum(['epsilon', 'v_prediction', 'sample']).default('epsilon'), 'epsilon | v_prediction | sample'),
  steps_offset: field(z.number().int().min(0).default(0), 'an integer >= 0'),
  timestep_spacing: field(z.enum(['leading', 'linspace', 'trailing']).optional(), 'leading | linspace | trailing'),
  set_alpha_to_one: field(z.boolean().optional(), 'true or false'),
  clip_sample: field(z.boolean().default(true), 'true or false'),
  clip_sample_range: field(finite().default(1), 'a number'),
  use_karras_sigmas: field(z.boolean().default(false), 'true or false'),
  sigma_min: field(finite().nullable().default(null), 'a number'),
  sigma_max: field(finite().nullable().default(null), 'a number'),
  final_sigmas_type: field(z.enum(['zero', 'sigma_min']).default('zero'), 'zero | sigma_min'),
  lower_order_final: field(z.boolean().default(true), 'true or false'),
  euler_at_final: field(z.boolean().default(false), 'true or false'),
  solver_type: field(z.enum(['midpoint', 'heun']).default('midpoint'), 'midpoint | heun'),
  variance_type: field(z.enum(['fixed_small', 'fixed_small_log', 'fixed_large']).default('fixed_small'), 'fixed_small | fixed_small_log | fixed_large'),
});
/** Fields only some classes read (diffusers' configs carry other classes' keys: those are not checked). */
const ONLY_FOR: Partial<Record<keyof z.infer<typeof FIELDS>, readonly SchedulerClass[]>> = {
  clip_sample: ['DDIMScheduler', 'DDPMScheduler'],
  sigma_min: ['EulerDiscreteScheduler'],
  sigma_max: ['EulerDiscreteScheduler'],
  variance_type: ['DDPMScheduler'],
};
/** Features diffusers offers that these samplers do not implement: refused instead of computing something else. */
const NOT_IMPLEMENTED = ['thresholding', 'rescale_betas_zero_snr', 'use_exponential_sigmas', 'use_beta_sigmas', 'use_lu_lambdas', 'use_flow_sigmas', 'use_dynamic_shifting'];

/** Parse a diffusers scheduler_config.json for class `cls` (unknown keys ignored; unimplemented features refused). */
export function parseScheduleConfig(raw: Record<string, unknown>, cls: SchedulerClass): ScheduleConfig {
  for (const k of NOT_IMPLEMENTED) if (raw[k] === true) throw unsupported(`${k} = true is not implemented`);
  if ((raw.interpolation_type ?? 'linear') !== 'linear') throw unsupported(`interpolation_type ${JSON.stringify(raw.interpolation_type)}`);
  if ((raw.timestep_type ?? 'discrete') !== 'discrete') throw unsupported(`timestep_type ${JSON.stringify(raw.timestep_type)}`);
  const lmc = raw.lambda_min_clipped;
  if (lmc != null && lmc !== '-inf' && lmc !== -Infinity) throw unsupported(`lambda_min_clipped ${JSON.stringify(lmc)}`);

  // the fields this class reads, as given (null = the default for the non-nullable ones, as diffusers reads them)
  const given: Record<string, unknown> = {};
  for (const [k, f] of Object.entries(FIELDS.shape)) {
    const only = ONLY_FOR[k as keyof typeof ONLY_FOR];
    if (only && !only.includes(cls)) continue;
    if (raw[k] === undefined || (raw[k] === null && !f.safeParse(null).success)) continue;
    given[k] = raw[k];
  }
  const r = FIELDS.safeParse(given);
  if (!r.success) {
    const key = String(r.error.issues[0]!.path[0]);
    throw bad(key, raw[key], (FIELDS.shape[key as keyof typeof FIELDS.shape].meta()?.want as string) ?? 'a valid value');
  }
  const f = r.data;
  const isDdimLike = cls === 'DDIMScheduler' || cls === 'DDPMScheduler';
  const cfg: ScheduleConfig = {
    cls,
    numTrainTimesteps: f.num_train_timesteps,
    betaStart: f.beta_start,
    betaEnd: f.beta_end,
    betaSchedule: f.beta_schedule,
    trainedBetas: f.trained_betas,
    predictionType: f.prediction_type,
    stepsOffset: f.steps_offset,
    timestepSpacing: f.timestep_spacing ?? CLASS_DEFAULT_SPACING[cls],
    setAlphaToOne: f.set_alpha_to_one ?? cls === 'DDIMScheduler',
    clipSample: isDdimLike && f.clip_sample,
    clipSampleRange: f.clip_sample_range,
    useKarrasSigmas: f.use_karras_sigmas,
    sigmaMin: cls === 'EulerDiscreteScheduler' ? f.sigma_min : null,
    sigmaMax: cls === 'EulerDiscreteScheduler' ? f.sigma_max : null,
    finalSigmasType: f.final_sigmas_type,
    lowerOrderFinal: f.lower_order_final,
    eulerAtFinal: f.euler_at_final,
    solverType: f.solver_type,
    varianceType: cls === 'DDPMScheduler' ? f.variance_type : 'fixed_small',
  };
  if (cfg.trainedBetas && cfg.trainedBetas.length !== cfg.numTrainTimesteps)
    throw bad('trained_betas', `${cfg.trainedBetas.length} values`, `num_train_timesteps = ${cfg.numTrainTimesteps} values`);
  return cfg;
}

/** The tables of one schedule: betas, alphas_cumprod, the k-diffusion sigma table (all float32, index = train timestep). */
export interface Schedule {
  readonly config: ScheduleConfig;
  readonly betas: Float32Array;
  readonly alphasCumprod: Float32Array;
  /** sqrt(ac) and sqrt(1 - ac), as torch computes them in add_noise / get_velocity */
  readonly sqrtAlphasCumprod: Float32Array;
  readonly sqrtOneMinusAlphasCumprod: Float32Array;
  /** sigma(t) = sqrt((1 - ac) / ac) and its float32 log (for sigma -> t) */
  readonly sigmaTable: Float32Array;
  readonly logSigmas: Float32Array;
}

/** torch.linspace(start, end, n, dtype=float32) on CPU: one rounding per element, second half counted back from end (§1.2). */
function torchLinspaceF32(start: number, end: number, n: number): Float32Array {
  const a = f32(start), b = f32(end), step = f32(f32(b - a) / (n - 1)), half = Math.floor(n / 2);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = i < half ? a + step * i : b - step * (n - 1 - i);
  return out;
}

/** betas_for_alpha_bar (cosine, max_beta 0.999) of diffusers, float64 then float32. */
function cosineBetas(n: number): Float32Array {
  const abar = (t: number) => Math.cos(((t + 0.008) / 1.008) * Math.PI / 2) ** 2;
  return Float32Array.from({ length: n }, (_, i) => Math.min(1 - abar((i + 1) / n) / abar(i / n), 0.999));
}

/** Build the schedule tables (diffusers scheduler __init__; bit-exact alphas_cumprod per spec §1.2, sigmas §1.3). */
export function makeSchedule(config: ScheduleConfig): Schedule {
  const n = config.numTrainTimesteps;
  let betas: Float32Array;
  if (config.trainedBetas) betas = Float32Array.from(config.trainedBetas);
  else if (config.betaSchedule === 'scaled_linear') betas = torchLinspaceF32(Math.sqrt(config.betaStart), Math.sqrt(config.betaEnd), n).map((b) => b * b);
  else if (config.betaSchedule === 'linear') betas = torchLinspaceF32(config.betaStart, config.betaEnd, n);
  else betas = cosineBetas(n);
  const alphasCumprod = new Float32Array(n);
  let acc = 1; // torch's CPU cumprod keeps the running product in double
  for (let i = 0; i < n; i++) alphasCumprod[i] = acc *= f32(1 - betas[i]);
  const sqrtAc = alphasCumprod.map(Math.sqrt);
  const sqrt1mAc = alphasCumprod.map((a) => Math.sqrt(f32(1 - a)));
  const sigmaTable = alphasCumprod.map((a) => Math.sqrt(f32(f32(1 - a) / a)));
  const logSigmas = sigmaTable.map(Math.log);
  return { config, betas, alphasCumprod, sqrtAlphasCumprod: sqrtAc, sqrtOneMinusAlphasCumprod: sqrt1mAc, sigmaTable, logSigmas };
}

/** Parse + build in one go (default class DDPMScheduler, the one diffusers' training scripts use). */
export function scheduleFromConfig(raw: Record<string, unknown> = SD_V1_SCHEDULER_CONFIG, cls: SchedulerClass = 'DDPMScheduler'): Schedule {
  return makeSchedule(parseScheduleConfig(raw, cls));
}

// ---------------------------------------------------------------------------------------------------------------
// numpy arithmetic the timestep tables depend on

/** numpy round: half to even. */
export function roundHalfEven(x: number): number {
  const fl = Math.floor(x), d = x - fl;
  return d > 0.5 ? fl + 1 : d < 0.5 ? fl : fl % 2 === 0 ? fl : fl + 1;
}

/** np.linspace(start, stop, num) (float64: start + i*step, last element exactly stop). */
export function npLinspace(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  return Array.from({ length: num }, (_, i) => (i === num - 1 ? stop : start + i * step));
}

/** np.arange(start, stop, step) for floats (numpy fills start + i*delta with delta = (start+step) - start). */
export function npArange(start: number, stop: number, step: number): number[] {
  const len = Math.max(0, Math.ceil((stop - start) / step));
  const delta = start + step - start;
  return Array.from({ length: len }, (_, i) => start + i * delta);
}

/**
 * Descending timesteps of DDIM/DDPM/LMS/Euler/Euler a set_timesteps for a spacing (spec §1.4). `float` keeps
 * linspace fractional (the k-diffusion classes store float32 timesteps); otherwise they are rounded integers.
 */
export function spacedTimesteps(spacing: Spacing, n: number, numTrain: number, stepsOffset: number, float = false): number[] {
  if (spacing === 'linspace') {
    const ts = npLinspace(0, numTrain - 1, n).map((t) => (float ? f32(t) : roundHalfEven(t)));
    return ts.reverse();
  }
  if (spacing === 'leading') {
    const r = Math.floor(numTrain / n);
    return Array.from({ length: n }, (_, k) => (n - 1 - k) * r + stepsOffset);
  }
  return npArange(numTrain, 0, -numTrain / n).map((t) => roundHalfEven(t) - 1);
}

/** np.interp(t, arange(len), table): piecewise-linear lookup of a per-train-timestep table at a fractional t. */
export function interpTable(table: ArrayLike<number>, t: number): number {
  const last = table.length - 1;
  if (!(t > 0)) return table[0];
  if (t >= last) return table[last];
  const j = Math.floor(t);
  return (table[j + 1] - table[j]) * (t - j) + table[j];
}

/** Karras et al. 2022 (eq. 5) rho = 7 schedule from sigmaMax down to sigmaMin in n values (diffusers _convert_to_karras). */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, n: number): number[] {
  const minInv = sigmaMin ** (1 / 7), maxInv = sigmaMax ** (1 / 7);
  return npLinspace(0, 1, n).map((r) => (maxInv + r * (minInv - maxInv)) ** 7);
}

/** The fractional train timestep of a sigma, interpolating in log-sigma (diffusers _sigma_to_t, spec §1.6). */
export function sigmaToT(s: Schedule, sigma: number): number {
  const ls = Math.log(Math.max(sigma, 1e-10)), logs = s.logSigmas;
  let low = 0;
  for (let i = 0; i < logs.length; i++) if (logs[i] <= ls) low = i;
  low = Math.min(low, logs.length - 2);
  const w = Math.min(1, Math.max(0, (logs[low] - ls) / f32(logs[low] - logs[low + 1])));
  return (1 - w) * low + w * (low + 1);
}

/** Sigmas of the k-diffusion style classes (LMS, Euler, Euler a; spec §1.5/§1.6): timesteps, sigmas (+ final), init sigma. */
export function sigmaSchedule(s: Schedule, n: number, sigmaLast: number): { timesteps: Float32Array; sigmas: Float32Array; initNoiseSigma: number } {
  const c = s.config;
  let ts = spacedTimesteps(c.timestepSpacing, n, c.numTrainTimesteps, c.stepsOffset, true);
  let sig = ts.map((t) => interpTable(s.sigmaTable, t));
  if (c.useKarrasSigmas) {
    sig = karrasSigmas(c.sigmaMin ?? sig[sig.length - 1], c.sigmaMax ?? sig[0], n);
    ts = sig.map((x) => sigmaToT(s, x));
  }
  const sigmas = Float32Array.from([...sig, sigmaLast]);
  const max = sigmas.reduce((m, x) => Math.max(m, x), 0);
  const initNoiseSigma = c.timestepSpacing === 'leading' ? f32(Math.sqrt(f32(f32(max * max) + 1))) : max;
  return { timesteps: Float32Array.from(ts), sigmas, initNoiseSigma };
}

// ---------------------------------------------------------------------------------------------------------------
// training side: forward process, v target, SNR

/** A timestep or one timestep per batch element (leading axis of the sample). */
export type Timesteps = number | ArrayLike<number> | tf.Tensor;

/** Per-timestep coefficients from a float32 table, shaped to broadcast against a tensor of rank `rank`. */
function coef(s: Schedule, table: Float32Array, t: Timesteps, rank: number): tf.Tensor {
  if (t instanceof tf.Tensor) {
    const c = tf.gather(tf.tensor1d(table), t.flatten().toInt());
    return c.reshape([c.size, ...Array<number>(rank - 1).fill(1)]);
  }
  const ts = typeof t === 'number' ? [t] : Array.from(t);
  for (const x of ts)
    if (!Number.isInteger(x) || x < 0 || x >= table.length)
      throw usageError(`timestep ${x} is not an integer in [0, ${table.length - 1}]`);
  const vals = ts.map((x) => table[x]);
  return typeof t === 'number' ? tf.scalar(vals[0]) : tf.tensor(vals, [vals.length, ...Array<number>(rank - 1).fill(1)]);
}

/** q(x_t | x_0): sqrt(ac_t)·x0 + sqrt(1−ac_t)·noise (diffusers DDPMScheduler.add_noise; per-batch t along axis 0). */
export function addNoise(s: Schedule, x0: tf.Tensor, noise: tf.Tensor, t: Timesteps): tf.Tensor {
  return tf.tidy(() =>
    tf.add(tf.mul(coef(s, s.sqrtAlphasCumprod, t, x0.rank), x0), tf.mul(coef(s, s.sqrtOneMinusAlphasCumprod, t, x0.rank), noise)));
}

/** The v-prediction target sqrt(ac_t)·noise − sqrt(1−ac_t)·x0 (Salimans & Ho 2022; diffusers get_velocity). */
export function velocity(s: Schedule, x0: tf.Tensor, noise: tf.Tensor, t: Timesteps): tf.Tensor {
  return tf.tidy(() =>
    tf.sub(tf.mul(coef(s, s.sqrtAlphasCumprod, t, x0.rank), noise), tf.mul(coef(s, s.sqrtOneMinusAlphasCumprod, t, x0.rank), x0)));
}

/** Signal-to-noise ratio ac_t / (1 − ac_t) as diffusers training_utils.compute_snr computes it ((alpha/sigma)²). */
export function snr(s: Schedule, t: number): number;
export function snr(s: Schedule, t: ArrayLike<number> | tf.Tensor): tf.Tensor1D;
export function snr(s: Schedule, t: Timesteps): number | tf.Tensor1D {
  const table = s.sqrtAlphasCumprod.map((a, i) => f32(a / s.sqrtOneMinusAlphasCumprod[i]) ** 2);
  if (typeof t === 'number') {
    if (!Number.isInteger(t) || t < 0 || t >= table.length) throw usageError(`timestep ${t} is not an integer in [0, ${table.length - 1}]`);
    return table[t];
  }
  return tf.tidy(() => coef(s, table, t, 1).reshape([-1]) as tf.Tensor1D);
}

// ---------------------------------------------------------------------------------------------------------------
// plan and state shared by the sampler modules (the public API is documented in index.ts)

/** What set_timesteps(N) produced for one sampler; immutable. */
export interface SamplerPlan {
  readonly name: SamplerName;
  readonly schedule: Schedule;
  /** N passed to set_timesteps */
  readonly steps: number;
  /** UNet timestep of each loop iteration (PNDM: N+1 entries; after truncateForStrength: the remaining ones) */
  readonly timesteps: Float32Array;
  /** sigma samplers (LMS, Euler, Euler a, DPM++): sigma of each loop iteration, plus the final one */
  readonly sigmas?: Float32Array;
  readonly initNoiseSigma: number;
  /** diffusers `order` (1 for all eight classes: one model call per timesteps entry) */
  readonly order: number;
  /** DDIM eta */
  readonly eta: number;
  /** index of timesteps[0] in the untruncated plan (diffusers begin_index); 0 unless truncated */
  readonly begin: number;
  /** untruncated timesteps / sigmas (LMS coefficients and DPM-Solver look back across a truncation) */
  readonly fullTimesteps: Float32Array;
  readonly fullSigmas?: Float32Array;
}

/** Sampler state between steps; it owns its tensors (free them with disposeState). */
export interface SamplerState {
  /** steps taken (diffusers PNDM counter, DPM-Solver lower_order_nums) */
  readonly count: number;
  /** PNDM: raw model outputs (ets); LMS: derivatives; DPM++: x0 predictions; newest last */
  readonly history: readonly tf.Tensor[];
  /** PNDM: the sample at the start of the first interval, which the warm-up step redoes */
  readonly curSample?: tf.Tensor;
}

/** What one sampler step computes (inside the caller's tf.tidy). */
export interface StepResult {
  prevSample: tf.Tensor;
  predOriginal: tf.Tensor;
  history: tf.Tensor[];
  curSample?: tf.Tensor;
}

/** Draws fresh noise of a shape (ancestral samplers); see index.ts `step`. */
export type NoiseFn = (shape: number[]) => tf.Tensor;

/** The noise of an ancestral step, or a clear error when the caller passed none. */
export function drawNoise(noise: NoiseFn | undefined, x: tf.Tensor, who: string): tf.Tensor {
  if (!noise) throw usageError(`${who} is stochastic: step() needs a noise function`);
  const n = noise(x.shape.slice());
  if (n.shape.join() !== x.shape.join()) throw usageError(`${who}: noise shape [${n.shape}] != sample shape [${x.shape}]`);
  return n;
}

/** A float32 scalar tensor (torch 0-d float32 coefficient). */
export const sc = (v: number) => tf.scalar(f32(v), 'float32');
