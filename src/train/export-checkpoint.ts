/**
 * A full fine-tune's training checkpoint as a model: the base model named in the checkpoint's config, with the
 * checkpoint's trainables (or their EMA average) put in, written as a diffusers folder or a single file
 * (`sdtune convert output/x/checkpoints/step-000040 model.safetensors`).
 */
import * as tf from '@tensorflow/tfjs';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError, fmtShape } from '../errors.js';
import { type ConvertResult, type SaveModelOptions, saveModel } from '../io/convert.js';
import { disposeModel, loadModel } from '../io/model.js';
import { SafetensorsFile } from '../io/safetensors.js';
import { type ParamTree, leaf, sub } from '../models/params.js';
import { resolveConfig } from './config.js';

/** Whether `dir` is a training checkpoint folder (state.json + trainable.safetensors). */
export const isTrainingCheckpoint = (dir: string) => existsSync(path.join(dir, 'state.json')) && existsSync(path.join(dir, 'trainable.safetensors'));

export interface ExportCheckpointOptions extends SaveModelOptions {
  /** write the EMA average (ema.safetensors) instead of the trained weights; default: the average when there is one */
  ema?: boolean;
}

/** Load the checkpoint's base model, put its trained weights in and save it (see the module comment). */
export async function exportTrainingCheckpoint(dir: string, output: string, opts: ExportCheckpointOptions = {}): Promise<ConvertResult> {
  const state = JSON.parse(await readFile(path.join(dir, 'state.json'), 'utf8')) as { method?: string };
  if (state.method !== 'finetune') {
    throw new SdtuneError('usage', `${dir} is a ${state.method ?? 'unknown'} checkpoint: its result is the adapter file exported beside it (<name>-step-N.safetensors), not a model`);
  }
  const config = resolveConfig('finetune', await readFile(path.join(dir, 'config.resolved.yaml'), 'utf8'), {}, path.join(dir, 'config.resolved.yaml'));
  const emaFile = path.join(dir, 'ema.safetensors');
  const useEma = opts.ema ?? existsSync(emaFile);
  if (useEma && !existsSync(emaFile)) throw new SdtuneError('file', `${dir} has no ema.safetensors (the run had train.ema off)`);
  const model = await loadModel(config.model.path, { configDir: config.model.config ?? undefined, tokenizerDir: config.model.tokenizer ?? undefined });
  const f = await SafetensorsFile.open(useEma ? emaFile : path.join(dir, 'trainable.safetensors'));
  try {
    for (const key of f.keys()) {
      const name = useEma ? key.replace(/^ema\//, '') : key;
      const [component, ...rest] = name.split('.');
      const tree: ParamTree | undefined = component === 'unet' ? model.unet?.params : component === 'text_encoder' ? model.textEncoder?.params : undefined;
      if (!tree) throw new SdtuneError('format', `${f.path}: ${key} belongs to no component of ${config.model.path}`);
      const node = sub(tree, ...rest.slice(0, -1));
      const leafName = rest[rest.length - 1];
      const old = leaf(node, leafName);
      const t = await f.readFloat(key);
      if (fmtShape(t.shape) !== fmtShape(old.shape)) throw new SdtuneError('format', `${f.path}: ${key} is ${fmtShape(t.shape)}, the model's is ${fmtShape(old.shape)}`);
      node[leafName] = tf.tensor(t.data as Float32Array, t.shape); // checkpoints hold tfjs layouts, as the variables were
      old.dispose();
    }
    return await saveModel(model, output, opts);
  } finally {
    await f.close();
    disposeModel(model);
  }
}
