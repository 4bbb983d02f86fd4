/**
 * Layout conversion between a diffusers folder and a single-file LDM .safetensors (torch tensors only, no tfjs).
 * The single file gets exactly the keys diffusers' converter writes, plus `__metadata__.sdtune_configs` so that our
 * loader restores the exact configs. Output is atomic: a folder is built in a hidden sibling and renamed into place.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, rmdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { usageError } from '../errors.js';
import { sd15ModelIndex } from '../models/presets.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import { CONFIGS_METADATA_KEY, openCheckpoint, readTensorRef, type CheckpointSource, type ComponentSource, type TensorRef } from './checkpoint.js';
import { COMPONENTS, diffusersToLdmTable, transformShape, type Component } from './ldm-keymap.js';
import { writeSafetensors, type Dtype, type WritableTensor } from './safetensors.js';

export interface ConvertOptions {
  /** default: the other layout */
  to?: 'diffusers' | 'single-file';
  /** write floats as F16 */
  half?: boolean;
  configDir?: string;
  tokenizerDir?: string;
  /** single-file input: write the EMA UNet weights */
  ema?: boolean;
  /** diffusers input: weights variant to read, e.g. 'fp16' */
  variant?: string;
  onProgress?: (done: number, total: number) => void;
}

const WEIGHTS_FILE: Record<Component, string> = {
  unet: 'diffusion_pytorch_model.safetensors', vae: 'diffusion_pytorch_model.safetensors', text_encoder: 'model.safetensors',
};
const DTYPE_NAME: Partial<Record<Dtype, string>> = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' };
const isFloat = (d: Dtype) => d === 'F32' || d === 'F16' || d === 'BF16' || d === 'F64';

/** diffusers' JSON style: sorted keys, 2-space indent, trailing newline. */
const jsonBytes = (v: Record<string, unknown>) =>
  new TextEncoder().encode(JSON.stringify(Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))), null, 2) + '\n');

/** Refuse to replace anything that holds data (an absent path or an empty file/folder is fine). */
async function assertFree(out: string, wantDir: boolean): Promise<void> {
  const st = await stat(out).catch(() => undefined);
  if (!st) return;
  if (st.isDirectory() ? (await readdir(out)).length > 0 : st.size > 0) throw usageError(`${out} already exists and is not empty; refusing to overwrite it`);
  if (st.isDirectory() !== wantDir) throw usageError(`${out} exists and is a ${st.isDirectory() ? 'folder' : 'file'}; expected a ${wantDir ? 'folder' : '.safetensors file'} path`);
}

/** Output dtype of one tensor: F16 when halving floats, else its stored dtype (F64 narrowed to F32). */
const outDtype = (ref: TensorRef, half: boolean): Dtype => (isFloat(ref.dtype) ? (half ? 'F16' : ref.dtype === 'F64' ? 'F32' : ref.dtype) : ref.dtype);

/** A config whose dtype field (if it has one) names the dtype the weights are written in. */
function withDtype(src: ComponentSource, half: boolean): Record<string, unknown> {
  const names = new Set([...src.tensors.values()].filter((r) => isFloat(r.dtype)).map((r) => DTYPE_NAME[outDtype(r, half)] ?? 'float32'));
  const config = { ...src.config };
  if (names.size === 1) for (const k of ['dtype', 'torch_dtype']) if (k in config) config[k] = [...names][0];
  return config;
}

/** Convert between layouts; see the module comment. Returns the layout written, tensor count and weight bytes. */
export async function convertCheckpoint(
  input: string,
  output: string,
  opts: ConvertOptions = {},
): Promise<{ layout: string; tensors: number; bytes: number }> {
  const src = await openCheckpoint(input, { configDir: opts.configDir, tokenizerDir: opts.tokenizerDir, ema: opts.ema, variant: opts.variant });
  try {
    const to = opts.to ?? (src.layout === 'diffusers' ? 'single-file' : 'diffusers');
    const isFile = output.endsWith('.safetensors');
    if (to === 'single-file' && !isFile) throw usageError(`single-file output must be a .safetensors path (got ${output})`);
    if (to === 'diffusers' && isFile) throw usageError(`diffusers output is a folder, not ${output}; choose a folder name or convert to single-file`);
    await assertFree(output, to === 'diffusers');
    const present = COMPONENTS.filter((c) => src.components[c]);
    const total = present.reduce((n, c) => n + src.components[c]!.tensors.size, 0);
    let done = 0;
    const tick = () => opts.onProgress?.(++done, total);
    return to === 'single-file' ? await writeSingleFile(src, present, output, !!opts.half, tick) : await writeDiffusers(src, present, output, !!opts.half, tick);
  } finally {
    await src.close();
  }
}

/** One LDM-keyed file with the diffusers converter's key set, configs in the metadata. */
async function writeSingleFile(src: CheckpointSource, present: Component[], output: string, half: boolean, tick: () => void) {
  const tensors = new Map<string, WritableTensor>();
  const configs: Record<string, unknown> = { scheduler: src.schedulerConfig };
  for (const c of present) {
    const comp = src.components[c]!;
    configs[c] = withDtype(comp, half);
    for (const e of diffusersToLdmTable(c, comp.tensors.keys(), src.path)) {
      const ref = comp.tensors.get(e.from)!;
      const raw = await readTensorRef(ref);
      tensors.set(e.to, { shape: transformShape(e.transform, raw.shape, e.to), data: raw.data, dtype: outDtype(ref, half) });
      tick();
    }
  }
  await writeSafetensors(output, tensors, { metadata: { [CONFIGS_METADATA_KEY]: JSON.stringify(configs) } });
  return { layout: 'single-file', tensors: tensors.size, bytes: (await stat(output)).size };
}

/** A diffusers folder, built in a hidden sibling folder and renamed into place. */
async function writeDiffusers(src: CheckpointSource, present: Component[], output: string, half: boolean, tick: () => void) {
  const out = path.resolve(output);
  const tmp = path.join(path.dirname(out), `.sdtune-tmp-${path.basename(out)}-${process.pid}-${randomBytes(4).toString('hex')}`);
  await mkdir(tmp, { recursive: true });
  let count = 0, bytes = 0;
  try {
    const index = src.modelIndex ? { ...src.modelIndex } : sd15ModelIndex(src.variant === 'inpaint');
    for (const c of COMPONENTS) if (!src.components[c] && Array.isArray(index[c])) index[c] = [null, null];
    await writeFileAtomic(path.join(tmp, 'model_index.json'), jsonBytes(index));
    for (const c of present) {
      const comp = src.components[c]!;
      const dir = path.join(tmp, c);
      await mkdir(dir);
      await writeFileAtomic(path.join(dir, 'config.json'), jsonBytes(withDtype(comp, half)));
      const tensors = new Map<string, WritableTensor>();
      for (const [k, ref] of comp.tensors) {
        const raw = await readTensorRef(ref);
        tensors.set(k, { shape: raw.shape, data: raw.data, dtype: outDtype(ref, half) });
        tick();
      }
      await writeSafetensors(path.join(dir, WEIGHTS_FILE[c]), tensors, { metadata: { format: 'pt' } });
      count += tensors.size;
      bytes += (await stat(path.join(dir, WEIGHTS_FILE[c]))).size;
    }
    await mkdir(path.join(tmp, 'scheduler'));
    await writeFileAtomic(path.join(tmp, 'scheduler', 'scheduler_config.json'), jsonBytes(src.schedulerConfig));
    if (src.tokenizerDir) {
      await mkdir(path.join(tmp, 'tokenizer'));
      for (const ent of await readdir(src.tokenizerDir, { withFileTypes: true }))
        if (ent.isFile()) await writeFileAtomic(path.join(tmp, 'tokenizer', ent.name), await readFile(path.join(src.tokenizerDir, ent.name)));
    }
    await assertFree(out, true);
    await rmdir(out).catch(() => {}); // an empty folder may stand in the way of the rename
    await rename(tmp, out);
  } catch (e) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    throw e;
  }
  return { layout: 'diffusers', tensors: count, bytes };
}
