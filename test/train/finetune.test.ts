// Full fine-tuning on the bundled tiny model: what trains, what is exported, and that the export samples.
import * as tf from '@tensorflow/tfjs';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { flattenParams } from '../../src/models/params.js';
import { configOverrides } from '../../src/cli/train-flags.js';
import { loadConfigFile, resolveConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { exportTrainingCheckpoint } from '../../src/train/export-checkpoint.js';
import { finetuneFilter } from '../../src/train/recipes/finetune.js';
import { MODEL, ROOT, config, quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-finetune-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function paramsOf(model: string, component: 'unet' | 'text_encoder'): Promise<Map<string, Float32Array>> {
  const m = await loadModel(model, { components: [component] });
  try {
    const tree = component === 'unet' ? m.unet!.params : m.textEncoder!.params;
    return new Map([...flattenParams(tree)].map(([k, t]) => [k, t.dataSync() as Float32Array]));
  } finally {
    disposeModel(m);
  }
}
const same = (a: Float32Array, b: Float32Array) => Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

describe('full fine-tuning (bundled tiny model)', () => {
  it('trains every UNet parameter, leaves the text encoder and VAE alone, exports a diffusers folder and a single file that load', async () => {
    const out = path.join(tmp, 'all');
    const r = await train('finetune', config('finetune', out, { 'train.max_steps': 2, 'train.lr': 1e-3, 'output.save_as': 'both' }), quiet);
    expect(r.files).toEqual([path.join(out, 'run'), path.join(out, 'run.safetensors')]);
    expect(r.losses.every(Number.isFinite)).toBe(true);
    const base = await paramsOf(MODEL, 'unet');
    const folder = await paramsOf(path.join(out, 'run'), 'unet');
    const single = await paramsOf(path.join(out, 'run.safetensors'), 'unet');
    let changed = 0;
    for (const [k, v] of base) {
      expect(same(folder.get(k)!, single.get(k)!), k).toBe(true); // both exports hold the same trained weights
      if (!same(v, folder.get(k)!)) changed++;
    }
    // AdamW moves every parameter that has a gradient; all of the UNet's do
    expect(changed).toBe(base.size);
    const te = await paramsOf(MODEL, 'text_encoder');
    const teOut = await paramsOf(path.join(out, 'run'), 'text_encoder');
    for (const [k, v] of te) expect(same(v, teOut.get(k)!), k).toBe(true);
  });

  it("finetune.unet: attention trains only the transformers' attention projections", async () => {
    const out = path.join(tmp, 'attention');
    await train('finetune', config('finetune', out, { 'train.max_steps': 1, 'train.lr': 1e-3, 'finetune.unet': 'attention', 'output.save_as': 'single_file' }), quiet);
    const base = await paramsOf(MODEL, 'unet');
    const got = await paramsOf(path.join(out, 'run.safetensors'), 'unet');
    const isAttn = finetuneFilter('attention');
    const moved = [...base].filter(([k, v]) => !same(v, got.get(k)!)).map(([k]) => k);
    expect(moved.length).toBeGreaterThan(0);
    expect(moved.every(isAttn)).toBe(true);
    expect(moved.length).toBe([...base.keys()].filter(isAttn).length);
  });

  it('EMA (train.ema): the export holds the average, resumed exactly from checkpoints; export_ema false exports the trained weights', async () => {
    const ema = { 'train.ema.enabled': true, 'train.ema.decay': 0.9, 'finetune.unet': 'attention', 'output.save_as': 'single_file', 'train.lr': 1e-3 };
    const straight = path.join(tmp, 'ema-straight');
    const resumed = path.join(tmp, 'ema-resumed');
    const plain = path.join(tmp, 'ema-off');
    await train('finetune', config('finetune', straight, { ...ema, 'train.max_steps': 3 }), quiet);
    await train('finetune', config('finetune', resumed, { ...ema, 'train.max_steps': 2 }), quiet);
    expect(readdirSync(path.join(resumed, 'checkpoints', 'step-000002')).sort()).toEqual(['config.resolved.yaml', 'ema.safetensors', 'optimizer.safetensors', 'state.json', 'trainable.safetensors']);
    await train('finetune', config('finetune', resumed, { ...ema, 'train.max_steps': 3 }), { ...quiet, resume: resumed });
    await train('finetune', config('finetune', plain, { ...ema, 'train.max_steps': 3, 'output.export_ema': false }), quiet);
    const [a, b, p] = await Promise.all([straight, resumed, plain].map((d) => paramsOf(path.join(d, 'run.safetensors'), 'unet')));
    const isAttn = finetuneFilter('attention');
    let differs = 0;
    for (const [k, v] of a) {
      expect(same(v, b.get(k)!), k).toBe(true); // 2 steps + resume 1 == 3 steps, EMA included
      if (isAttn(k) && !same(v, p.get(k)!)) differs++; // the average is not the last weights
      if (!isAttn(k)) expect(same(v, p.get(k)!), k).toBe(true); // frozen parameters are the same either way
    }
    expect(differs).toBe([...a.keys()].filter(isAttn).length);
    // `sdtune convert CHECKPOINT OUT`: the base model with the checkpoint's weights, the EMA average by default
    const ck = path.join(straight, 'checkpoints', 'step-000003');
    await exportTrainingCheckpoint(ck, path.join(tmp, 'from-ck-ema.safetensors'));
    await exportTrainingCheckpoint(ck, path.join(tmp, 'from-ck-trained'), { ema: false });
    const [fromEma, fromTrained] = await Promise.all([paramsOf(path.join(tmp, 'from-ck-ema.safetensors'), 'unet'), paramsOf(path.join(tmp, 'from-ck-trained'), 'unet')]);
    for (const [k, v] of a) {
      expect(same(v, fromEma.get(k)!), k).toBe(true);
      expect(same(p.get(k)!, fromTrained.get(k)!), k).toBe(true);
    }
    const lora = await train('lora', config('lora', path.join(tmp, 'lora-ck'), { 'train.max_steps': 1 }), quiet);
    await expect(exportTrainingCheckpoint(lora.checkpoint, path.join(tmp, 'x'))).rejects.toThrow(/is a lora checkpoint: its result is the adapter file exported beside it/);
  });

  it('the bundled configs/finetune.yaml resolves; bf16 and save_as are refused for LoRA; a leak-free step with the text encoder training too (no text cache filling up)', async () => {
    const c = await loadConfigFile('finetune', path.join(ROOT, 'configs/finetune.yaml'), {});
    expect(c.finetune).toEqual({ unet: 'all', text_encoder: false, text_encoder_lr: null });
    expect(c.output.save_as).toBe('both');
    expect(() => resolveConfig('lora', 'model:\n  path: m\ndata:\n  dir: d\noutput:\n  save_precision: bf16\n', {})).toThrow(/bf16 is for full fine-tunes/);
    expect(() => resolveConfig('lora', 'model:\n  path: m\ndata:\n  dir: d\noutput:\n  save_as: both\n', {})).toThrow(/output.save_as is for full fine-tunes/);
    // --train-text-encoder sets the trained method's own key
    expect(resolveConfig('finetune', 'model:\n  path: m\ndata:\n  dir: d\n', configOverrides('finetune', { 'train-text-encoder': true }).overrides).finetune!.text_encoder).toBe(true);
    const counts: number[] = [];
    const before = tf.memory().numTensors;
    await train('finetune', config('finetune', path.join(tmp, 'leak'), { 'train.max_steps': 3, 'data.cache_latents': false, 'finetune.text_encoder': true, 'finetune.text_encoder_lr': 1e-5, 'output.save_as': 'single_file' }), {
      ...quiet,
      onStep: () => counts.push(tf.memory().numTensors),
    });
    expect(new Set(counts).size).toBe(1);
    expect(tf.memory().numTensors).toBe(before);
    expect(readdirSync(path.join(tmp, 'leak', 'checkpoints'))).toEqual(['step-000003']);
  });
});
