// SD 2 LoRAs: kohya files (`lora_te_text_model_encoder_layers_*` for the OpenCLIP text encoder as diffusers /
// sd-scripts hold it, a CLIPTextModel; `lora_unet_*` with SD 2's linear proj_in) and PEFT files load against an SD 2
// model (tiny-sd2-depth, from the folder and from the OpenCLIP-keyed single file) and merge exactly.
import * as tf from '@tensorflow/tfjs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type LoraModel, mergeLora, readLora } from '../../src/adapters/lora.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { type WritableTensor, writeSafetensors } from '../../src/io/safetensors.js';
import { clipText } from '../../src/models/clip-text.js';
import { type ParamTree, flattenParams } from '../../src/models/params.js';
import { tensorToTorch } from '../../src/io/layout.js';
import { describeGolden, golden } from '../golden.js';
import { maxAbsDiff } from '../helpers.js';

/** Deterministic small values (no RNG needed). */
const values = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(seed * 31.7 + i * 0.91) * 0.1);
const t = (shape: number[], seed: number): WritableTensor => ({ shape, data: values(shape.reduce((a, b) => a * b, 1), seed) });

/** torch-layout host copy of one weight of a params tree. */
async function torchWeight(tree: ParamTree, key: string): Promise<{ shape: number[]; data: Float32Array }> {
  const h = await tensorToTorch(key, flattenParams(tree).get(key)!);
  return { shape: h.shape, data: h.data as Float32Array };
}

describeGolden('SD 2 LoRAs (tiny-sd2-depth)', () => {
  let tmp: string;
  let folder: LoadedModel;
  let single: LoadedModel;
  const KOHYA: Record<string, [string, 'unet' | 'text_encoder', string, number, number]> = {
    // kohya name: component, module, in, out
    lora_te_text_model_encoder_layers_2_self_attn_q_proj: ['lora_te_text_model_encoder_layers_2_self_attn_q_proj', 'text_encoder', 'text_model.encoder.layers.2.self_attn.q_proj', 32, 32],
    lora_te_text_model_encoder_layers_0_mlp_fc1: ['lora_te_text_model_encoder_layers_0_mlp_fc1', 'text_encoder', 'text_model.encoder.layers.0.mlp.fc1', 32, 37],
    lora_unet_down_blocks_0_attentions_0_proj_in: ['lora_unet_down_blocks_0_attentions_0_proj_in', 'unet', 'down_blocks.0.attentions.0.proj_in', 32, 32],
    lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k: ['lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k', 'unet', 'up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k', 32, 32],
  };
  let kohyaFile: string;
  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'sdtune-lora-sd2-'));
    folder = await loadModel(golden('tiny-sd2-depth'));
    single = await loadModel(golden('tiny-sd2-depth.safetensors'), { configDir: golden('tiny-sd2-depth'), components: ['unet', 'text_encoder'] });
    const tensors = new Map<string, WritableTensor>();
    Object.values(KOHYA).forEach(([name, , , inp, out], i) => {
      tensors.set(`${name}.lora_down.weight`, t([4, inp], i));
      tensors.set(`${name}.lora_up.weight`, t([out, 4], i + 10));
      tensors.set(`${name}.alpha`, { shape: [], data: Float32Array.of(2) });
    });
    kohyaFile = path.join(tmp, 'sd2_kohya.safetensors');
    await writeSafetensors(kohyaFile, tensors, { metadata: { ss_v2: 'True', ss_base_model_version: 'sd_v2', ss_network_module: 'networks.lora' } });
  });
  afterAll(async () => {
    disposeModel(folder);
    disposeModel(single);
    await rm(tmp, { recursive: true, force: true });
  });

  it('a kohya SD 2 LoRA resolves to the CLIPTextModel / UNet modules of the folder and of the single file', async () => {
    for (const m of [folder, single]) {
      const lora = await readLora(kohyaFile, { unet: m.unet!.params, textEncoder: m.textEncoder!.params });
      expect(lora.format).toBe('kohya');
      expect(lora.modules.map((x) => `${x.component}:${x.module}`).sort()).toEqual(Object.values(KOHYA).map(([, c, mod]) => `${c}:${mod}`).sort());
      expect(lora.modules.every((x) => x.alpha === 2)).toBe(true);
    }
  });

  it('merges W + m * alpha/r * up @ down exactly into the weights (linear proj_in included), changes the text encoding, restores', async () => {
    const model: LoraModel = { unet: folder.unet!.params, textEncoder: folder.textEncoder!.params };
    const lora = await readLora(kohyaFile, model);
    const ids = tf.tensor2d([[49406, 320, 1125, 49407, 0, 0]], [1, 6], 'int32');
    const before = clipText(folder.textEncoder!.params, folder.textEncoder!.config, ids);
    const w0 = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const x of lora.modules) w0.set(x.module, await torchWeight(x.component === 'unet' ? model.unet! : model.textEncoder!, `${x.module}.weight`));
    const restore = mergeLora(model, lora, 0.5);
    try {
      for (const x of lora.modules) {
        const w = await torchWeight(x.component === 'unet' ? model.unet! : model.textEncoder!, `${x.module}.weight`);
        const [out, inp] = w.shape;
        const want = new Float32Array(out * inp);
        for (let o = 0; o < out; o++)
          for (let i = 0; i < inp; i++) {
            let d = 0;
            for (let r = 0; r < 4; r++) d += x.up.data[o * 4 + r] * x.down.data[r * inp + i];
            want[o * inp + i] = w0.get(x.module)!.data[o * inp + i] + 0.5 * (2 / 4) * d;
          }
        expect(maxAbsDiff(w.data, want), x.module).toBeLessThan(1e-6);
      }
      const after = clipText(folder.textEncoder!.params, folder.textEncoder!.config, ids);
      expect(maxAbsDiff(await after.hidden.data(), await before.hidden.data())).toBeGreaterThan(1e-3);
      tf.dispose([after.hidden, after.hiddenRaw, after.pooled]);
    } finally {
      restore();
    }
    for (const x of lora.modules) {
      const w = await torchWeight(x.component === 'unet' ? model.unet! : model.textEncoder!, `${x.module}.weight`);
      expect(maxAbsDiff(w.data, w0.get(x.module)!.data)).toBe(0);
    }
    tf.dispose([ids, before.hidden, before.hiddenRaw, before.pooled]);
  });

  it('a PEFT SD 2 LoRA (text_encoder.<module>.lora_A/B) loads too; a layer the cut tower lacks is named', async () => {
    const model: LoraModel = { unet: single.unet!.params, textEncoder: single.textEncoder!.params };
    const peft = path.join(tmp, 'sd2_peft.safetensors');
    const k = 'text_encoder.text_model.encoder.layers.1.self_attn.v_proj';
    await writeSafetensors(peft, new Map([[`${k}.lora_A.weight`, t([2, 32], 1)], [`${k}.lora_B.weight`, t([32, 2], 2)]]));
    const lora = await readLora(peft, model);
    expect(lora.modules.map((x) => [x.component, x.module, x.alpha])).toEqual([['text_encoder', 'text_model.encoder.layers.1.self_attn.v_proj', 2]]);
    // a LoRA for the 24-layer tower (layer 23 = OpenCLIP's last, which SD 2 does not use) does not fit silently
    const deep = path.join(tmp, 'sd2_deep.safetensors');
    const n = 'lora_te_text_model_encoder_layers_23_self_attn_q_proj';
    await writeSafetensors(deep, new Map([[`${n}.lora_down.weight`, t([4, 32], 1)], [`${n}.lora_up.weight`, t([32, 4], 2)]]));
    await expect(readLora(deep, model)).rejects.toThrow(/lora_te_text_model_encoder_layers_23_self_attn_q_proj/);
  });
});
