// Every kind of training step runs on wasm (the CPU default) with the kernels sdtune registers, and gives the cpu
// backend's gradients: LoCon on a UNet with 1x1 convolutions (conv_shortcut), full fine-tuning (conv weight
// gradients), and textual inversion through the token table (the gather gradient, UnsortedSegmentSum).
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { injectLora, loraTargetModules } from '../../src/adapters/lora-inject.js';
import { randomParams } from '../../src/models/build.js';
import { clipText, clipTextParamShapes } from '../../src/models/clip-text.js';
import { type ParamTree, disposeParams, flattenParams, leaf, sub, unflattenParams } from '../../src/models/params.js';
import { unetParamShapes } from '../../src/models/unet.js';
import { selectBackend } from '../../src/runtime/backend.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { scheduleFromConfig } from '../../src/schedulers/index.js';
import { SD15_SCHEDULER_CONFIG } from '../../src/models/presets.js';
import { diffusionLoss } from '../../src/train/loss.js';
import { TINY_CLIP, TINY_UNET, relMaxErr } from '../helpers.js';

type Grads = Map<string, Float32Array>;

/**
 * Gradients of one diffusion loss on the named backend. Everything is built from seeds on that backend, so both
 * runs see the same numbers. `method` picks the trainables.
 */
async function gradsOn(backend: 'wasm' | 'cpu', method: 'locon' | 'full' | 'ti'): Promise<{ loss: number; grads: Grads }> {
  await selectBackend(backend);
  const unetP = randomParams(unetParamShapes(TINY_UNET), 11);
  const teP = randomParams(clipTextParamShapes(TINY_CLIP), 12);
  const schedule = scheduleFromConfig({ ...SD15_SCHEDULER_CONFIG });
  const ids = tf.tensor2d([[0, 5, 17, 33, 99, 99, 99, 99, 99, 99, 99, 99]], [1, 12], 'int32');
  const latents = tf.randomNormal([2, 8, 8, 4], 0, 1, 'float32', 13) as tf.Tensor4D;
  const noise = tf.randomNormal([2, 8, 8, 4], 0, 1, 'float32', 14) as tf.Tensor4D;
  const timesteps = Int32Array.from([120, 730]);
  let tree: ParamTree = unetP;
  let vars: tf.Variable[] = [];
  const names: string[] = [];
  if (method === 'locon') {
    const modules = loraTargetModules(unetP, 'unet', 'attn+ff+conv');
    expect(modules.some((m) => m.endsWith('conv_shortcut'))).toBe(true); // a 1x1 convolution is adapted
    // kohya LoCon: 3x3 convs (conv1/conv2, down/upsamplers) at conv rank 3, everything else at rank 2
    const v = injectLora(unetP, modules, { rank: 2, alpha: 2, convRank: 3, convAlpha: 1, gen: new TorchGenerator(3) });
    expect(v.get('down_blocks.0.downsamplers.0.conv.lora_down.weight')!.shape).toEqual([3, 3, 32, 3]);
    expect(v.get('down_blocks.1.resnets.0.conv_shortcut.lora_down.weight')!.shape).toEqual([32, 2]);
    // lora_up starts at zero, where the down factors get no gradient: move it off zero, the same on both backends
    for (const [k, x] of v) if (k.endsWith('lora_up.weight')) x.assign(tf.randomNormal(x.shape, 0, 0.1, 'float32', k.length));
    for (const [k, x] of v) (names.push(k), vars.push(x));
  } else if (method === 'full') {
    const flat = new Map<string, tf.Variable>();
    for (const [k, t] of flattenParams(unetP)) flat.set(k, tf.variable(t, true));
    disposeParams(unetP);
    tree = unflattenParams(flat);
    for (const [k, x] of flat) (names.push(k), vars.push(x));
  } else {
    const table = leaf(sub(teP, 'text_model', 'embeddings', 'token_embedding'), 'weight');
    const tv = tf.variable(table, true);
    sub(teP, 'text_model', 'embeddings', 'token_embedding').weight = tv;
    table.dispose();
    names.push('token_embedding');
    vars = [tv];
  }
  const before = tf.memory().numTensors;
  const { value, grads } = tf.variableGrads(() => {
    const context = tf.tile(clipText(teP, TINY_CLIP, ids).hidden, [2, 1, 1]) as tf.Tensor3D;
    return diffusionLoss(tree, TINY_UNET, schedule, { latents, noise, timesteps, context }, { predictionType: 'epsilon' });
  }, vars);
  const out: Grads = new Map();
  for (const [i, v] of vars.entries()) out.set(names[i], (await grads[v.name].data()) as Float32Array);
  const loss = (await value.data())[0];
  tf.dispose([value, ...Object.values(grads)]);
  expect(tf.memory().numTensors).toBe(before); // the step leaks nothing
  tf.dispose([ids, latents, noise, ...vars]);
  disposeParams(tree);
  disposeParams(teP);
  return { loss, grads: out };
}


describe('training steps on wasm equal the cpu reference', () => {
  let backend: string;
  beforeAll(() => {
    backend = process.env.SDTUNE_TEST_BACKEND ?? 'cpu';
  });
  afterAll(async () => {
    await selectBackend(backend);
  });

  for (const method of ['locon', 'full', 'ti'] as const) {
    it(`${method}: loss and every gradient`, async () => {
      const w = await gradsOn('wasm', method);
      const c = await gradsOn('cpu', method);
      expect(Math.abs(w.loss - c.loss)).toBeLessThanOrEqual(1e-5 * Math.abs(c.loss));
      let worst = 0;
      let nonzero = 0;
      for (const [k, g] of c.grads) {
        worst = Math.max(worst, relMaxErr(w.grads.get(k)!, g));
        if (g.some((x) => x !== 0)) nonzero++;
      }
      console.log(`${method}: ${c.grads.size} gradients, worst relative error ${worst.toExponential(2)}`);
      expect(nonzero).toBeGreaterThan(c.grads.size / 2); // real gradients, not zeros on both sides
      expect(worst).toBeLessThanOrEqual(2e-5); // a few float32 ulps of the largest entry, over sums of up to ~10^3 terms
    });
  }
});
