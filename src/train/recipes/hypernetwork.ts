/**
 * Hypernetwork recipe (A1111 train_hypernetwork): a new hypernetwork (A1111's create_hypernetwork and init) whose
 * MLPs are the only trainable parameters; the UNet forward reads it as its context adapter, in training mode (the
 * multiplier is 1, dropout draws its masks from the run's generator). Exported as A1111 .pt and our safetensors form.
 */
import type * as tf from '@tensorflow/tfjs';
import path from 'node:path';
import {
  type CreateHypernetworkOptions,
  createHypernetwork,
  disposeHypernetwork,
  hypernetworkAdapter,
  hypernetworkData,
  writeHypernetworkPt,
  writeHypernetworkSafetensors,
} from '../../adapters/hypernetwork.js';
import type { LoadedModel } from '../../io/model.js';
import type { UNetConfig } from '../../models/configs.js';
import { flattenParams } from '../../models/params.js';
import { type Recipe, encodeWithTextEncoder } from '../recipe.js';

export interface HypernetworkRecipeOptions extends CreateHypernetworkOptions {
  /** the base model's A1111 short hash and name, written as the file's sd_checkpoint / sd_checkpoint_name */
  sdCheckpoint?: string | null;
  sdCheckpointName?: string | null;
  clipSkip?: number;
}

/**
 * The context widths a UNet's attentions read, as A1111 lists a new SD v1 hypernetwork's (768, 320, 640, 1280): the
 * cross-attention's text width, then each level's self-attention width (its channels) where the level has attention.
 */
export function modelAttentionWidths(cfg: UNetConfig): number[] {
  const n = cfg.block_out_channels.length;
  const levels = new Set<number>([n - 1]); // the mid block has attention
  cfg.down_block_types.forEach((t, i) => t.startsWith('CrossAttn') && levels.add(i));
  cfg.up_block_types.forEach((t, i) => t.startsWith('CrossAttn') && levels.add(n - 1 - i));
  const self = [...levels].sort((a, b) => a - b).map((i) => cfg.block_out_channels[i]);
  return [...new Set([cfg.cross_attention_dim, ...self])];
}

/** Create the hypernetwork and describe how it trains and exports. */
export function createHypernetworkRecipe(model: LoadedModel, o: HypernetworkRecipeOptions): Recipe {
  const net = createHypernetwork(o);
  const trainables = new Map<string, tf.Variable>();
  for (const [d, pair] of net.layers) {
    pair.forEach((tree, j) => {
      for (const [k, v] of flattenParams(tree)) trainables.set(`hypernetwork.${d}.${j === 0 ? 'k' : 'v'}.${k}`, v as tf.Variable);
    });
  }
  const use = [{ net, strength: 1 }];
  return {
    method: 'hypernetwork',
    trainables,
    textEncoderTrainable: false,
    captionFor: (c) => c,
    encodeIds: (ids) => encodeWithTextEncoder(model, ids, o.clipSkip),
    // the UNet's attentions read the hypernetwork; dropout masks come from the run's generator (a resume repeats them)
    forward: { training: true, rng: o.gen, context: hypernetworkAdapter(use) },
    withInference: (fn) => fn({ context: hypernetworkAdapter(use) }),
    async export(dir, name, step) {
      const data = await hypernetworkData(net);
      // A1111 save_hypernetwork: the name, the step, the checkpoint trained on
      data.meta = { ...data.meta, name, step, sd_checkpoint: o.sdCheckpoint ?? null, sd_checkpoint_name: o.sdCheckpointName ?? null };
      const pt = path.join(dir, `${name}.pt`);
      const st = path.join(dir, `${name}.safetensors`);
      await writeHypernetworkPt(pt, data);
      await writeHypernetworkSafetensors(st, data);
      return [pt, st];
    },
    dispose: () => disposeHypernetwork(net),
  };
}
