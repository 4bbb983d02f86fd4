/** `method: hypernetwork` (and `sdtune hypernetwork`): a new A1111 hypernetwork, only its MLPs train (recipes/hypernetwork.ts). */
import { z } from 'zod';
import { modelStem } from '../../adapters/file-names.js';
import { HYPERNETWORK_ACTIVATION_NAMES, HYPERNETWORK_INITS } from '../../adapters/hypernetwork-names.js';
import { SdtuneError } from '../../errors.js';
import type { MethodEntry } from '../registry.js';
import { bool, nums, oneOf, orNull, show } from '../schema.js';
import { refuseModelOutputs } from './common.js';

/** The keys and defaults of A1111's "Create hypernetwork" tab (modules/hypernetworks/ui.py + create_hypernetwork). */
export const HYPERNETWORK_SECTION = z.object({
  layer_structure: nums(0, { minOpen: true }).default([1, 2, 1]), // width multipliers, first and last 1 (A1111 "1, 2, 1")
  activation_func: oneOf(HYPERNETWORK_ACTIVATION_NAMES).default('linear'), // A1111's default: none ("swish" is torch Hardswish)
  weight_initialization: oneOf(HYPERNETWORK_INITS).default('Normal'), // Normal = N(0, 0.01) weights, zero biases
  add_layer_norm: bool().default(false), // a LayerNorm after each Linear (the file's is_layer_norm)
  use_dropout: bool().default(false), // dropout after the hidden layers while training
  dropout_structure: orNull(nums(0, { max: 1, maxOpen: true })), // probability after each layer_structure entry, first and last 0; null = A1111's rule (0.3 on hidden layers)
  last_layer_dropout: bool().default(true), // with use_dropout and no dropout_structure: dropout after the last hidden layer too (A1111's default)
  activate_output: bool().default(false), // the activation after the last Linear too
  widths: orNull(nums(1, { int: true })), // context widths that get modules; null = every attention width of the model (SD v1: 768, 320, 640, 1280, as A1111 creates)
});

declare module '../config.js' {
  interface MethodSections {
    hypernetwork: z.output<typeof HYPERNETWORK_SECTION>;
  }
}

export const hypernetwork: MethodEntry = {
  name: 'hypernetwork',
  section: HYPERNETWORK_SECTION,
  // A1111: learn rate 0.00001, torch AdamW (weight decay 0.01), fp32 files
  defaults: { 'train.lr': 1e-5, 'train.weight_decay': 1e-2, 'output.save_precision': 'fp32' },
  check(c, fail) {
    refuseModelOutputs(c, fail, 'hypernetwork', 'hypernetwork');
    if (c.output.save_precision !== 'fp32') fail('output.save_precision', `output.save_precision ${show(c.output.save_precision)}: hypernetworks are saved in fp32, as A1111 saves them`);
    const h = c.hypernetwork!;
    const ls = h.layer_structure;
    if (ls.length < 2 || ls[0] !== 1 || ls[ls.length - 1] !== 1) {
      fail('hypernetwork.layer_structure', `hypernetwork.layer_structure: expected at least 2 multipliers, the first and last 1 (e.g. [1, 2, 1]), found ${show(ls)}`);
    }
    if (ls.length > 64) fail('hypernetwork.layer_structure', `hypernetwork.layer_structure: at most 64 entries, found ${ls.length}`);
    const ds = h.dropout_structure;
    if (ds !== null) {
      if (!h.use_dropout) fail('hypernetwork.dropout_structure', 'hypernetwork.dropout_structure is set but hypernetwork.use_dropout is false (set it true, or remove the structure)');
      if (ds.length !== ls.length) {
        fail('hypernetwork.dropout_structure', `hypernetwork.dropout_structure: expected ${ls.length} probabilities (one per layer_structure entry), found ${show(ds)}`);
      }
      if (ds[0] !== 0 || ds[ds.length - 1] !== 0) fail('hypernetwork.dropout_structure', `hypernetwork.dropout_structure: the first and last probabilities must be 0 (A1111), found ${show(ds)}`);
    }
    if (h.widths !== null) {
      if (!h.widths.length) fail('hypernetwork.widths', 'hypernetwork.widths: expected at least one width, or null for every attention width of the model');
      if (new Set(h.widths).size !== h.widths.length) fail('hypernetwork.widths', `hypernetwork.widths: each width once, found ${show(h.widths)}`);
    }
  },
  cli: {
    command: 'hypernetwork',
    describe: 'train an A1111 hypernetwork (A1111 .pt + .safetensors output)',
    flags: {
      'layer-structure': { key: 'hypernetwork.layer_structure', describe: 'width multipliers, e.g. "1, 2, 1" (hypernetwork.layer_structure)' },
      activation: { key: 'hypernetwork.activation_func', describe: 'activation between the layers (hypernetwork.activation_func; A1111 default linear)' },
      'layer-norm': { key: 'hypernetwork.add_layer_norm', boolean: true },
      'use-dropout': { key: 'hypernetwork.use_dropout', boolean: true },
    },
  },
  async create(model, c, gen) {
    const h = c.hypernetwork!;
    const { createHypernetworkRecipe, modelAttentionWidths } = await import('../recipes/hypernetwork.js');
    const { modelPathHash } = await import('../../io/hashes.js');
    const have = modelAttentionWidths(model.unet!.config);
    const widths = h.widths ?? have;
    for (const w of widths) {
      if (!have.includes(w)) throw new SdtuneError('usage', `hypernetwork.widths: ${w} is no context width of ${c.model.path}'s attentions (${have.join(', ')}): its modules would never apply`);
    }
    return createHypernetworkRecipe(model, {
      widths,
      layer_structure: h.layer_structure,
      activation_func: h.activation_func,
      weight_initialization: h.weight_initialization,
      is_layer_norm: h.add_layer_norm,
      use_dropout: h.use_dropout,
      dropout_structure: h.dropout_structure ?? undefined,
      last_layer_dropout: h.last_layer_dropout,
      activate_output: h.activate_output,
      gen,
      // A1111 save_hypernetwork: the checkpoint's short hash and name
      sdCheckpoint: (await modelPathHash(c.model.path)) ?? null,
      sdCheckpointName: modelStem(c.model.path),
    });
  },
};
