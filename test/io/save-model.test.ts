// Writing a model held in memory (saveModel) and streaming safetensors writes (lazy tensors), on the bundled tiny model.
import * as tf from '@tensorflow/tfjs';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { injectLora } from '../../src/adapters/lora-inject.js';
import { saveModel } from '../../src/io/convert.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { type LazyTensor, SafetensorsFile, type WritableTensor, f16BitsToF32, f32ToF16Bits, writeSafetensors } from '../../src/io/safetensors.js';
import { type ParamTree, flattenParams, leaf, sub } from '../../src/models/params.js';
import { TorchGenerator } from '../../src/runtime/rng.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MODEL = path.join(ROOT, 'checkpoints/tiny-sd-v1');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-save-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Every parameter of a loaded model, host-side, by component and diffusers key. */
function hostParams(m: LoadedModel): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const [c, part] of [['unet', m.unet], ['vae', m.vae], ['text_encoder', m.textEncoder]] as const) {
    for (const [k, t] of flattenParams(part!.params)) out.set(`${c}/${k}`, t.dataSync() as Float32Array);
  }
  return out;
}

describe('saveModel: weights in memory -> diffusers folder / single file', () => {
  it('fp32 diffusers folder and single file load back bit-identical, with configs, scheduler and tokenizer', async () => {
    const m = await loadModel(MODEL);
    try {
      // change a weight in memory, as training does: what is saved is the current value, not the file's
      const node = sub(m.unet!.params, 'down_blocks', '0', 'resnets', '0', 'conv1') as ParamTree & { weight: tf.Tensor };
      const changed = tf.mul(leaf(node, 'weight'), 2);
      leaf(node, 'weight').dispose();
      node.weight = changed;
      const ref = hostParams(m);
      for (const out of [path.join(tmp, 'folder'), path.join(tmp, 'single.safetensors')]) {
        const r = await saveModel(m, out);
        expect(r.layout).toBe(out.endsWith('.safetensors') ? 'single-file' : 'diffusers');
        expect(r.tokenizer).toBe(path.join(MODEL, 'tokenizer'));
        const back = await loadModel(out);
        try {
          const got = hostParams(back);
          expect([...got.keys()].sort()).toEqual([...ref.keys()].sort());
          for (const [k, v] of ref) expect(Buffer.compare(Buffer.from(got.get(k)!.buffer), Buffer.from(v.buffer)), k).toBe(0);
          expect(back.unet!.config).toEqual(m.unet!.config);
          expect(back.schedulerConfig).toEqual(m.schedulerConfig);
          expect(back.tokenizer!.encodeIds('a red circle')).toEqual(m.tokenizer!.encodeIds('a red circle'));
        } finally {
          disposeModel(back);
        }
      }
      expect(readdirSync(path.join(tmp, 'folder')).sort()).toEqual(['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']);
    } finally {
      disposeModel(m);
    }
  });

  it('fp16 and bf16: the files hold that dtype and the rounded weights; an existing output or injected LoRA is refused', async () => {
    const m = await loadModel(MODEL);
    try {
      const ref = hostParams(m);
      const f16 = path.join(tmp, 'half.safetensors');
      await saveModel(m, f16, { precision: 'fp16' });
      const f = await SafetensorsFile.open(f16);
      expect(new Set(f.keys().map((k) => f.info(k)!.dtype))).toEqual(new Set(['F16']));
      await f.close();
      const back = await loadModel(f16);
      const got = hostParams(back);
      disposeModel(back);
      for (const [k, v] of ref) expect(Array.from(got.get(k)!), k).toEqual(Array.from(f16BitsToF32(f32ToF16Bits(v))));
      const bf = path.join(tmp, 'bf16');
      await saveModel(m, bf, { precision: 'bf16' });
      const u = await SafetensorsFile.open(path.join(bf, 'unet', 'diffusion_pytorch_model.safetensors'));
      expect(new Set(u.keys().map((k) => u.info(k)!.dtype))).toEqual(new Set(['BF16']));
      await u.close();
      const b2 = await loadModel(bf);
      const gotB = hostParams(b2);
      disposeModel(b2);
      let worst = 0;
      for (const [k, v] of ref) {
        const g = gotB.get(k)!;
        for (let i = 0; i < v.length; i++) worst = Math.max(worst, Math.abs(g[i] - v[i]) / Math.max(Math.abs(v[i]), 1e-30));
      }
      expect(worst).toBeGreaterThan(0); // really rounded
      expect(worst).toBeLessThanOrEqual(2 ** -8); // bfloat16's 8-bit significand
      await expect(saveModel(m, f16)).rejects.toThrow(/already exists and is not empty; refusing to overwrite it/);
      injectLora(m.unet!.params, ['down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'], { rank: 2, alpha: 1, gen: new TorchGenerator(0) });
      await expect(saveModel(m, path.join(tmp, 'with-lora'))).rejects.toThrow(/has LoRA factors injected \(.*lora_(down|up)\.weight\); merge or remove them/);
    } finally {
      disposeModel(m);
    }
  });
});

describe('writeSafetensors with lazy tensors', () => {
  it('loads each tensor only when writing it, one at a time, in the file order; the file reads back', async () => {
    const events: string[] = [];
    let inFlight = 0;
    const lazy = (name: string, n: number) => ({
      shape: [n],
      dtype: 'F32' as const,
      load: async () => {
        inFlight++;
        events.push(`load ${name} (${inFlight} in flight)`);
        await new Promise((r) => setTimeout(r, 5));
        inFlight--;
        return Float32Array.from({ length: n }, (_, i) => i + n);
      },
    });
    const file = path.join(tmp, 'lazy.safetensors');
    await writeSafetensors(file, new Map<string, WritableTensor | LazyTensor>([['b', lazy('b', 3)], ['a', lazy('a', 2)], ['c', { shape: [1], data: Float32Array.from([7]) }]]));
    expect(events).toEqual(['load a (1 in flight)', 'load b (1 in flight)']); // sorted by name, as the header
    const f = await SafetensorsFile.open(file);
    expect(Array.from((await f.read('a')).data)).toEqual([2, 3]);
    expect(Array.from((await f.read('b')).data)).toEqual([3, 4, 5]);
    expect(Array.from((await f.read('c')).data)).toEqual([7]);
    await f.close();
    // a lazy tensor whose data does not match its shape fails, and nothing is left behind
    const bad = path.join(tmp, 'bad-dir');
    mkdirSync(bad);
    writeFileSync(path.join(bad, 'keep.txt'), 'x');
    await expect(writeSafetensors(path.join(bad, 'x.safetensors'), { x: { shape: [4], dtype: 'F32', load: async () => new Float32Array(3) } })).rejects.toThrow(
      /tensor "x" shape \[4\] needs 4 elements but its data has 3/,
    );
    expect(readdirSync(bad)).toEqual(['keep.txt']);
  });
});
