/**
 * The eight samplers of diffusers for SD v1, exact and pure (spec samplers.md §1–§8; design principle 6).
 *
 *   const plan = planSampler(resolveSampler('Euler a'), model.schedulerConfig, 20);   // set_timesteps(20)
 *   let x = tf.mul(noise0, plan.initNoiseSigma), state = initialState(plan);
 *   for (let i = 0; i < plan.timesteps.length; i++) {               // PNDM: N+1 iterations (warm-up repeats a t)
 *     const inp = scaleModelInput(plan, state, x, i);               // always a new tensor
 *     const eps = cfgUnet(inp, plan.timesteps[i]);                  // the UNet gets plan.timesteps[i]
 *     const r = step(plan, state, eps, i, x, (shape) => rng.randn(shape));
 *     disposeState(state); state = r.state; x.dispose(); x = r.prevSample; r.predOriginal.dispose(); ...
 *   }
 *   disposeState(state);
 *
 * img2img: `const { plan: p2, startIndex, noiseTimestep } = truncateForStrength(plan, 0.75)`, then
 * `x = addNoiseForPlan(p2, initLatents, noise)` and loop over p2 as above (diffusers get_timesteps + add_noise).
 *
 * - Plans, states and schedules are immutable values; nothing is hidden in a scheduler object. A state owns its
 *   tensors (history of multistep samplers); step() never disposes the caller's tensors (old state included) and
 *   returns only new tensors, so the caller disposes the old state, the old sample and the outputs it drops.
 * - `noise` is called (once per step, with the sample's shape) only by ancestral steps: Euler a (every step, also
 *   the last), DDPM (when t > 0) and DDIM with eta > 0. It runs inside the step's tf.tidy: a tensor it creates is
 *   freed by the step, a tensor it hands back from elsewhere (recorded noise) is left alone.
 * - Timestep spacing: an explicit `timestep_spacing` in the config wins, else the class default (DDIM/PNDM/DDPM
 *   leading + steps_offset; LMS/Euler/Euler a/DPM-Solver linspace); `opts.timestepSpacing` overrides both.
 * - prediction_type epsilon, v_prediction and sample work in every sampler (converted as each diffusers class does;
 *   PNDM's and Euler a's "sample" branch, missing in diffusers, uses the same conversion as DDIM / Euler).
 * - Not implemented (refused with SdtuneError('unsupported') from the config): thresholding, rescale_betas_zero_snr,
 *   exponential/beta/lu/flow sigmas, log_linear interpolation, continuous timesteps. PNDM always runs PLMS
 *   (skip_prk_steps = true, as every SD config sets); Euler's s_churn is not offered (diffusers pipelines pass 0).
 */
import * as tf from '@tensorflow/tfjs';
import { SdtuneError, usageError } from '../errors.js';
import {
  addNoise, f32, makeSchedule, parseScheduleConfig, sc, sigmaSchedule, spacedTimesteps,
  type NoiseFn, type SamplerName, type SamplerPlan, type SamplerState, type Spacing, type StepResult,
} from './schedule.js';
import { SAMPLER_CLASS, SAMPLER_NAMES } from './names.js';
import { ddimStep } from './ddim.js';
import { ddpmStep } from './ddpm.js';
import { plmsStep, plmsTimesteps } from './pndm.js';
import { lmsStep } from './lms.js';
import { eulerAncestralStep, eulerStep } from './euler.js';
import { dpmSchedule, dpmppStep } from './dpmpp.js';

export type { NoiseFn, SamplerName, SamplerPlan, SamplerState, Schedule, ScheduleConfig, Spacing, Timesteps } from './schedule.js';
export type { SchedulerClass, PredictionType } from './schedule.js';
export { SD_V1_SCHEDULER_CONFIG, addNoise, makeSchedule, parseScheduleConfig, scheduleFromConfig, snr, velocity } from './schedule.js';
// the per-sampler pure steps, for callers that drive timesteps themselves (design principle 6)
export { ddimStep } from './ddim.js';
export { ddpmStep } from './ddpm.js';
export { eulerAncestralStep, eulerStep } from './euler.js';
export { lmsCoefficient } from './lms.js';

export { SAMPLER_CLASS, SAMPLER_LABELS, SAMPLER_NAMES, infotextSampler, resolveSampler, samplerFromInfotext } from './names.js';

/** The sampler a model's scheduler_config names (_class_name; DPMSolverMultistepScheduler + use_karras_sigmas -> Karras). */
export function samplerFromConfig(cfg: Record<string, unknown>): SamplerName {
  const cls = cfg._class_name;
  if (typeof cls !== 'string') throw new SdtuneError('format', 'scheduler config has no _class_name');
  const hit = (Object.keys(SAMPLER_CLASS) as SamplerName[]).find((n) => SAMPLER_CLASS[n] === cls);
  if (!hit) throw new SdtuneError('unsupported', `scheduler ${cls} is not implemented; use one of: ${SAMPLER_NAMES.join(', ')}`);
  return cls === 'DPMSolverMultistepScheduler' && cfg.use_karras_sigmas === true ? 'dpmpp_2m_karras' : hit;
}

const SIGMA_SCALED: ReadonlySet<SamplerName> = new Set(['lms', 'euler', 'euler_a']);

/** diffusers `<Class>.from_config(cfg)` + set_timesteps(steps) for this sampler (opts: timestep_spacing override, DDIM eta). */
export function planSampler(
  name: SamplerName, schedulerConfig: Record<string, unknown>, steps: number, opts: { timestepSpacing?: string; eta?: number } = {},
): SamplerPlan {
  const parsed = parseScheduleConfig(schedulerConfig, SAMPLER_CLASS[name]);
  const spacing = opts.timestepSpacing ?? parsed.timestepSpacing;
  if (!['leading', 'linspace', 'trailing'].includes(spacing)) throw usageError(`timestep spacing "${spacing}"; valid: leading, linspace, trailing`);
  const karras = name === 'dpmpp_2m_karras' || (name === 'dpmpp_2m' ? false : parsed.useKarrasSigmas);
  const schedule = makeSchedule({ ...parsed, timestepSpacing: spacing as Spacing, useKarrasSigmas: karras });
  const T = parsed.numTrainTimesteps;
  if (!Number.isInteger(steps) || steps < 1 || steps > T) throw usageError(`steps must be an integer in [1, ${T}], got ${steps}`);
  const eta = opts.eta ?? 0;
  if (!(eta >= 0 && Number.isFinite(eta))) throw usageError(`eta must be a number >= 0, got ${eta}`);
  const c = schedule.config;
  let timesteps: Float32Array, sigmas: Float32Array | undefined, initNoiseSigma = 1;
  if (name === 'pndm') timesteps = Float32Array.from(plmsTimesteps(schedule, steps));
  else if (name === 'ddim' || name === 'ddpm') timesteps = Float32Array.from(spacedTimesteps(c.timestepSpacing, steps, T, c.stepsOffset));
  else if (SIGMA_SCALED.has(name)) {
    const last = name === 'euler' && c.finalSigmasType === 'sigma_min' ? schedule.sigmaTable[0] : 0;
    ({ timesteps, sigmas, initNoiseSigma } = sigmaSchedule(schedule, steps, last));
  } else ({ timesteps, sigmas } = dpmSchedule(schedule, steps));
  return {
    name, schedule, steps, timesteps, sigmas, initNoiseSigma, order: 1, eta: name === 'ddim' ? eta : 0,
    begin: 0, fullTimesteps: timesteps, fullSigmas: sigmas,
  };
}

/** img2img (diffusers get_timesteps): init = min(int(N·strength), N); t_start = N − init; the plan from t_start·order on. */
export function truncateForStrength(plan: SamplerPlan, strength: number): { plan: SamplerPlan; startIndex: number; noiseTimestep: number } {
  if (!(strength >= 0 && strength <= 1)) throw usageError(`strength must be in [0, 1], got ${strength}`);
  const n = plan.steps;
  const init = Math.min(Math.floor(n * strength), n);
  const startIndex = Math.max(n - init, 0) * plan.order;
  if (startIndex >= plan.fullTimesteps.length)
    throw usageError(`strength ${strength} with ${n} steps leaves no denoising step (need strength >= ${1 / n})`);
  const truncated: SamplerPlan = {
    ...plan, begin: startIndex, timesteps: plan.fullTimesteps.subarray(startIndex), sigmas: plan.fullSigmas?.subarray(startIndex),
  };
  return { plan: truncated, startIndex, noiseTimestep: plan.fullTimesteps[startIndex] };
}

/**
 * Noise clean latents to the level of loop index `i` of `plan` (default 0: the first step of a truncated plan),
 * exactly as that class's add_noise: DDPM forward process for ddim/pndm/ddpm, x + σ·noise for LMS/Euler/Euler a,
 * alpha_t·x + sigma_t·noise for DPM-Solver.
 */
export function addNoiseForPlan(plan: SamplerPlan, x0: tf.Tensor, noise: tf.Tensor, i = 0): tf.Tensor {
  if (!(Number.isInteger(i) && i >= 0 && i < plan.timesteps.length)) throw usageError(`step index ${i} outside the plan`);
  if (!plan.sigmas) return addNoise(plan.schedule, x0, noise, plan.timesteps[i]);
  const sigma = plan.sigmas[i];
  return tf.tidy(() => {
    if (SIGMA_SCALED.has(plan.name)) return tf.add(x0, tf.mul(noise, sc(sigma)));
    const alpha = f32(1 / f32(Math.sqrt(f32(f32(sigma * sigma) + 1))));
    return tf.add(tf.mul(sc(alpha), x0), tf.mul(sc(sigma * alpha), noise));
  });
}

/** A fresh state (no history; diffusers set_timesteps resets ets / derivatives / model_outputs). */
export function initialState(_plan: SamplerPlan): SamplerState {
  return { count: 0, history: [] };
}

/** scheduler.scale_model_input for loop index i: x/√(σ²+1) for LMS/Euler/Euler a, a copy otherwise (always a new tensor). */
export function scaleModelInput(plan: SamplerPlan, _state: SamplerState, x: tf.Tensor, i: number): tf.Tensor {
  if (!SIGMA_SCALED.has(plan.name)) return tf.clone(x);
  const sigma = plan.sigmas![i];
  return tf.tidy(() => tf.div(x, sc(Math.sqrt(f32(f32(sigma * sigma) + 1)))));
}

/** One sampler step at loop index i: (model output, sample) -> next sample, x0 prediction, next state (see top). */
export function step(
  plan: SamplerPlan, state: SamplerState, modelOutput: tf.Tensor, i: number, sample: tf.Tensor, noise?: NoiseFn,
): { prevSample: tf.Tensor; predOriginal: tf.Tensor; state: SamplerState } {
  if (!(Number.isInteger(i) && i >= 0 && i < plan.timesteps.length)) throw usageError(`step index ${i} outside the plan (${plan.timesteps.length} steps)`);
  if (modelOutput.shape.join() !== sample.shape.join()) throw usageError(`model output [${modelOutput.shape}] vs sample [${sample.shape}]`);
  const s = plan.schedule, t = plan.timesteps[i], pred = s.config.predictionType;
  let out: { prevSample: tf.Tensor; predOriginal: tf.Tensor; state: SamplerState } | undefined;
  tf.tidy(() => {
    const r: StepResult = ((): StepResult => {
      const none = { history: [] };
      switch (plan.name) {
        case 'ddim':
          return { ...ddimStep(s, modelOutput, t, t - Math.floor(s.config.numTrainTimesteps / plan.steps), sample, { eta: plan.eta, noise }), ...none };
        case 'ddpm':
          return { ...ddpmStep(s, modelOutput, t, i + 1 < plan.timesteps.length ? plan.timesteps[i + 1] : -1, sample, noise), ...none };
        case 'pndm':
          return plmsStep(s, state, modelOutput, t, Math.floor(s.config.numTrainTimesteps / plan.steps), sample);
        case 'lms':
          return lmsStep(plan, state, modelOutput, i, sample);
        case 'euler':
          return { ...eulerStep(pred, plan.sigmas![i], plan.sigmas![i + 1], modelOutput, sample), ...none };
        case 'euler_a':
          return { ...eulerAncestralStep(pred, plan.sigmas![i], plan.sigmas![i + 1], modelOutput, sample, noise), ...none };
        case 'dpmpp_2m':
        case 'dpmpp_2m_karras':
          return dpmppStep(plan, state, modelOutput, i, sample);
      }
    })();
    // clones: new handles on shared data, so results never alias the caller's tensors or the old state's
    const own = (x: tf.Tensor) => tf.keep(tf.clone(x));
    out = {
      prevSample: own(r.prevSample),
      predOriginal: own(r.predOriginal),
      state: { count: state.count + 1, history: r.history.map(own), curSample: r.curSample && own(r.curSample) },
    };
  });
  return out!;
}

/** Free the tensors a state owns. */
export function disposeState(state: SamplerState): void {
  for (const t of state.history) t.dispose();
  state.curSample?.dispose();
}
