// lora.dropout (kohya network_dropout) in training on the bundled tiny model: p = 0 is the plain step bit for bit,
// p > 0 changes what trains (UNet and text encoder), and a resumed run repeats its masks exactly.
import * as tf from '@tensorflow/tfjs';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { injectLora, loraTargetModules, removeLora } from '../../src/adapters/lora-inject.js';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { scheduleFromConfig } from '../../src/schedulers/index.js';
import { type LossOptions, diffusionLoss } from '../../src/train/loss.js';
import { train } from '../../src/train/loop.js';
import { captionIds } from '../../src/train/recipe.js';
import { createLoraRecipe } from '../../src/train/recipes/lora.js';
import { MODEL, config, quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-lora-dropout-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function tensorsOf(file: string): Promise<Map<string, Float32Array>> {
  const f = await SafetensorsFile.open(file);
  try {
    const out = new Map<string, Float32Array>();
    for (const k of f.keys()) out.set(k, (await f.readFloat(k)).data as Float32Array);
    return out;
  } finally {
    await f.close();
  }
}
const same = (a: Float32Array, b: Float32Array) => Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

describe('LoRA dropout in training (bundled tiny model)', () => {
  it('the UNet step: dropout 0 in training mode is the plain step bit for bit (loss and every gradient); 0.5 is not', async () => {
    const m = await loadModel(MODEL, { components: ['unet'] });
    const p = m.unet!.params;
    const vars = [...injectLora(p, loraTargetModules(p, 'unet', 'attn'), { rank: 4, alpha: 4, gen: new TorchGenerator(0) }).values()];
    vars.forEach((v, i) => v.name.includes('lora_up') && tf.tidy(() => v.assign(tf.randomNormal(v.shape, 0, 0.05, 'float32', i))));
    const schedule = scheduleFromConfig(m.schedulerConfig);
    const b = {
      latents: tf.randomNormal([2, 8, 8, 4], 0, 1, 'float32', 1) as tf.Tensor4D,
      noise: tf.randomNormal([2, 8, 8, 4], 0, 1, 'float32', 2) as tf.Tensor4D,
      timesteps: Int32Array.of(100, 700),
      context: tf.randomNormal([2, 77, 32], 0, 1, 'float32', 3) as tf.Tensor3D,
    };
    const step = (forward?: LossOptions['forward']) => {
      const { value, grads } = tf.variableGrads(() => diffusionLoss(p, m.unet!.config, schedule, b, { predictionType: 'epsilon', forward }), vars);
      const out = { loss: value.dataSync()[0], grads: vars.map((v) => grads[v.name].dataSync() as Float32Array) };
      tf.dispose([value, ...Object.values(grads)]);
      return out;
    };
    const plain = step();
    const gen = new TorchGenerator(5);
    const zero = step({ training: true, rng: gen, loraDropout: 0 });
    expect(gen.getState()).toEqual(new TorchGenerator(5).getState()); // p = 0 draws nothing
    expect(zero.loss).toBe(plain.loss);
    zero.grads.forEach((g, i) => expect(same(g, plain.grads[i]), vars[i].name).toBe(true));
    const half = step({ training: true, rng: new TorchGenerator(5), loraDropout: 0.5 });
    expect(half.loss).not.toBe(plain.loss);
    tf.dispose([b.latents, b.noise, b.context]);
    removeLora(p);
    disposeModel(m);
  });

  it('the text encoder: the recipe encodes captions with dropout when its LoRA trains', async () => {
    const m = await loadModel(MODEL);
    const encode = (dropout: number) => {
      const r = createLoraRecipe(m, { rank: 4, alpha: 4, targets: 'attn', textEncoder: true, dropout, savePrecision: 'fp32', alsoDiffusers: false, gen: new TorchGenerator(1) });
      for (const [k, v] of r.trainables) if (k.startsWith('text_encoder.') && k.includes('lora_up')) tf.tidy(() => v.assign(tf.randomNormal(v.shape, 0, 0.3, 'float32', 9)));
      const ids = captionIds(m, ['a red circle']);
      const h = tf.tidy(() => r.encodeIds(ids).dataSync() as Float32Array);
      ids.dispose();
      r.dispose();
      return h;
    };
    const [a, b, c] = [encode(0), encode(0), encode(0.5)];
    expect(same(a, b)).toBe(true);
    expect(same(a, c)).toBe(false);
    disposeModel(m);
  });

  it('lora.dropout changes the trained LoRA; 1 step + resume 1 == 2 steps with dropout, the text encoder too', async () => {
    const o = { 'lora.dropout': 0.3, 'lora.text_encoder': true, 'output.save_precision': 'fp32' };
    const straight = path.join(tmp, 'straight');
    const resumed = path.join(tmp, 'resumed');
    const plain = path.join(tmp, 'plain');
    await train('lora', await config('lora', straight, { ...o, 'train.max_steps': 2 }), quiet);
    await train('lora', await config('lora', resumed, { ...o, 'train.max_steps': 1 }), quiet);
    await train('lora', await config('lora', resumed, { ...o, 'train.max_steps': 2 }), { ...quiet, resume: resumed });
    await train('lora', await config('lora', plain, { ...o, 'lora.dropout': 0, 'train.max_steps': 2 }), quiet);
    const [a, b, p] = await Promise.all([straight, resumed, plain].map((d) => tensorsOf(path.join(d, 'run.safetensors'))));
    expect([...a.keys()].some((k) => k.startsWith('lora_te_'))).toBe(true);
    let differs = 0;
    for (const [k, v] of a) {
      expect(same(v, b.get(k)!), k).toBe(true);
      if (!same(v, p.get(k)!)) differs++;
    }
    expect(differs).toBeGreaterThan(a.size / 2); // factors, not alphas
  });
});
