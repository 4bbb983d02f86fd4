// Gradient checkpointing on the bundled tiny SD v1 model: the same gradients as the plain taped forward (LoRA,
// full fine-tuning with conv weights, the context gradient of textual inversion), no leaks, and a lower peak.
import * as tf from '@tensorflow/tfjs';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { injectLora, loraTargetModules, removeLora } from '../../src/adapters/lora-inject.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { type ParamTree, flattenParams, unflattenParams } from '../../src/models/params.js';
import { type UNetOptions, unet } from '../../src/models/unet.js';
import { measurePeak } from '../../src/runtime/memory.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { relMaxErr } from '../helpers.js';
import { type Schedule, scheduleFromConfig } from '../../src/schedulers/index.js';
import { type Method, resolveConfig } from '../../src/train/config.js';
import { type DiffusionBatch, diffusionLoss } from '../../src/train/loss.js';
import { train } from '../../src/train/loop.js';

const ROOT = path.join(import.meta.dirname, '../..');
const MODEL = path.join(ROOT, 'checkpoints/tiny-sd-v1');

/** A seeded batch at latent size `hw` with a [B,77,32] context (the tiny model's cross-attention width). */
function makeBatch(b: number, hw: number, seed: number): DiffusionBatch {
  return {
    latents: tf.randomNormal([b, hw, hw, 4], 0, 1, 'float32', seed) as tf.Tensor4D,
    noise: tf.randomNormal([b, hw, hw, 4], 0, 1, 'float32', seed + 1) as tf.Tensor4D,
    timesteps: Int32Array.from({ length: b }, (_, i) => 100 + 350 * i),
    context: tf.randomNormal([b, 77, 32], 0, 1, 'float32', seed + 2) as tf.Tensor3D,
  };
}
const disposeBatch = (b: DiffusionBatch) => tf.dispose([b.latents, b.noise, b.context]);


type Policy = UNetOptions['gradientCheckpointing'];

/** Loss and gradients of `vars` for one batch, with or without checkpointing. */
function step(params: ParamTree, m: LoadedModel, schedule: Schedule, b: DiffusionBatch, vars: tf.Variable[], ck: Policy) {
  const { value, grads } = tf.variableGrads(
    () => diffusionLoss(params, m.unet!.config, schedule, b, { predictionType: 'epsilon', gradientCheckpointing: ck }),
    vars,
  );
  const out = { loss: value.dataSync()[0], grads: vars.map((v) => grads[v.name].dataSync() as Float32Array) };
  tf.dispose([value, ...Object.values(grads)]);
  return out;
}

/**
 * Both runs' losses equal and every gradient within 1e-5 of its largest entry; returns the worst ratio for the log.
 * The recomputed forward is the same arithmetic, but the backward sums each residual's gradient contributions in
 * another order (segment by segment), and float32 rounding of those sums grows through the depth of the net:
 * measured up to 2e-6 on wasm (XNNPACK), below 1e-6 on cpu. A wrong gradient is off by O(1).
 */
function expectSameGrads(a: ReturnType<typeof step>, b: ReturnType<typeof step>): number {
  expect(Math.abs(a.loss - b.loss)).toBeLessThanOrEqual(1e-6 * Math.abs(b.loss));
  let worst = 0;
  for (let i = 0; i < a.grads.length; i++) worst = Math.max(worst, relMaxErr(a.grads[i], b.grads[i]));
  expect(worst).toBeLessThanOrEqual(1e-5);
  // not a vacuous match: all but a few are non-zero (the mid block's self-attention over one token has no q/k gradient)
  const zero = b.grads.filter((g) => !g.some((v) => v !== 0)).length;
  expect(zero).toBeLessThanOrEqual(0.02 * b.grads.length);
  return worst;
}

describe('gradient checkpointing (tiny SD v1)', () => {
  let m: LoadedModel;
  let schedule: Schedule;
  beforeAll(async () => {
    m = await loadModel(MODEL, { components: ['unet'] });
    schedule = scheduleFromConfig(m.schedulerConfig);
  });
  afterAll(() => disposeModel(m));

  it('LoRA (attn+ff): the same loss and factor gradients with either policy; the step leaks nothing', async () => {
    const p = m.unet!.params;
    const lora = injectLora(p, loraTargetModules(p, 'unet', 'attn+ff'), { rank: 4, alpha: 4, gen: new TorchGenerator(0) });
    try {
      // up factors start at 0 (no gradient reaches the down factors): give them values
      let seed = 10;
      for (const [k, v] of lora) if (k.endsWith('lora_up.weight')) v.assign(tf.randomNormal(v.shape, 0, 0.05, 'float32', seed++));
      const vars = [...lora.values()];
      const b = makeBatch(2, 8, 1);
      const plain = step(p, m, schedule, b, vars, false);
      for (const policy of [true, 'all'] as const) {
        const before = tf.memory().numTensors;
        const { result: ck, netBytes } = await measurePeak(() => step(p, m, schedule, b, vars, policy));
        expect(tf.memory().numTensors).toBe(before);
        expect(netBytes).toBe(0);
        console.log(`LoRA attn+ff (${vars.length} factors), checkpointing ${policy}: worst relative gradient difference ${expectSameGrads(ck, plain).toExponential(2)}`);
      }
      disposeBatch(b);
    } finally {
      removeLora(p);
    }
  });

  it('full fine-tuning (every UNet weight a variable, conv kernels included): the same gradients', async () => {
    // conv kernel gradients need Conv2DBackpropFilter, which stock wasm lacks: run this one on cpu there
    const backend = tf.getBackend();
    const hasFilterGrad = tf.getKernel('Conv2DBackpropFilter', backend) !== undefined;
    if (!hasFilterGrad) await tf.setBackend('cpu');
    const local = hasFilterGrad ? m : await loadModel(MODEL, { components: ['unet'] });
    const vars = new Map([...flattenParams(local.unet!.params)].map(([k, t]) => [k, tf.variable(t, true, `ft-test/${k}`)]));
    try {
      const params = unflattenParams(vars);
      const list = [...vars.values()];
      expect(list.some((v) => v.rank === 4 && v.shape[0] === 3)).toBe(true);
      const b = makeBatch(1, 8, 5);
      const plain = step(params, local, schedule, b, list, false);
      const ck = step(params, local, schedule, b, list, 'all'); // every site: samplers and the output stage too
      console.log(`full fine-tuning (${list.length} tensors): worst relative gradient difference ${expectSameGrads(ck, plain).toExponential(2)}`);
      disposeBatch(b);
    } finally {
      tf.dispose([...vars.values()]);
      if (!hasFilterGrad) {
        disposeModel(local);
        await tf.setBackend(backend);
      }
    }
  });

  it('the gradient with respect to the context (textual inversion path) is the same; inference is unchanged', () => {
    const p = m.unet!.params;
    const b = makeBatch(2, 8, 7);
    const e = tf.engine();
    const ctxGrad = (ck: Policy) =>
      tf.tidy(() => {
        const f = (c: tf.Tensor) => tf.sum(tf.square(unet(p, m.unet!.config, b.latents, tf.tensor1d(b.timesteps, 'int32'), c as tf.Tensor3D, { gradientCheckpointing: ck })));
        return e.gradients(() => f(b.context) as tf.Scalar, [b.context]).grads[0];
      });
    const plain = ctxGrad(false);
    const ck = ctxGrad('all');
    // without a tape checkpointing is a plain call: the same output, bit for bit
    const fwd = (ck: Policy) => tf.tidy(() => Array.from(unet(p, m.unet!.config, b.latents, 500, b.context, { gradientCheckpointing: ck }).dataSync()));
    expect(fwd('all')).toEqual(fwd(false));
    const pd = plain.dataSync() as Float32Array;
    expect(pd.some((v) => v !== 0)).toBe(true);
    expect(relMaxErr(ck.dataSync() as Float32Array, pd)).toBeLessThanOrEqual(1e-6);
    tf.dispose([plain, ck]);
    disposeBatch(b);
  });

  it('a lower unique-bytes peak where activations dominate (LoRA attn, latent 16x16, batch 2)', async () => {
    const p = m.unet!.params;
    const lora = injectLora(p, loraTargetModules(p, 'unet', 'attn'), { rank: 4, alpha: 4, gen: new TorchGenerator(0) });
    try {
      const vars = [...lora.values()];
      const b = makeBatch(2, 16, 3);
      const plain = await measurePeak(() => step(p, m, schedule, b, vars, false));
      const dense = await measurePeak(() => step(p, m, schedule, b, vars, true));
      const all = await measurePeak(() => step(p, m, schedule, b, vars, 'all'));
      const mb = (x: number) => (x / 2 ** 20).toFixed(2);
      console.log(`peak above the weights: ${mb(plain.peakBytes)} MB plain, ${mb(dense.peakBytes)} MB checkpointing true, ${mb(all.peakBytes)} MB 'all'`);
      expect(dense.peakBytes).toBeLessThan(0.5 * plain.peakBytes);
      expect(all.peakBytes).toBeLessThan(dense.peakBytes);
      disposeBatch(b);
    } finally {
      removeLora(p);
    }
  });
});

describe('train() with train.gradient_checkpointing', () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-ckpt-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));
  const run = (method: Method, ck: boolean) => {
    const extra = method === 'lora' ? { 'lora.rank': 4, 'lora.alpha': 4, 'train.lr': 1e-3 } : { 'textual_inversion.token': '<my-logo>', 'textual_inversion.init_word': 'star' };
    const c = resolveConfig(method, null, {
      'model.path': MODEL, 'data.dir': path.join(ROOT, method === 'lora' ? 'datasets/shapes' : 'datasets/logo'), 'data.resolution': 64,
      'train.batch_size': 2, 'train.seed': 7, 'train.max_steps': 3, 'train.gradient_checkpointing': ck, 'output.dir': path.join(tmp, `${method}-${ck}`), 'output.name': 'run', ...extra,
    });
    return train(method, c, { quiet: true, log: () => {} });
  };

  for (const method of ['lora', 'textual_inversion'] as const) {
    it(`${method}: the same loss curve as without it`, async () => {
      const plain = await run(method, false);
      const ck = await run(method, true);
      expect(ck.losses).toHaveLength(3);
      ck.losses.forEach((l, i) => expect(Math.abs(l - plain.losses[i])).toBeLessThanOrEqual(1e-5 * Math.abs(plain.losses[i])));
    });
  }
});
