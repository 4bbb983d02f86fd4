// output.ema_only: with train.ema, the single file holds the EMA average (A1111's "pruned-emaonly" file) even when
// output.export_ema exports the trained weights; the diffusers folder keeps export_ema's weights.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { flattenParams } from '../../src/models/params.js';
import { resolveConfig } from '../../src/train/config.js';
import { exportTrainingCheckpoint } from '../../src/train/export-checkpoint.js';
import { train } from '../../src/train/loop.js';
import { finetuneFilter } from '../../src/train/recipes/finetune.js';
import { config, quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-ema-only-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function unetOf(model: string): Promise<Map<string, Float32Array>> {
  const m = await loadModel(model, { components: ['unet'] });
  try {
    return new Map([...flattenParams(m.unet!.params)].map(([k, t]) => [k, t.dataSync() as Float32Array]));
  } finally {
    disposeModel(m);
  }
}
const same = (a: Float32Array, b: Float32Array) => Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

describe('output.ema_only', () => {
  const ema = { 'train.ema.enabled': true, 'train.ema.decay': 0.9, 'finetune.unet': 'attention', 'train.lr': 1e-3, 'train.max_steps': 2 };

  it('the single file holds the average, the diffusers folder the trained weights (export_ema false)', async () => {
    const out = path.join(tmp, 'ema-only');
    const r = await train('finetune', config('finetune', out, { ...ema, 'output.save_as': 'both', 'output.export_ema': false, 'output.ema_only': true }), quiet);
    expect(r.files).toEqual([path.join(out, 'run'), path.join(out, 'run.safetensors')]);
    const [folder, single] = await Promise.all([unetOf(path.join(out, 'run')), unetOf(path.join(out, 'run.safetensors'))]);
    // the checkpoint's two sets of weights, written by `sdtune convert`'s path
    await exportTrainingCheckpoint(r.checkpoint, path.join(tmp, 'ck-ema.safetensors'));
    await exportTrainingCheckpoint(r.checkpoint, path.join(tmp, 'ck-trained.safetensors'), { ema: false });
    const [avg, trained] = await Promise.all([unetOf(path.join(tmp, 'ck-ema.safetensors')), unetOf(path.join(tmp, 'ck-trained.safetensors'))]);
    const isAttn = finetuneFilter('attention');
    let differ = 0;
    for (const [k, v] of single) {
      expect(same(v, avg.get(k)!), k).toBe(true); // the single file: the EMA average
      expect(same(folder.get(k)!, trained.get(k)!), k).toBe(true); // the folder: the trained weights
      if (isAttn(k) && !same(v, folder.get(k)!)) differ++;
    }
    expect(differ).toBe([...single.keys()].filter(isAttn).length); // the two files do differ where training happened
  });

  it('needs the EMA and a single file; adapters refuse it', () => {
    const base = 'model:\n  path: m\ndata:\n  dir: d\n';
    expect(() => resolveConfig('finetune', `${base}output:\n  ema_only: true\n  save_as: single_file\n`, {}, 'e.yaml')).toThrow(
      'e.yaml:6: output.ema_only is set but train.ema.enabled is false (there is no average to export)',
    );
    expect(() => resolveConfig('finetune', `${base}train:\n  ema:\n    enabled: true\noutput:\n  ema_only: true\n`, {}, 'e.yaml')).toThrow(
      'e.yaml:9: output.ema_only is about the single file, but output.save_as "diffusers" writes none (use single_file or both)',
    );
    expect(() => resolveConfig('lora', `${base}output:\n  ema_only: true\n`, {})).toThrow(/output.ema_only is for full fine-tunes' single files \(lora writes LoRA files/);
    expect(resolveConfig('finetune', `${base}train:\n  ema:\n    enabled: true\noutput:\n  ema_only: true\n  save_as: both\n`, {}).output.ema_only).toBe(true);
  });
});
