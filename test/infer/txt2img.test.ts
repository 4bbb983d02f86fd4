// Whole txt2img pipelines against diffusers, from the seed (torch-compatible RNG), for all eight samplers.
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { generate, toUint8 } from '../../src/infer/pipeline.js';
import { readImageRgb } from '../../src/io/png.js';
import type { SamplerName } from '../../src/schedulers/index.js';
import { caseTensors, describeGolden, golden, goldenCase } from '../golden.js';
import { maxAbsDiff, toNchwData } from '../helpers.js';

const CASES: [string, SamplerName][] = [
  ['ddim', 'ddim'],
  ['pndm', 'pndm'],
  ['lms', 'lms'],
  ['euler', 'euler'],
  ['euler_a', 'euler_a'],
  ['dpmpp2m', 'dpmpp_2m'],
  ['dpmpp2m_karras', 'dpmpp_2m_karras'],
  ['ddpm', 'ddpm'],
];

describeGolden('txt2img vs diffusers StableDiffusionPipeline', () => {
  let m: LoadedModel;
  beforeAll(async () => {
    m = await loadModel(golden('tiny-sd'));
  });
  afterAll(() => disposeModel(m));

  for (const [caseSuffix, sampler] of CASES) {
    it(`${sampler}: timesteps, per-step latents, image and PNG`, async () => {
      const name = `pipe_txt2img_${caseSuffix}`;
      const c = goldenCase(name);
      const call = c.call as Record<string, unknown>;
      const ref = await caseTensors(name);
      const stepErr: number[] = [];
      const before = tf.memory().numTensors;
      const r = await generate(m, {
        prompt: call.prompt as string,
        negativePrompt: call.negative_prompt as string,
        sampler,
        steps: call.num_inference_steps as number,
        cfg: call.guidance_scale as number,
        width: call.width as number,
        height: call.height as number,
        seed: 0,
        onStep: (i, _n, lat) => stepErr.push(maxAbsDiff(toNchwData(lat), ref.get(`latents_after_step_${i}`)!.data)),
      });
      expect(tf.memory().numTensors).toBe(before); // the whole pipeline leaks nothing
      expect(r.timesteps).toEqual((c.timesteps_used as number[]).map(Math.fround));
      const imgErr = maxAbsDiff(r.images[0].data, ref.get('image')!.data);
      const png = await readImageRgb(golden('cases', `${name}.png`));
      const ours = toUint8(r.images[0]);
      const pngErr = maxAbsDiff(ours, png.data);
      console.log(`${sampler}: image max abs err ${imgErr.toExponential(2)}, PNG max diff ${pngErr}/255, latents max err per step ${stepErr.map((e) => e.toExponential(1)).join(' ')}`);
      expect(imgErr).toBeLessThanOrEqual((c.tolerance as { atol_image: number }).atol_image);
      expect(pngErr).toBeLessThanOrEqual(1);
    });
  }
});
