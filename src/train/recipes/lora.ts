/**
 * LoRA recipe: low-rank factors injected into the UNet's (and optionally the text encoder's) attention / feed-forward
 * / conv layers; exported in kohya/A1111 keys with kohya's ss_* metadata (and optionally PEFT/diffusers keys).
 */
import type * as tf from '@tensorflow/tfjs';
import path from 'node:path';
import { type LoraTargets, extractLora, injectLora, loraTargetModules, removeLora } from '../../adapters/lora-inject.js';
import { writeLoraKohya, writeLoraPeft } from '../../adapters/lora.js';
import type { LoadedModel } from '../../io/model.js';
import type { TorchGenerator } from '../../runtime/rng.js';
import { type Recipe, encodeWithTextEncoder } from '../recipe.js';

export interface LoraRecipeOptions {
  rank: number;
  alpha: number;
  targets: LoraTargets;
  textEncoder: boolean;
  /** text-encoder lr; null = the base lr */
  textEncoderLr?: number | null;
  savePrecision: 'fp16' | 'fp32';
  alsoDiffusers: boolean;
  /** kohya ss_* metadata to embed (training settings) */
  metadata?: Record<string, string>;
  gen: TorchGenerator;
  clipSkip?: number;
}

/** Inject LoRA into the model and describe how it trains and exports. */
export function createLoraRecipe(model: LoadedModel, o: LoraRecipeOptions): Recipe {
  const unetP = model.unet!.params;
  const teP = model.textEncoder!.params;
  const trainables = new Map<string, tf.Variable>();
  for (const [k, v] of injectLora(unetP, loraTargetModules(unetP, 'unet', o.targets), { rank: o.rank, alpha: o.alpha, gen: o.gen, prefix: 'unet' })) {
    trainables.set(`unet.${k}`, v);
  }
  if (o.textEncoder) {
    for (const [k, v] of injectLora(teP, loraTargetModules(teP, 'text_encoder', o.targets), { rank: o.rank, alpha: o.alpha, gen: o.gen, prefix: 'te' })) {
      trainables.set(`text_encoder.${k}`, v);
    }
  }
  return {
    method: 'lora',
    trainables,
    textEncoderTrainable: o.textEncoder,
    lrFor: (name, factor, baseLr) => (name.startsWith('text_encoder.') && o.textEncoderLr != null ? o.textEncoderLr : baseLr) * factor,
    captionFor: (c) => c,
    encodeIds: (ids) => encodeWithTextEncoder(model, ids, o.clipSkip),
    withInference: (fn) => fn(), // injected factors are applied by linear()/conv2d() in every forward
    async export(dir, name, step) {
      const modules = [...(await extractLora(unetP, 'unet', o.alpha)), ...(o.textEncoder ? await extractLora(teP, 'text_encoder', o.alpha) : [])];
      const file = path.join(dir, `${name}.safetensors`);
      const metadata = { ...o.metadata, ss_network_dim: String(o.rank), ss_network_alpha: String(o.alpha), ss_steps: String(step) };
      await writeLoraKohya(file, modules, { metadata, half: o.savePrecision === 'fp16' });
      const files = [file];
      if (o.alsoDiffusers) {
        const peft = path.join(dir, `${name}.diffusers`, 'pytorch_lora_weights.safetensors');
        await writeLoraPeft(peft, modules, { half: o.savePrecision === 'fp16' });
        files.push(peft);
      }
      return files;
    },
    dispose() {
      removeLora(unetP);
      removeLora(teP);
    },
  };
}
