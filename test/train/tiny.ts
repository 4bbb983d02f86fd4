// Training configs on the bundled tiny model and datasets, shared by the training-loop tests (fresh clone, no reference data).
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Method, resolveConfig } from '../../src/train/config.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const MODEL = path.join(ROOT, 'checkpoints/tiny-sd-v1');
export const quiet = { quiet: true, log: () => {} };

/** A resolved config at 64 px, batch 2, seed 7 (LoRA and full fine-tuning on datasets/shapes, TI on datasets/logo), plus `extra` keys. */
export function config(method: Method, out: string, extra: Record<string, unknown> = {}) {
  const base: Record<string, unknown> = {
    'model.path': MODEL,
    'data.dir': path.join(ROOT, method === 'textual_inversion' ? 'datasets/logo' : 'datasets/shapes'),
    'data.resolution': 64,
    'train.batch_size': 2,
    'train.seed': 7,
    'output.dir': out,
    'output.name': 'run',
    ...(method === 'lora'
      ? { 'lora.rank': 4, 'lora.alpha': 4, 'train.lr': 1e-3 }
      : method === 'textual_inversion'
        ? { 'textual_inversion.token': '<my-logo>', 'textual_inversion.init_word': 'star', 'textual_inversion.vectors': 2 }
        : {}),
    ...extra,
  };
  return resolveConfig(method, null, base);
}
