/**
 * Full fine-tuning (diffusers examples/text_to_image/train_text_to_image.py, kohya fine_tune.py): the UNet's own
 * parameters train (all of them, or only the transformer blocks' attention layers), optionally the whole text
 * encoder with its own learning rate. The networks run unchanged on the variables (makeTrainable), so inference
 * needs no swap. Exported as a diffusers folder and/or an LDM single file (A1111, ComfyUI), in fp32/fp16/bf16, with
 * the configs, scheduler and tokenizer the model was loaded with.
 */
import path from 'node:path';
import { usageError } from '../../errors.js';
import { type SavePrecision, saveModel } from '../../io/convert.js';
import type { LoadedModel } from '../../io/model.js';
import { makeTrainable } from '../../models/params.js';
import type { FinetuneFilter } from '../config.js';
import { type ExportContext, type Recipe, encodeWithTextEncoder } from '../recipe.js';

export interface FinetuneRecipeOptions {
  unet: FinetuneFilter;
  textEncoder: boolean;
  /** null: the base lr */
  textEncoderLr: number | null;
  savePrecision: SavePrecision;
  saveAs: 'diffusers' | 'single_file' | 'both';
  /** the single file holds the EMA average (the "pruned-emaonly" file), whatever output.export_ema says */
  emaOnly?: boolean;
}

/** attn1/attn2 of every transformer block (self- and cross-attention: to_q/k/v/out, their biases and norms stay out) */
const ATTENTION = /\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$/;

/** Which UNet keys a filter trains. */
export function finetuneFilter(f: FinetuneFilter): (key: string) => boolean {
  return f === 'all' ? () => true : (key) => ATTENTION.test(key);
}

export function createFinetuneRecipe(model: LoadedModel, o: FinetuneRecipeOptions): Recipe {
  const unetVars = makeTrainable(model.unet!.params, finetuneFilter(o.unet), 'finetune/unet');
  if (!unetVars.size) throw usageError(`finetune.unet ${o.unet}: no UNet parameter matches`);
  const teVars = o.textEncoder ? makeTrainable(model.textEncoder!.params, () => true, 'finetune/text_encoder') : new Map();
  // checkpoint / optimizer keys name the component: unet.<diffusers key>, text_encoder.<key>
  const trainables = new Map([...[...unetVars].map(([k, v]) => [`unet.${k}`, v] as const), ...[...teVars].map(([k, v]) => [`text_encoder.${k}`, v] as const)]);
  return {
    method: 'finetune',
    trainables,
    textEncoderTrainable: o.textEncoder,
    lrFor: o.textEncoderLr === null ? undefined : (name, factor, base) => (name.startsWith('text_encoder.') ? o.textEncoderLr! : base) * factor,
    captionFor: (caption) => caption,
    encodeIds: (ids) => encodeWithTextEncoder(model, ids),
    withInference: (fn) => fn(), // the networks already run on the trained variables
    export: (dir, name, _step, ctx) => exportWholeModel(model, dir, name, o, ctx),
    dispose() {
      // the variables are the model's parameters now: disposeModel frees them
    },
  };
}

/**
 * A whole-model method's export (full fine-tuning, the VAE): the model as it is in memory (its networks run on the
 * trained variables) as a diffusers folder `<dir>/<name>` and/or a single file `<dir>/<name>.safetensors`, with its
 * configs, scheduler and tokenizer (saveModel). The single file holds the EMA average with `emaOnly`.
 */
export async function exportWholeModel(
  model: LoadedModel,
  dir: string,
  name: string,
  o: Pick<FinetuneRecipeOptions, 'savePrecision' | 'saveAs' | 'emaOnly'>,
  ctx?: ExportContext,
): Promise<string[]> {
  const formats = o.saveAs === 'both' ? (['diffusers', 'single_file'] as const) : [o.saveAs];
  const files: string[] = [];
  for (const f of formats) {
    const out = path.join(dir, f === 'diffusers' ? name : `${name}.safetensors`);
    // the run folder is this run's (lock, earlier-run check): a re-export replaces its own earlier one
    const write = () => saveModel(model, out, { to: f === 'diffusers' ? 'diffusers' : 'single-file', precision: o.savePrecision, overwrite: true });
    if (f === 'single_file' && o.emaOnly) {
      if (!ctx?.withEma) throw usageError('output.ema_only: there is no EMA average to export (set train.ema.enabled)');
      await ctx.withEma(write);
    } else await write();
    files.push(out);
  }
  return files;
}
