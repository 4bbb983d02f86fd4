// The training loop on the bundled tiny model and datasets (no reference data needed: runs on a fresh clone).
import * as tf from '@tensorflow/tfjs';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { readEmbedding } from '../../src/adapters/embeddings.js';
import { readLora } from '../../src/adapters/lora.js';
import { injectLora } from '../../src/adapters/lora-inject.js';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { readEventFile } from '../../src/io/tensorboard.js';
import { leaf, sub } from '../../src/models/params.js';
import { TorchGenerator, randnNHWC } from '../../src/runtime/rng.js';
import { scheduleFromConfig } from '../../src/schedulers/index.js';
import { diffusionLoss } from '../../src/train/loss.js';
import { train } from '../../src/train/loop.js';
import { captionIds, encodeWithTextEncoder } from '../../src/train/recipe.js';
import { MODEL, config, quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-train-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('training loop (bundled tiny model)', () => {
  it('6 steps straight == 3 steps + resume 3 (losses and weights); TensorBoard read back', async () => {
    const a = path.join(tmp, 'straight');
    const b = path.join(tmp, 'resumed');
    const full = await train('lora', config('lora', a, { 'train.max_steps': 6, 'train.gradient_accumulation': 2, 'train.min_snr_gamma': 5, 'train.noise_offset': 0.05 }), quiet);
    expect(full.losses).toHaveLength(6);
    const first = await train('lora', config('lora', b, { 'train.max_steps': 3, 'train.gradient_accumulation': 2, 'train.min_snr_gamma': 5, 'train.noise_offset': 0.05 }), quiet);
    const rest = await train('lora', config('lora', b, { 'train.max_steps': 6, 'train.gradient_accumulation': 2, 'train.min_snr_gamma': 5, 'train.noise_offset': 0.05 }), { ...quiet, resume: b });
    expect([...first.losses, ...rest.losses]).toEqual(full.losses);
    const wa = await SafetensorsFile.open(path.join(a, 'run.safetensors'));
    const wb = await SafetensorsFile.open(path.join(b, 'run.safetensors'));
    expect(wb.keys().sort()).toEqual(wa.keys().sort());
    for (const k of wa.keys()) expect(Array.from((await wb.read(k)).data)).toEqual(Array.from((await wa.read(k)).data));
    await Promise.all([wa.close(), wb.close()]);
    // TensorBoard: the loss of every step is in the event file
    const logs = path.join(a, 'logs');
    const events = await readEventFile(path.join(logs, readdirSync(logs)[0]));
    const logged = events.flatMap((e) => (e.values ?? []).filter((v) => v.tag === 'loss').map((v) => [e.step, v.simpleValue!]));
    expect(logged.map(([s]) => s)).toEqual([1, 2, 3, 4, 5, 6]);
    logged.forEach(([, v], i) => expect(v).toBeCloseTo(full.losses[i], 5));
    expect(events.some((e) => e.values?.some((v) => v.tag === 'lr'))).toBe(true);
  });

  it('LoRA learns: the loss on a fixed evaluation batch goes down; the export has kohya keys and loads', async () => {
    const out = path.join(tmp, 'learn');
    const m = await loadModel(MODEL);
    try {
      // fixed evaluation batch: latents of two training-like images (random but fixed), fixed noise and timesteps
      const g = new TorchGenerator(123);
      const latents = randnNHWC(g, [2, 4, 8, 8]);
      const noise = randnNHWC(g, [2, 4, 8, 8]);
      const timesteps = Int32Array.from([200, 700]);
      const ids = captionIds(m, ['a red circle, outlined style', 'a blue square, outlined style']);
      const schedule = scheduleFromConfig(m.schedulerConfig);
      const evalLoss = () =>
        tf.tidy(() => diffusionLoss(m.unet!.params, m.unet!.config, schedule, { latents, noise, timesteps, context: encodeWithTextEncoder(m, ids) }, { predictionType: 'epsilon' }).dataSync()[0]);
      const before = evalLoss();
      const r = await train('lora', config('lora', out, { 'train.max_steps': 30, 'lora.targets': 'attn+ff' }), quiet);
      // apply the exported LoRA to the base model and evaluate the same batch
      const lora = await readLora(path.join(out, 'run.safetensors'), { unet: m.unet!.params, textEncoder: m.textEncoder!.params });
      expect(lora.format).toBe('kohya');
      expect(lora.modules.every((mod) => mod.component === 'unet')).toBe(true);
      expect(lora.metadata.ss_network_dim).toBe('4');
      const { mergeLora } = await import('../../src/adapters/lora.js');
      const restore = mergeLora({ unet: m.unet!.params, textEncoder: m.textEncoder!.params }, lora, 1);
      const after = evalLoss();
      restore();
      console.log(`LoRA learning: eval loss ${before.toFixed(4)} -> ${after.toFixed(4)}; training losses ${r.losses[0].toFixed(4)} .. ${r.losses.at(-1)!.toFixed(4)}`);
      expect(after).toBeLessThan(before);
      tf.dispose([latents, noise, ids]);
    } finally {
      disposeModel(m);
    }
  });

  it('textual inversion: only the new rows train; A1111 and diffusers exports load with their vectors', async () => {
    const out = path.join(tmp, 'ti');
    const r = await train('textual_inversion', config('textual_inversion', out, { 'train.max_steps': 4 }), quiet);
    expect(r.files.map((f) => path.basename(f)).sort()).toEqual(['run.diffusers.safetensors', 'run.safetensors']);
    const a1111 = await readEmbedding(path.join(out, 'run.safetensors'));
    expect(a1111.token).toBe('run');
    expect(a1111.vectors.shape).toEqual([2, 32]);
    const diff = await readEmbedding(path.join(out, 'run.diffusers.safetensors'));
    expect(Array.from(diff.vectors.data)).toEqual(Array.from(a1111.vectors.data));
    // the vectors moved away from their init word's embedding, and the base model file is untouched by training
    const m = await loadModel(MODEL);
    try {
      const table = leaf(sub(m.textEncoder!.params, 'text_model', 'embeddings', 'token_embedding'), 'weight');
      const starId = m.tokenizer!.encodeIds('star')[0];
      const init = tf.tidy(() => table.slice([starId, 0], [1, -1]).dataSync());
      expect(Array.from(a1111.vectors.data.slice(0, 32))).not.toEqual(Array.from(init));
    } finally {
      disposeModel(m);
    }
  });

  it('a diverging run (lr 1e30) stops as diverged, names the last good checkpoint and leaves the checkpoints intact', async () => {
    const out = path.join(tmp, 'nan');
    await train('lora', config('lora', out, { 'train.max_steps': 2, 'output.save_every': 1 }), quiet);
    const before = readdirSync(path.join(out, 'checkpoints'));
    const e = await train('lora', config('lora', out, { 'train.max_steps': 6, 'train.lr': 1e30, 'train.max_grad_norm': 0 }), { ...quiet, resume: out }).catch((x: Error) => x);
    expect((e as SdtuneError).kind).toBe('diverged');
    expect((e as Error).message).toMatch(/^training diverged at step \d+: (the loss became|the gradient norm became|.* has (non-finite|values up to))/);
    expect((e as Error).message).toContain(`the last good checkpoint is ${path.join(out, 'checkpoints', 'step-000002')}`);
    expect(readdirSync(path.join(out, 'checkpoints'))).toEqual(before);
  });

  it('injected LoRA starts at the base model (up = 0)', async () => {
    const m = await loadModel(MODEL, { components: ['unet'] });
    try {
      const x = tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 1) as tf.Tensor4D;
      const ctx = tf.randomNormal([1, 77, 32], 0, 1, 'float32', 2) as tf.Tensor3D;
      const { unet } = await import('../../src/models/unet.js');
      const a = unet(m.unet!.params, m.unet!.config, x, 500, ctx).dataSync();
      injectLora(m.unet!.params, ['down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', 'down_blocks.0.resnets.0.conv1'], { rank: 2, alpha: 1, gen: new TorchGenerator(0) });
      const b = unet(m.unet!.params, m.unet!.config, x, 500, ctx).dataSync();
      expect(Array.from(b)).toEqual(Array.from(a));
      tf.dispose([x, ctx]);
    } finally {
      disposeModel(m);
    }
  });
});
