/**
 * LoRA recipe: low-rank factors injected into the UNet's (and optionally the text encoder's) attention / feed-forward
 * / conv layers; exported in kohya/A1111 keys with kohya's ss_* metadata (and optionally PEFT/diffusers keys).
 */
import type * as tf from '@tensorflow/tfjs';
import path from 'node:path';
import { type LoraRanks, type LoraTargets, extractLora, injectLora, loraTargetModules, removeLora } from '../../adapters/lora-inject.js';
import { writeLoraKohya, writeLoraPeft } from '../../adapters/lora.js';
import type { LoadedModel } from '../../io/model.js';
import type { TorchGenerator } from '../../runtime/rng.js';
import { type Recipe, encodeWithTextEncoder } from '../recipe.js';

export interface LoraRecipeOptions {
  /** Linear layers and 1x1 convs (kohya network_dim / network_alpha) */
  rank: number;
  alpha: number;
  /** 3x3 convs with targets 'attn+ff+conv' (kohya conv_dim / conv_alpha); default: rank / alpha */
  convRank?: number;
  convAlpha?: number;
  targets: LoraTargets;
  textEncoder: boolean;
  /** text-encoder lr; null = the base lr */
  textEncoderLr?: number | null;
  /** kohya network_dropout: dropout on each LoRA down projection's output while training (default 0) */
  dropout?: number;
  savePrecision: 'fp16' | 'fp32';
  alsoDiffusers: boolean;
  /** kohya ss_* metadata to embed (training settings) */
  metadata?: Record<string, string>;
  gen: TorchGenerator;
  clipSkip?: number;
}

/** Python's str() of a float, as kohya writes `ss_network_alpha` (4 -> "4.0", 0.5 -> "0.5"). */
const pyFloat = (x: number) => (Number.isInteger(x) ? x.toFixed(1) : String(x));

/**
 * kohya's network metadata for these options (train_network.py): ss_network_dim / ss_network_alpha, and for LoCon
 * ss_network_args = json.dumps of the --network_args strings, {"conv_dim": "4", "conv_alpha": "1"}.
 */
export function loraNetworkMetadata(o: Pick<LoraRecipeOptions, 'rank' | 'alpha' | 'convRank' | 'convAlpha' | 'targets'>): Record<string, string> {
  const meta: Record<string, string> = { ss_network_module: 'networks.lora', ss_network_dim: String(o.rank), ss_network_alpha: pyFloat(o.alpha) };
  if (o.targets === 'attn+ff+conv') {
    const args = { conv_dim: String(o.convRank ?? o.rank), conv_alpha: String(o.convAlpha ?? o.alpha) };
    // Python json.dumps separators: ", " and ": "
    meta.ss_network_args = `{${Object.entries(args).map(([k, v]) => `${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(', ')}}`;
  }
  return meta;
}

/** Inject LoRA into the model and describe how it trains and exports. */
export function createLoraRecipe(model: LoadedModel, o: LoraRecipeOptions): Recipe {
  const unetP = model.unet!.params;
  const teP = model.textEncoder!.params;
  const trainables = new Map<string, tf.Variable>();
  const ranks: LoraRanks = { rank: o.rank, alpha: o.alpha, convRank: o.convRank, convAlpha: o.convAlpha };
  for (const [k, v] of injectLora(unetP, loraTargetModules(unetP, 'unet', o.targets), { ...ranks, gen: o.gen, prefix: 'unet' })) {
    trainables.set(`unet.${k}`, v);
  }
  if (o.textEncoder) {
    for (const [k, v] of injectLora(teP, loraTargetModules(teP, 'text_encoder', o.targets), { ...ranks, gen: o.gen, prefix: 'te' })) {
      trainables.set(`text_encoder.${k}`, v);
    }
  }
  // the training forward: LoRA dropout with masks from the run's generator (a resume repeats them); p = 0 draws nothing
  const train = { training: true, rng: o.gen, loraDropout: o.dropout ?? 0 };
  return {
    method: 'lora',
    trainables,
    textEncoderTrainable: o.textEncoder,
    lrFor: (name, factor, baseLr) => (name.startsWith('text_encoder.') && o.textEncoderLr != null ? o.textEncoderLr : baseLr) * factor,
    captionFor: (c) => c,
    encodeIds: (ids) => encodeWithTextEncoder(model, ids, o.clipSkip, o.textEncoder ? train : {}),
    forward: train,
    withInference: (fn) => fn(), // injected factors are applied by linear()/conv2d() in every forward
    async export(dir, name, step) {
      const modules = [...(await extractLora(unetP, 'unet', ranks)), ...(o.textEncoder ? await extractLora(teP, 'text_encoder', ranks) : [])];
      const file = path.join(dir, `${name}.safetensors`);
      const metadata = { ...o.metadata, ...loraNetworkMetadata(o), ss_steps: String(step) };
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
