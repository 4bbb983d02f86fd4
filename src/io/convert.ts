/**
 * Layout conversion between a diffusers folder and a single-file LDM .safetensors (torch tensors only, no tfjs).
 * The single file gets exactly the keys diffusers' converter writes, plus `__metadata__.sdtune_configs` so that our
 * loader restores the exact configs, and the tokenizer's files as `__metadata__["sdtune_tokenizer/vocab.json"]`, ...
 * (plain strings, so a single file samples on its own; A1111 and ComfyUI ignore metadata). SD v1's CLIP vocab.json +
 * merges.txt (1.5 MB) make a 1.6 MB header: far below the 100 MB header limit of the safetensors reference reader,
 * which ours shares, so they are stored uncompressed (readable with any safetensors tool). A folder gets the
 * source's tokenizer/ (copied, or written from a single file's embedded files). Output is atomic: a folder is built in
 * a hidden sibling and renamed into place.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, rmdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { fileError, usageError } from '../errors.js';
import { sd15ModelIndex } from '../models/presets.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import { TOKENIZER_FILES, type TokenizerFileName } from '../tokenizer/clip.js';
import { CONFIGS_METADATA_KEY, TOKENIZER_METADATA_PREFIX, openCheckpoint, readTensorRef, type CheckpointSource, type ComponentSource, type TensorRef } from './checkpoint.js';
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

export interface ConvertResult {
  layout: string;
  tensors: number;
  bytes: number;
  /** where the tokenizer written with the model came from (a folder, or "embedded in FILE"); null: none was found */
  tokenizer: string | null;
  /** e.g. that the output has no tokenizer */
  notes: string[];
}

/** The tokenizer files of the source: its tokenizer folder's (those TOKENIZER_FILES names), else a single file's embedded ones. */
async function sourceTokenizer(src: CheckpointSource): Promise<{ from: string; files: Partial<Record<TokenizerFileName, string>> } | undefined> {
  if (src.tokenizerDir) {
    const files: Partial<Record<TokenizerFileName, string>> = {};
    for (const name of Object.keys(TOKENIZER_FILES) as TokenizerFileName[]) {
      const text = await readFile(path.join(src.tokenizerDir, name), 'utf8').catch((e: NodeJS.ErrnoException) => {
        if (e.code === 'ENOENT') return undefined;
        throw fileError(`${path.join(src.tokenizerDir!, name)}: cannot read (${e.code ?? e.message})`);
      });
      if (text !== undefined) files[name] = text;
    }
    if (files['vocab.json'] === undefined || files['merges.txt'] === undefined)
      throw fileError(`tokenizer folder ${src.tokenizerDir} has no ${files['vocab.json'] === undefined ? 'vocab.json' : 'merges.txt'}; pass --tokenizer DIR (a folder with vocab.json and merges.txt)`);
    return { from: src.tokenizerDir, files };
  }
  if (src.embeddedTokenizer) return { from: `embedded in ${src.path}`, files: src.embeddedTokenizer };
  return undefined;
}

/** Convert between layouts; see the module comment. Returns the layout written, tensor count, weight bytes and the tokenizer's source. */
export async function convertCheckpoint(input: string, output: string, opts: ConvertOptions = {}): Promise<ConvertResult> {
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
    const tok = await sourceTokenizer(src);
    const r = to === 'single-file' ? await writeSingleFile(src, present, output, !!opts.half, tick, tok?.files) : await writeDiffusers(src, present, output, !!opts.half, tick, tok?.files);
    const notes = !tok && src.components.text_encoder ? [`no tokenizer found for ${input}, so ${output} has none: sampling it needs --tokenizer DIR (or convert again with --tokenizer DIR)`] : [];
    return { ...r, tokenizer: tok?.from ?? null, notes };
  } finally {
    await src.close();
  }
}

/** One LDM-keyed file with the diffusers converter's key set, configs in the metadata. */
async function writeSingleFile(src: CheckpointSource, present: Component[], output: string, half: boolean, tick: () => void, tokenizer?: Partial<Record<TokenizerFileName, string>>) {
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
  const metadata: Record<string, string> = { [CONFIGS_METADATA_KEY]: JSON.stringify(configs) };
  for (const [name, text] of Object.entries(tokenizer ?? {})) metadata[TOKENIZER_METADATA_PREFIX + name] = text;
  await writeSafetensors(output, tensors, { metadata });
  return { layout: 'single-file', tensors: tensors.size, bytes: (await stat(output)).size };
}

/** A diffusers folder, built in a hidden sibling folder and renamed into place. */
async function writeDiffusers(src: CheckpointSource, present: Component[], output: string, half: boolean, tick: () => void, tokenizer?: Partial<Record<TokenizerFileName, string>>) {
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
    if (src.tokenizerDir && tokenizer) {
      // the whole folder, as diffusers saves it (tokenizer.json etc. included)
      await mkdir(path.join(tmp, 'tokenizer'));
      for (const ent of await readdir(src.tokenizerDir, { withFileTypes: true }))
        if (ent.isFile()) await writeFileAtomic(path.join(tmp, 'tokenizer', ent.name), await readFile(path.join(src.tokenizerDir, ent.name)));
    } else if (tokenizer) {
      await mkdir(path.join(tmp, 'tokenizer'));
      for (const [name, text] of Object.entries(tokenizer)) await writeFileAtomic(path.join(tmp, 'tokenizer', name), new TextEncoder().encode(text));
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
