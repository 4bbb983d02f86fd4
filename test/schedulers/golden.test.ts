// The eight samplers against diffusers 0.35 reference data: schedule tables, timesteps/sigmas, init sigma, and the
// 10-step trajectories (teacher-forced on the recorded inputs, and free-running in NHWC).
import * as tf from '@tensorflow/tfjs';
import { expect, it } from 'vitest';
import { atolOf, caseTensors, describeGolden, goldenCase } from '../golden.js';
import { maxAbsDiff, nhwc, toNchwData } from '../helpers.js';
import type { RawTensor } from '../../src/io/safetensors.js';
import {
  SD_V1_SCHEDULER_CONFIG, disposeState, initialState, planSampler, scaleModelInput, scheduleFromConfig, step,
  type SamplerName,
} from '../../src/schedulers/index.js';

const CASES: [string, SamplerName][] = [
  ['scheduler_ddim', 'ddim'], ['scheduler_pndm', 'pndm'], ['scheduler_lms', 'lms'], ['scheduler_euler', 'euler'],
  ['scheduler_euler_a', 'euler_a'], ['scheduler_dpmpp2m', 'dpmpp_2m'], ['scheduler_dpmpp2m_karras', 'dpmpp_2m_karras'],
  ['scheduler_ddpm', 'ddpm'],
];

/** max |a − b| / max(1, |b|): absolute for unit-scale values, relative on the sigma ~14.6 samples (the cases' tolerance). */
function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]) / Math.max(1, Math.abs(b[i]));
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

const data = (t: tf.Tensor) => t.dataSync() as Float32Array;

describeGolden('schedulers vs diffusers', () => {
  it('betas and alphas_cumprod are bit-exact (spec §1.2)', async () => {
    const T = await caseTensors('scheduler_alphas_cumprod');
    const s = scheduleFromConfig(SD_V1_SCHEDULER_CONFIG);
    expect(maxAbsDiff(s.betas, T.get('betas')!.data)).toBe(0);
    expect(maxAbsDiff(s.alphasCumprod, T.get('alphas_cumprod')!.data)).toBe(0);
  });

  const report: string[] = [];
  for (const [caseName, name] of CASES) {
    it(`${name}: timesteps, sigmas, init_noise_sigma, 10-step trajectory`, async () => {
      const c = goldenCase(caseName), tol = atolOf(caseName), T = await caseTensors(caseName);
      const get = (k: string): RawTensor => {
        const t = T.get(k);
        if (!t) throw new Error(`${caseName}: ${k} missing`);
        return t;
      };
      const cfg = c.config as Record<string, unknown>;
      // the SD v1 config without timestep_spacing must give the same tables (class-default spacing)
      const sd = { ...SD_V1_SCHEDULER_CONFIG, ...(c.extra_kwargs as Record<string, unknown>) };
      let sigmaErr = 0;
      for (const key of T.keys()) {
        const n = /^timesteps_(\d+)$/.exec(key)?.[1];
        if (!n) continue;
        for (const config of [cfg, sd]) {
          const plan = planSampler(name, config, Number(n));
          expect(Array.from(plan.timesteps), `${key}`).toEqual(Array.from(get(key).data));
          if (T.has(`sigmas_${n}`)) sigmaErr = Math.max(sigmaErr, relErr(plan.sigmas!, get(`sigmas_${n}`).data));
          expect(plan.initNoiseSigma).toBe(c[`init_noise_sigma_after_set_timesteps_${n}`]);
        }
      }
      expect(sigmaErr).toBeLessThanOrEqual(1e-6);

      const plan = planSampler(name, cfg, 10);
      expect(Array.from(plan.timesteps)).toEqual(c.trajectory_timesteps);
      const x0 = get('x0'), B = get('B'), shape = x0.shape;
      const ref = (k: string) => get(k).data;
      const hasX0 = T.has('traj_pred_original_0');
      const before = tf.memory().numTensors;
      const errs: Record<string, number> = hasX0 ? { scaled: 0, model: 0, prev: 0, x0: 0 } : { scaled: 0, model: 0, prev: 0 };
      const free: Record<string, number> = hasX0 ? { prev: 0, x0: 0 } : { prev: 0 };

      // 1. teacher-forced: every step gets the recorded sample, model output and noise
      let state = initialState(plan);
      for (let k = 0; k < plan.timesteps.length; k++) {
        const x = tf.tensor(k === 0 ? ref('traj_sample_0') : ref(`traj_prev_sample_${k - 1}`), shape);
        const scaled = scaleModelInput(plan, state, x, k);
        errs.scaled = Math.max(errs.scaled, relErr(data(scaled), ref(`traj_scaled_input_${k}`)));
        const ours = tf.tidy(() => tf.add(tf.mul(scaled, 0.3), tf.mul(tf.tensor(B.data, shape), 0.1 * k)));
        errs.model = Math.max(errs.model, relErr(data(ours), ref(`traj_model_output_${k}`)));
        const mo = tf.tensor(ref(`traj_model_output_${k}`), shape);
        const noise = T.has(`traj_noise_${k}`) ? tf.tensor(ref(`traj_noise_${k}`), shape) : undefined;
        let draws = 0;
        const r = step(plan, state, mo, k, x, noise && (() => (draws++, noise)));
        expect(draws).toBe(noise ? 1 : 0);
        errs.prev = Math.max(errs.prev, relErr(data(r.prevSample), ref(`traj_prev_sample_${k}`)));
        if (hasX0) errs.x0 = Math.max(errs.x0, relErr(data(r.predOriginal), ref(`traj_pred_original_${k}`)));
        disposeState(state);
        state = r.state;
        tf.dispose([x, scaled, ours, mo, r.prevSample, r.predOriginal, ...(noise ? [noise] : [])]);
      }
      disposeState(state);

      // 2. free-running in NHWC: our own outputs fed forward, model output computed as the case describes
      const Bn = nhwc(B);
      let x: tf.Tensor4D = tf.tidy(() => tf.mul(nhwc(x0), plan.initNoiseSigma));
      expect(relErr(toNchwData(x), ref('traj_sample_0'))).toBeLessThanOrEqual(tol);
      state = initialState(plan);
      for (let k = 0; k < plan.timesteps.length; k++) {
        const scaled = scaleModelInput(plan, state, x, k);
        const mo = tf.tidy(() => tf.add(tf.mul(scaled, 0.3), tf.mul(Bn, 0.1 * k)));
        const noise = T.has(`traj_noise_${k}`) ? nhwc(get(`traj_noise_${k}`)) : undefined;
        const r = step(plan, state, mo, k, x, noise && (() => noise));
        free.prev = Math.max(free.prev, relErr(toNchwData(r.prevSample as tf.Tensor4D), ref(`traj_prev_sample_${k}`)));
        if (hasX0) free.x0 = Math.max(free.x0, relErr(toNchwData(r.predOriginal as tf.Tensor4D), ref(`traj_pred_original_${k}`)));
        disposeState(state);
        state = r.state;
        tf.dispose([x, scaled, mo, r.predOriginal, ...(noise ? [noise] : [])]);
        x = r.prevSample as tf.Tensor4D;
      }
      disposeState(state);
      tf.dispose([x, Bn]);
      expect(tf.memory().numTensors).toBe(before);

      const fmt = (o: Record<string, number>) => Object.entries(o).map(([k, v]) => `${k} ${v.toExponential(1)}`).join(', ');
      report.push(`${name.padEnd(16)} sigmas ${T.has('sigmas_10') ? sigmaErr.toExponential(1) : '  -   '} | forced: ${fmt(errs)} | free: ${fmt(free)}`);
      for (const v of [...Object.values(errs), ...Object.values(free)]) expect(v).toBeLessThanOrEqual(tol);
    });
  }
  it('report', () => console.log(`max |ours − diffusers| / max(1, |ref|):\n${report.join('\n')}`));
});
