// Sampler API without reference data: names, spec check values, img2img truncation, forward-process identities,
// prediction-type conversions in every sampler, DDIM eta, noise-call contract, and no tensor leaks.
import * as tf from '@tensorflow/tfjs';
import { describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import {
  SAMPLER_NAMES, SD_V1_SCHEDULER_CONFIG, addNoise, addNoiseForPlan, disposeState, initialState, planSampler,
  parseScheduleConfig, resolveSampler, samplerFromConfig, scaleModelInput, scheduleFromConfig, snr, step, truncateForStrength, velocity,
  type SamplerName, type SamplerPlan,
} from '../../src/schedulers/index.js';

const SD = SD_V1_SCHEDULER_CONFIG;
const close = (a: ArrayLike<number>, b: ArrayLike<number>, tol: number) => {
  expect(a.length).toBe(b.length);
  for (let i = 0; i < a.length; i++) expect(Math.abs(a[i] - b[i]), `index ${i}: ${a[i]} vs ${b[i]}`).toBeLessThanOrEqual(tol * Math.max(1, Math.abs(b[i])));
};
const ends = (a: Float32Array, head: number[], tail: number[]) => [...Array.from(a.slice(0, head.length)), ...Array.from(a.slice(-tail.length))];

describe('sampler names', () => {
  it('resolves ours, A1111 and diffusers names (case/space-insensitive)', () => {
    const cases: [string, SamplerName][] = [
      ['Euler a', 'euler_a'], ['euler_a', 'euler_a'], ['EULER A', 'euler_a'], ['EulerAncestralDiscreteScheduler', 'euler_a'],
      ['k_euler_a', 'euler_a'], ['Euler', 'euler'], ['EulerDiscreteScheduler', 'euler'], ['LMS', 'lms'],
      ['LMSDiscreteScheduler', 'lms'], ['PLMS', 'pndm'], ['PNDMScheduler', 'pndm'], ['DDIM', 'ddim'], [' ddim ', 'ddim'],
      ['DDIMScheduler', 'ddim'], ['DPM++ 2M', 'dpmpp_2m'], ['dpmpp_2m', 'dpmpp_2m'], ['DPMSolverMultistepScheduler', 'dpmpp_2m'],
      ['DPM++ 2M Karras', 'dpmpp_2m_karras'], ['dpm++_2m_karras', 'dpmpp_2m_karras'], ['DDPM', 'ddpm'], ['DDPMScheduler', 'ddpm'],
    ];
    for (const [alias, want] of cases) expect(resolveSampler(alias), alias).toBe(want);
    for (const n of SAMPLER_NAMES) expect(resolveSampler(n)).toBe(n);
  });

  it('unknown name: a usage error listing the valid names', () => {
    let err: unknown;
    try {
      resolveSampler('DPM++ SDE');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SdtuneError);
    expect((err as SdtuneError).kind).toBe('usage');
    for (const n of SAMPLER_NAMES) expect((err as Error).message).toContain(n);
    expect((err as Error).message).toContain('Euler a');
  });

  it('samplerFromConfig reads _class_name (+ use_karras_sigmas)', () => {
    expect(samplerFromConfig(SD)).toBe('pndm');
    expect(samplerFromConfig({ _class_name: 'EulerAncestralDiscreteScheduler' })).toBe('euler_a');
    expect(samplerFromConfig({ _class_name: 'DPMSolverMultistepScheduler' })).toBe('dpmpp_2m');
    expect(samplerFromConfig({ _class_name: 'DPMSolverMultistepScheduler', use_karras_sigmas: true })).toBe('dpmpp_2m_karras');
    expect(() => samplerFromConfig({ _class_name: 'UniPCMultistepScheduler' })).toThrow(/UniPC.*not implemented/);
  });
});

describe('schedule tables (spec check values)', () => {
  it('alphas_cumprod and sigma table', () => {
    const s = scheduleFromConfig(SD);
    close([s.alphasCumprod[0], s.alphasCumprod[1], s.alphasCumprod[981], s.alphasCumprod[999]], [0.99915, 0.998296, 0.0057755, 0.0046601], 1e-6);
    close([s.sigmaTable[0], s.sigmaTable[999]], [0.0291675, 14.6146], 1e-5);
  });

  it('timestep spacings (§1.4) and sigmas (§1.5, §1.6)', () => {
    const ts = (n: SamplerName, N: number, o?: { timestepSpacing?: string }) => planSampler(n, SD, N, o).timesteps;
    expect(ends(ts('ddim', 20), [951, 901], [51, 1])).toEqual([951, 901, 51, 1]);
    expect(Array.from(ts('ddpm', 10))).toEqual([901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    close(ends(ts('euler', 20), [999, 946.4211, 893.8421], [0]), [999, 946.4211, 893.8421, 0], 1e-7);
    close(ends(ts('lms', 25), [999, 957.375], [41.625, 0]), [999, 957.375, 41.625, 0], 0);
    expect(Array.from(ts('dpmpp_2m', 10))).toEqual([999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
    expect(Array.from(ts('dpmpp_2m', 6))).toEqual([999, 832, 666, 500, 333, 166]); // numpy round half to even
    expect(ends(ts('dpmpp_2m', 20, { timestepSpacing: 'leading' }), [941, 894, 847], [48])).toEqual([941, 894, 847, 48]);
    expect(Array.from(ts('ddim', 10, { timestepSpacing: 'trailing' }))).toEqual([999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
    expect(Array.from(ts('euler', 16, { timestepSpacing: 'trailing' })).slice(0, 4)).toEqual([999, 937, 874, 811]); // 937.5 -> 938 (half to even), 812.5 -> 812
    const pndm = ts('pndm', 50);
    expect(pndm.length).toBe(51);
    expect(ends(pndm, [981, 961, 961, 941], [21, 1])).toEqual([981, 961, 961, 941, 21, 1]);
    expect(Array.from(ts('pndm', 1))).toEqual([1]);

    const eu = planSampler('euler', SD, 20).sigmas!;
    close(ends(eu, [14.6147, 10.7469, 8.0815], [0.2322, 0.0292, 0]), [14.6147, 10.7469, 8.0815, 0.2322, 0.0292, 0], 2e-4);
    const lead = planSampler('euler', SD, 20, { timestepSpacing: 'leading' });
    close(ends(lead.sigmas!, [11.0283, 8.3907, 6.5064], [0.2281, 0.0413, 0]), [11.0283, 8.3907, 6.5064, 0.2281, 0.0413, 0], 2e-4);
    close([lead.initNoiseSigma], [Math.sqrt(11.0283 ** 2 + 1)], 1e-4); // leading: sqrt(max² + 1)
    const k = planSampler('dpmpp_2m_karras', SD, 20);
    close(ends(k.sigmas!, [14.6147, 11.7254, 9.3402], [0.0485, 0.0292, 0]), [14.6147, 11.7254, 9.3402, 0.0485, 0.0292, 0], 2e-4);
    expect(k.timesteps.every(Number.isInteger)).toBe(true);
    // Euler/LMS Karras: sigma_min/max are the ends of the spaced sigmas; fractional timesteps from sigma_to_t
    const ek = planSampler('euler', { ...SD, use_karras_sigmas: true }, 20);
    close([ek.sigmas![0], ek.sigmas![19]], [eu[0], eu[19]], 1e-6);
    close([ek.timesteps[0], ek.timesteps[19]], [999, 0], 1e-4);
  });

  it('config: class defaults, overrides and refused features', () => {
    expect(planSampler('ddim', { ...SD, set_alpha_to_one: undefined }, 10).schedule.config.setAlphaToOne).toBe(true); // DDIM default
    expect(planSampler('pndm', { ...SD, set_alpha_to_one: undefined }, 10).schedule.config.setAlphaToOne).toBe(false);
    expect(planSampler('euler', { ...SD, timestep_spacing: 'leading' }, 10).timesteps[0]).toBe(901); // explicit key wins
    expect(() => planSampler('euler', SD, 10, { timestepSpacing: 'uniform' })).toThrow(/timestep spacing/);
    expect(() => planSampler('ddim', { ...SD, thresholding: true }, 10)).toThrow(SdtuneError);
    expect(() => planSampler('ddim', { ...SD, beta_start: 'x' }, 10)).toThrow(/beta_start/);
    expect(() => planSampler('ddim', SD, 0)).toThrow(/steps/);
    expect(planSampler('dpmpp_2m', { ...SD, use_karras_sigmas: true }, 10).sigmas![1]).toBeCloseTo(planSampler('dpmpp_2m', SD, 10).sigmas![1], 6);
  });
});

describe('img2img truncation (diffusers get_timesteps)', () => {
  it('t_start = N − min(int(N·strength), N); timesteps[t_start·order:]', () => {
    const plan = planSampler('ddim', SD, 10);
    const t = (s: number) => truncateForStrength(plan, s);
    expect(t(0.75).startIndex).toBe(3); // int(7.5) = 7
    expect(Array.from(t(0.75).plan.timesteps)).toEqual([601, 501, 401, 301, 201, 101, 1]);
    expect(t(0.75).noiseTimestep).toBe(601);
    expect(t(1).startIndex).toBe(0);
    expect(t(0.3).startIndex).toBe(7); // 10·0.3 = 3.0000000000000004 -> 3
    expect(t(0.7).startIndex).toBe(3); // 10·0.7 = 7.000000000000001 -> 7
    expect(() => t(0.05)).toThrow(/no denoising step/);
    expect(() => t(1.5)).toThrow(/strength/);
    // PNDM keeps diffusers' slicing of its N+1 list (order 1): 6 entries for 5 steps
    expect(truncateForStrength(planSampler('pndm', SD, 10), 0.5).plan.timesteps.length).toBe(6);
    const e = planSampler('euler', SD, 10), te = truncateForStrength(e, 0.6);
    expect(te.plan.sigmas![0]).toBe(e.sigmas![4]);
    expect(te.plan.begin).toBe(4);
  });

  it('addNoiseForPlan: add_noise of each class at the first remaining step', () => {
    const x0 = tf.fill([1, 2, 2, 4], 0.5), n = tf.fill([1, 2, 2, 4], -1);
    for (const name of SAMPLER_NAMES) {
      const full = planSampler(name, SD, 10), { plan } = truncateForStrength(full, 0.5);
      const a = addNoiseForPlan(plan, x0, n), b = addNoiseForPlan(full, x0, n, 5);
      const v = a.dataSync()[0];
      expect(b.dataSync()[0]).toBe(v);
      const sig = plan.sigmas?.[0], t = plan.timesteps[0], ac = plan.schedule.alphasCumprod;
      const want =
        name === 'lms' || name === 'euler' || name === 'euler_a' ? 0.5 - sig!
        : name.startsWith('dpmpp') ? (0.5 - sig!) / Math.sqrt(sig! ** 2 + 1)
        : 0.5 * Math.sqrt(ac[t]) - Math.sqrt(1 - ac[t]);
      expect(v, name).toBeCloseTo(want, 5);
      tf.dispose([a, b]);
    }
    tf.dispose([x0, n]);
  });
});

describe('training helpers', () => {
  const s = scheduleFromConfig(SD);
  it('addNoise / velocity identities, per-batch timesteps', () => {
    const x0 = tf.randomNormal([3, 4, 4, 2], 0, 1, 'float32', 1), eps = tf.randomNormal([3, 4, 4, 2], 0, 1, 'float32', 2);
    const ts = [0, 500, 999];
    const xt = addNoise(s, x0, eps, ts), v = velocity(s, x0, eps, tf.tensor1d(ts, 'int32'));
    const xtArr = addNoise(s, x0, eps, tf.tensor1d(ts, 'int32'));
    expect(Array.from(xtArr.dataSync())).toEqual(Array.from(xt.dataSync()));
    ts.forEach((t, b) => {
      const one = addNoise(s, x0.slice(b, 1), eps.slice(b, 1), t);
      expect(Array.from(one.dataSync())).toEqual(Array.from(xt.slice(b, 1).dataSync()));
      const a = Math.sqrt(s.alphasCumprod[t]), sg = Math.sqrt(1 - s.alphasCumprod[t]);
      // x0 = a·x_t − s·v and eps = a·v + s·x_t
      close(tf.sub(tf.mul(a, xt.slice(b, 1)), tf.mul(sg, v.slice(b, 1))).dataSync(), x0.slice(b, 1).dataSync(), 1e-5);
      close(tf.add(tf.mul(a, v.slice(b, 1)), tf.mul(sg, xt.slice(b, 1))).dataSync(), eps.slice(b, 1).dataSync(), 1e-5);
    });
    expect(() => addNoise(s, x0, eps, 1000)).toThrow(/timestep/);
  });

  it('snr = ac/(1 − ac), decreasing; number and tensor forms agree', () => {
    expect(snr(s, 0)).toBeCloseTo(s.alphasCumprod[0] / (1 - s.alphasCumprod[0]), 0);
    expect(Math.abs(snr(s, 999) / (s.alphasCumprod[999] / (1 - s.alphasCumprod[999])) - 1)).toBeLessThan(1e-6);
    const v = snr(s, [10, 20, 999]);
    close(v.dataSync(), [snr(s, 10), snr(s, 20), snr(s, 999)], 0);
    expect(snr(s, 10)).toBeGreaterThan(snr(s, 20));
    v.dispose();
  });
});

describe('sampler steps', () => {
  // (alpha, sigma_vp) of loop index i, and whether the sampler's sample lives in sigma (k-diffusion) scale
  function vpAt(plan: SamplerPlan, i: number) {
    if (!plan.sigmas) {
      const a = plan.schedule.alphasCumprod[plan.timesteps[i]];
      return { alpha: Math.sqrt(a), sigma: Math.sqrt(1 - a), kScale: false };
    }
    const s = plan.sigmas[i], alpha = 1 / Math.sqrt(s * s + 1);
    return { alpha, sigma: s * alpha, kScale: !plan.name.startsWith('dpmpp') };
  }

  it('every sampler recovers x0 from an exact epsilon / v / sample prediction (first step)', () => {
    const x0 = tf.randomNormal([1, 4, 4, 4], 0, 1, 'float32', 3), eps = tf.randomNormal([1, 4, 4, 4], 0, 1, 'float32', 4);
    for (const name of SAMPLER_NAMES)
      for (const prediction_type of ['epsilon', 'v_prediction', 'sample']) {
        const plan = planSampler(name, { ...SD, prediction_type }, 10, { eta: name === 'ddim' ? 0.5 : undefined });
        const { alpha, sigma, kScale } = vpAt(plan, 0);
        const x = tf.tidy(() => tf.div(tf.add(tf.mul(alpha, x0), tf.mul(sigma, eps)), kScale ? alpha : 1));
        const out = tf.tidy(() =>
          prediction_type === 'epsilon' ? eps.clone() : prediction_type === 'sample' ? x0.clone() : tf.sub(tf.mul(alpha, eps), tf.mul(sigma, x0)));
        const r = step(plan, initialState(plan), out, 0, x, (shape) => tf.zeros(shape));
        close(r.predOriginal.dataSync(), x0.dataSync(), 2e-4);
        disposeState(r.state);
        tf.dispose([x, out, r.prevSample, r.predOriginal]);
      }
    tf.dispose([x0, eps]);
  });

  it('DDIM eta > 0: sqrt(ac_prev)·x0 + sqrt(1 − ac_prev − σ²)·eps + σ·noise', () => {
    const eta = 0.7, plan = planSampler('ddim', SD, 10, { eta }), ac = plan.schedule.alphasCumprod;
    const x = tf.fill([1, 2, 2, 1], 0.8), eps = tf.fill([1, 2, 2, 1], 0.3), n = tf.fill([1, 2, 2, 1], -1.2);
    let calls = 0;
    const r = step(plan, initialState(plan), eps, 2, x, () => (calls++, n));
    const a = ac[701], ap = ac[601], x0 = (0.8 - Math.sqrt(1 - a) * 0.3) / Math.sqrt(a);
    const sd = eta * Math.sqrt(((1 - ap) / (1 - a)) * (1 - a / ap));
    expect(calls).toBe(1);
    expect(r.prevSample.dataSync()[0]).toBeCloseTo(Math.sqrt(ap) * x0 + Math.sqrt(1 - ap - sd * sd) * 0.3 + sd * -1.2, 5);
    expect(() => step(plan, initialState(plan), eps, 2, x)).toThrow(/noise/);
    disposeState(r.state);
    tf.dispose([x, eps, n, r.prevSample, r.predOriginal]);
  });

  it('noise calls: Euler a every step (also the last), DDPM only for t > 0, deterministic samplers never', () => {
    const counts: Partial<Record<SamplerName, number>> = {};
    for (const name of SAMPLER_NAMES) {
      const plan = planSampler(name, SD, 5, name === 'ddpm' ? { timestepSpacing: 'linspace' } : {}); // DDPM linspace ends at t = 0
      let state = initialState(plan), x = tf.ones([1, 2, 2, 4]), calls = 0;
      for (let i = 0; i < plan.timesteps.length; i++) {
        const eps = tf.mul(x, 0.1);
        const r = step(plan, state, eps, i, x, (shape) => (calls++, tf.zeros(shape)));
        disposeState(state);
        tf.dispose([x, eps, r.predOriginal]);
        [state, x] = [r.state, r.prevSample];
      }
      disposeState(state);
      x.dispose();
      counts[name] = calls;
    }
    expect(counts).toEqual({ ddim: 0, pndm: 0, lms: 0, euler: 0, euler_a: 5, dpmpp_2m: 0, dpmpp_2m_karras: 0, ddpm: 4 });
  });

  it('no tensor leaks over a 10-step loop (state history bounded, caller tensors untouched)', () => {
    for (const name of SAMPLER_NAMES) {
      const plan = planSampler(name, SD, 10);
      const start = tf.memory().numTensors;
      let x = tf.randomNormal([1, 4, 4, 4], 0, plan.initNoiseSigma, 'float32', 5), state = initialState(plan);
      let maxHistory = 0;
      for (let i = 0; i < plan.timesteps.length; i++) {
        const inp = scaleModelInput(plan, state, x, i);
        const eps = tf.tidy(() => tf.mul(inp, 0.3));
        const r = step(plan, state, eps, i, x, (shape) => tf.randomNormal(shape));
        expect(r.prevSample).not.toBe(x);
        expect(x.isDisposed).toBe(false);
        disposeState(state); // the old state is the caller's to free
        tf.dispose([inp, eps, x, r.predOriginal]);
        [state, x] = [r.state, r.prevSample];
        maxHistory = Math.max(maxHistory, state.history.length);
      }
      expect(maxHistory, name).toBeLessThanOrEqual(name === 'lms' || name === 'pndm' ? 4 : 2);
      expect(Number.isFinite(x.dataSync()[0])).toBe(true);
      disposeState(state);
      x.dispose();
      expect(tf.memory().numTensors, name).toBe(start);
    }
  });
});

describe('parseScheduleConfig (scheduler_config.json, one zod declaration per field)', () => {
  it('fills each class\'s defaults; null reads as the default', () => {
    const ddim = parseScheduleConfig({}, 'DDIMScheduler');
    expect(ddim).toMatchObject({ numTrainTimesteps: 1000, betaSchedule: 'linear', timestepSpacing: 'leading', setAlphaToOne: true, clipSample: true, predictionType: 'epsilon' });
    const euler = parseScheduleConfig({ num_train_timesteps: null, sigma_min: 0.1 }, 'EulerDiscreteScheduler');
    expect(euler).toMatchObject({ numTrainTimesteps: 1000, timestepSpacing: 'linspace', setAlphaToOne: false, clipSample: false, sigmaMin: 0.1, sigmaMax: null });
    expect(parseScheduleConfig({ ...SD_V1_SCHEDULER_CONFIG }, 'PNDMScheduler')).toMatchObject({ betaStart: 0.00085, betaEnd: 0.012, stepsOffset: 1, betaSchedule: 'scaled_linear' });
  });
  it('a wrong value is one line naming the key, what was found and what is expected', () => {
    expect(() => parseScheduleConfig({ num_train_timesteps: 1.5 }, 'DDIMScheduler')).toThrow('scheduler config: num_train_timesteps = 1.5 (expected an integer >= 2)');
    expect(() => parseScheduleConfig({ beta_schedule: 'cosine' }, 'DDIMScheduler')).toThrow('scheduler config: beta_schedule = "cosine" (expected linear | scaled_linear | squaredcos_cap_v2)');
    expect(() => parseScheduleConfig({ clip_sample: 'yes' }, 'DDPMScheduler')).toThrow('scheduler config: clip_sample = "yes" (expected true or false)');
    expect(() => parseScheduleConfig({ trained_betas: [0.1, 0.2] }, 'DDIMScheduler')).toThrow('trained_betas = "2 values" (expected num_train_timesteps = 1000 values)');
  });
  it('keys another class reads are not checked; unimplemented features are refused', () => {
    // a PNDM config carrying a DDPM-only key of another type still loads for PNDM (diffusers ignores it too)
    expect(parseScheduleConfig({ variance_type: 42, clip_sample: 'n/a' }, 'PNDMScheduler').varianceType).toBe('fixed_small');
    expect(() => parseScheduleConfig({ variance_type: 42 }, 'DDPMScheduler')).toThrow(/variance_type = 42/);
    expect(() => parseScheduleConfig({ thresholding: true }, 'DDIMScheduler')).toThrow('scheduler config: thresholding = true is not implemented');
    expect(() => parseScheduleConfig({ timestep_type: 'continuous' }, 'EulerDiscreteScheduler')).toThrow(/timestep_type "continuous"/);
  });
});
