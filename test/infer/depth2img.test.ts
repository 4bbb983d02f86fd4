// Depth-to-image against diffusers' StableDiffusionDepth2ImgPipeline (cases pipe_depth2img, v-prediction, and
// pipe_depth2img_eps), from the diffusers folder and from the single file in the original SD 2 layout.
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { depthCondition } from '../../src/infer/depth.js';
import { generate, toUint8 } from '../../src/infer/pipeline.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { readImageRgb } from '../../src/io/png.js';
import { currentBackend } from '../../src/runtime/backend.js';
import { caseTensors, describeGolden, golden, goldenCase } from '../golden.js';
import { maxAbsDiff, toNchwData } from '../helpers.js';

describeGolden('depth2img vs diffusers', () => {
  let folder: LoadedModel;
  let vaeDonor: LoadedModel;
  let single: LoadedModel;
  let ref: Awaited<ReturnType<typeof caseTensors>>;
  beforeAll(async () => {
    // the folder has no vae/ (README.txt): the case uses tiny-sd's
    vaeDonor = await loadModel(golden('tiny-sd', 'vae'));
    folder = { ...(await loadModel(golden('tiny-sd2-depth'))), vae: vaeDonor.vae };
    single = await loadModel(golden('tiny-sd2-depth.safetensors'), { configDir: golden('tiny-sd2-depth') });
    ref = await caseTensors('pipe_depth2img');
  });
  afterAll(() => {
    disposeModel({ ...folder, vae: undefined });
    disposeModel(vaeDonor);
    disposeModel(single);
  });

  it('loads as a depth model from both layouts: 5 input channels, gelu text encoder, pad "!"', () => {
    for (const m of [folder, single]) {
      expect(m.variant).toBe('depth');
      expect(m.unet!.config.in_channels).toBe(5);
      expect(m.textEncoder!.config.hidden_act).toBe('gelu');
      expect(m.tokenizer!.padTokenId).toBe(0);
      expect(m.schedulerConfig.prediction_type).toBe('v_prediction');
    }
    expect(single.layout).toBe('single-file');
  });

  it('the depth channel: bicubic to 8x8 and [-1, 1] as prepare_depth_map', () => {
    const [, h, w] = ref.get('depth_map')!.shape;
    const d = depthCondition({ data: ref.get('depth_map')!.data as Float32Array, width: w, height: h }, 8, 8);
    const want = ref.get('depth_mask')!.data as Float32Array; // [2,1,8,8]: the same map for both CFG halves
    expect(maxAbsDiff(d, want.subarray(0, 64))).toBeLessThanOrEqual(1e-6);
    expect(maxAbsDiff(d, want.subarray(64))).toBeLessThanOrEqual(1e-6);
    expect([Math.min(...d), Math.max(...d)]).toEqual([-1, 1]);
  });

  /** The case's call with model `m` and `prediction_type`; every step's latents NCHW, the image and the PNG error. */
  const runCase = async (m: LoadedModel, name: 'pipe_depth2img' | 'pipe_depth2img_eps') => {
    const c = goldenCase(name);
    const call = c.call as Record<string, unknown>;
    const want = name === 'pipe_depth2img' ? ref : await caseTensors(name);
    const model = name === 'pipe_depth2img' ? m : { ...m, schedulerConfig: { ...m.schedulerConfig, prediction_type: 'epsilon' } };
    const [, h, w] = ref.get('depth_map')!.shape;
    const lat: Float32Array[] = [];
    const before = tf.memory().numTensors;
    const r = await generate(model, {
      prompt: call.prompt as string,
      negativePrompt: call.negative_prompt as string,
      sampler: 'pndm',
      steps: call.num_inference_steps as number,
      cfg: call.guidance_scale as number,
      strength: call.strength as number,
      seed: 0,
      initImage: { data: ref.get('init_image_nhwc01')!.data as Float32Array, width: 64, height: 64 },
      depthMap: { data: ref.get('depth_map')!.data as Float32Array, width: w, height: h },
      onStep: (_i, _n, l) => lat.push(toNchwData(l)),
    });
    expect(tf.memory().numTensors).toBe(before);
    expect(r.timesteps).toEqual(c.timesteps_used);
    const tol = c.tolerance as { atol_image: number; atol_latents: number };
    const errs = lat.map((l, i) => maxAbsDiff(l, want.get(`latents_after_step_${i}`)!.data));
    const imgErr = maxAbsDiff(r.images[0].data, want.get('image')!.data);
    const png = await readImageRgb(golden('cases', `${name}.png`));
    const pngErr = maxAbsDiff(toUint8(r.images[0]), png.data);
    return { errs, imgErr, pngErr, tol, steps: (c.timesteps_used as number[]).length };
  };

  // the single file's tensors are bit-identical to the folder's (test/io/sd2-loading.test.ts), so on the slow
  // backends (pure-TypeScript cpu: ~2 min a case on a busy 2-core machine; a software WebGPU adapter) only the folder runs
  const slowBackend = () => tf.getBackend() === 'cpu' || (tf.getBackend() === 'webgpu' && currentBackend()?.adapter?.fallback !== false);
  for (const name of ['pipe_depth2img', 'pipe_depth2img_eps'] as const) {
    for (const layout of ['folder', 'single file'] as const) {
      it.skipIf(layout === 'single file' && slowBackend())(`${name} from the ${layout}: every step's latents and the image at the case tolerance`, async () => {
        const { errs, imgErr, pngErr, tol, steps } = await runCase(layout === 'folder' ? folder : single, name);
        console.log(`${name} (${layout}): latents err per step ${errs.map((e) => e.toExponential(1)).join(' ')} (atol ${tol.atol_latents}); image ${imgErr.toExponential(2)} (atol ${tol.atol_image}); PNG ${pngErr}/255`);
        expect(errs.length).toBe(steps);
        for (const e of errs) expect(e).toBeLessThanOrEqual(tol.atol_latents);
        expect(imgErr).toBeLessThanOrEqual(tol.atol_image);
        expect(pngErr).toBeLessThanOrEqual(1);
      });
    }
  }
});
