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
import { fileError, formatError, usageError } from '../errors.js';
import { sd15ModelIndex } from '../models/presets.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import { TOKENIZER_FILES, type TokenizerFileName } from '../tokenizer/clip.js';
import { CONFIGS_METADATA_KEY, TOKENIZER_METADATA_PREFIX, detectFileKind, openCheckpoint, readTensorRef, type CheckpointSource } from './checkpoint.js';
import { type PyValue, TorchFile, isPickleFile, isTensor, toPlain } from './pickle.js';
import { COMPONENTS, diffusersToLdmTable, diffusersToOpenClipTable, transformShape, type Component } from './ldm-keymap.js';
import { writeSafetensors, type Dtype, type LazyTensor } from './safetensors.js';
import { flattenParams, type ParamTree } from '../models/params.js';
import type { LoadedModel } from './model.js';
import { tensorToTorch, torchShapeOf } from './layout.js';

/** Float precision of the weights written: fp32 / fp16 / bf16; undefined keeps each tensor's stored float dtype. */
export type SavePrecision = 'fp32' | 'fp16' | 'bf16';

/** One tensor to write: diffusers key, torch layout; its data is read only when it is written. */
interface ExportTensor {
  shape: number[];
  /** stored dtype (of the source file, or F32 for weights in memory) */
  dtype: Dtype;
  read: () => Promise<Float32Array | Int32Array>;
}
interface ExportComponent {
  config: Record<string, unknown>;
  tensors: Map<string, ExportTensor>;
}
/** What the writers write, from a file (convert) or from weights in memory (saveModel). */
interface ExportSource {
  path: string;
  variant: 'v1' | 'inpaint' | 'depth';
  components: Partial<Record<Component, ExportComponent>>;
  schedulerConfig: Record<string, unknown>;
  modelIndex?: Record<string, unknown>;
  tokenizerDir?: string;
  embeddedTokenizer?: Partial<Record<TokenizerFileName, string>>;
}

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

const PRECISION_DTYPE: Record<SavePrecision, Dtype> = { fp32: 'F32', fp16: 'F16', bf16: 'BF16' };

/** Output dtype of one tensor: the precision's for floats when one is given, else its stored dtype (F64 narrowed to F32). */
const outDtype = (ref: { dtype: Dtype }, prec: SavePrecision | undefined): Dtype =>
  isFloat(ref.dtype) ? (prec ? PRECISION_DTYPE[prec] : ref.dtype === 'F64' ? 'F32' : ref.dtype) : ref.dtype;

/** A config whose dtype field (if it has one) names the dtype the weights are written in. */
function withDtype(src: ExportComponent, prec: SavePrecision | undefined): Record<string, unknown> {
  const names = new Set([...src.tensors.values()].filter((r) => isFloat(r.dtype)).map((r) => DTYPE_NAME[outDtype(r, prec)] ?? 'float32'));
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
async function sourceTokenizer(src: ExportSource): Promise<{ from: string; files: Partial<Record<TokenizerFileName, string>> } | undefined> {
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

/**
 * Convert between layouts; see the module comment. A PyTorch pickle (.ckpt/.pt/.bin, read as data) that is a model
 * converts like a single file; one that is not (a LoRA, an embedding, a hypernetwork) is re-saved as a flat
 * safetensors of its tensors (see convertPickleTensors). Returns the layout written, tensor count, weight bytes and
 * the tokenizer's source.
 */
export async function convertCheckpoint(input: string, output: string, opts: ConvertOptions = {}): Promise<ConvertResult> {
  if (isPickleFile(input) && output.endsWith('.safetensors') && !(await isPickledModel(input))) return convertPickleTensors(input, output, opts);
  const src = await openCheckpoint(input, { configDir: opts.configDir, tokenizerDir: opts.tokenizerDir, ema: opts.ema, variant: opts.variant });
  try {
    // default: the other layout, except that a .safetensors output means a single file (e.g. re-saving a .ckpt)
    const to = opts.to ?? (src.layout === 'diffusers' || output.endsWith('.safetensors') ? 'single-file' : 'diffusers');
    await checkOutput(output, to, 'convert to', false);
    const { r, tok } = await writeExport(exportSourceOf(src), output, to, opts.half ? 'fp16' : undefined, opts.onProgress, false);
    const notes = !tok && src.components.text_encoder ? [`no tokenizer found for ${input}, so ${output} has none: sampling it needs --tokenizer DIR (or convert again with --tokenizer DIR)`] : [];
    return { ...r, tokenizer: tok?.from ?? null, notes };
  } finally {
    await src.close();
  }
}

/** Whether a pickle holds a model that openCheckpoint opens (LDM / diffusers keys), as opposed to an adapter. */
async function isPickledModel(input: string): Promise<boolean> {
  const f = await TorchFile.open(input, { stateDict: true });
  try {
    const { kind } = detectFileKind(new Map([...f.tensors].map(([k, t]) => [k, t.shape])));
    return kind !== 'lora' && kind !== 'embedding' && kind !== 'unknown';
  } finally {
    await f.close();
  }
}

/**
 * Re-save a pickle that is not a model as safetensors: every tensor under its flattened key (nested dicts joined
 * with '.', e.g. A1111's `string_to_param.*`, a hypernetwork's `768.0.linear.0.weight`), in its stored dtype (F16 with
 * `half`), and each other top-level field as metadata: strings as they are, anything else as JSON (`step`,
 * `layer_structure`, ...). Loaders read the result as they read the pickle.
 */
export async function convertPickleTensors(input: string, output: string, opts: Pick<ConvertOptions, 'half' | 'onProgress'> = {}): Promise<ConvertResult> {
  if (!output.endsWith('.safetensors')) throw usageError(`converting ${input} (not a model) writes a .safetensors file (got ${output})`);
  await assertFree(output, false);
  const f = await TorchFile.open(input);
  try {
    if (!f.tensors.size) throw formatError(`${input}: no tensors to convert`);
    const metadata: Record<string, string> = {};
    if (f.root instanceof Map) {
      const budget = { parts: 2_000_000 }; // shared by all fields (a value shared through the memo counts each time)
      for (const [k, v] of f.root) {
        if (typeof k !== 'string' || holdsTensor(v)) continue;
        metadata[k] = typeof v === 'string' ? v : JSON.stringify(toPlain(v, budget), (_, x) => (x instanceof Uint8Array ? [...x] : x));
      }
    }
    const total = f.tensors.size;
    let done = 0;
    const tensors = new Map<string, LazyTensor>();
    for (const k of f.keys()) {
      const t = f.lazy(k);
      const dtype: Dtype = opts.half && isFloat(t.dtype) ? 'F16' : t.dtype === 'F64' ? 'F32' : t.dtype;
      tensors.set(k, { shape: t.shape, dtype, load: async () => {
        const d = await t.load();
        opts.onProgress?.(++done, total);
        return d;
      } });
    }
    await writeSafetensors(output, tensors, { metadata });
    return { layout: 'tensors', tensors: tensors.size, bytes: (await stat(output)).size, tokenizer: null, notes: [`${input} is not a model; its ${tensors.size} tensors were re-saved under the same keys`] };
  } finally {
    await f.close();
  }
}

/** Whether a pickled value contains a tensor anywhere (bounded like the reader's walk). */
function holdsTensor(v: PyValue, seen = new Set<object>(), depth = 0): boolean {
  if (isTensor(v)) return true;
  if (depth > 64 || v === null || typeof v !== 'object' || v instanceof Uint8Array || seen.has(v)) return false;
  seen.add(v); // each container once: a value shared through the memo is not walked again
  if (v instanceof Map) return [...v.values()].some((x) => holdsTensor(x, seen, depth + 1));
  if (Array.isArray(v) || v instanceof Set) return [...v].some((x) => holdsTensor(x, seen, depth + 1));
  return v.kind === 'object' && v.state !== undefined && holdsTensor(v.state, seen, depth + 1);
}

export interface SaveModelOptions {
  /** 'diffusers' (a folder) or 'single-file' (an LDM-keyed .safetensors, what A1111 and ComfyUI load); default: from
   *  the output path (`.safetensors` = single file) */
  to?: 'diffusers' | 'single-file';
  /** default fp32 */
  precision?: SavePrecision;
  /** replace an existing output (atomically: the old one goes only once the new one is complete) */
  overwrite?: boolean;
  onProgress?: (done: number, total: number) => void;
}

/**
 * Write a model held in memory (e.g. after full fine-tuning) as a diffusers folder or a single file, with the configs
 * and tokenizer it was loaded with. Written tensor by tensor: each is read back from the backend, converted to torch
 * layout and written before the next, so saving needs one tensor of host memory beyond the model. Atomic like
 * convert (temp + rename); an existing non-empty output is refused.
 */
export async function saveModel(model: LoadedModel, output: string, opts: SaveModelOptions = {}): Promise<ConvertResult> {
  const to = opts.to ?? (output.endsWith('.safetensors') ? 'single-file' : 'diffusers');
  await checkOutput(output, to, 'save as', Boolean(opts.overwrite));
  const parts: [Component, { params: ParamTree } | undefined][] = [['unet', model.unet], ['vae', model.vae], ['text_encoder', model.textEncoder]];
  const components: ExportSource['components'] = {};
  for (const [c, part] of parts) {
    if (!part) continue;
    const config = model.source?.configs[c];
    if (!config) throw usageError(`${model.path}: the ${c} config it was loaded with is unknown (load the model with loadModel to save it)`);
    const tensors = new Map<string, ExportTensor>();
    for (const [k, t] of flattenParams(part.params)) {
      if (k.includes('.lora_')) throw usageError(`${model.path}: ${c} has LoRA factors injected (${k}); merge or remove them before saving the model`);
      tensors.set(k, { shape: torchShapeOf(k, t.shape), dtype: t.dtype === 'int32' ? 'I32' : 'F32', read: async () => (await tensorToTorch(k, t)).data as Float32Array | Int32Array });
    }
    components[c] = { config, tensors };
  }
  const src: ExportSource = { path: model.path, variant: model.variant, components, schedulerConfig: model.schedulerConfig, ...model.source };
  const { r, tok } = await writeExport(src, output, to, opts.precision ?? 'fp32', opts.onProgress, Boolean(opts.overwrite));
  const notes = !tok && components.text_encoder ? [`${model.path} has no tokenizer, so ${output} has none: sampling it needs --tokenizer DIR`] : [];
  return { ...r, tokenizer: tok?.from ?? null, notes };
}

/** The output path fits the layout (a .safetensors file or a folder) and, unless `overwrite`, holds nothing. */
async function checkOutput(output: string, to: 'diffusers' | 'single-file', verb: string, overwrite: boolean): Promise<void> {
  const isFile = output.endsWith('.safetensors');
  if (to === 'single-file' && !isFile) throw usageError(`single-file output must be a .safetensors path (got ${output})`);
  if (to === 'diffusers' && isFile) throw usageError(`diffusers output is a folder, not ${output}; choose a folder name or ${verb} single-file`);
  if (!overwrite) await assertFree(output, to === 'diffusers');
}

/** Write `src` in the layout `to` with its tokenizer, counting tensors for `onProgress`. */
async function writeExport(
  src: ExportSource,
  output: string,
  to: 'diffusers' | 'single-file',
  prec: SavePrecision | undefined,
  onProgress: ((done: number, total: number) => void) | undefined,
  replace: boolean,
) {
  const present = COMPONENTS.filter((c) => src.components[c]);
  const total = present.reduce((n, c) => n + src.components[c]!.tensors.size, 0);
  let done = 0;
  const tick = () => onProgress?.(++done, total);
  const tok = await sourceTokenizer(src);
  const r = to === 'single-file' ? await writeSingleFile(src, present, output, prec, tick, tok?.files) : await writeDiffusers(src, present, output, prec, tick, tok?.files, replace);
  return { r, tok };
}

/** A checkpoint's tensors as an ExportSource (each read from its file when written). */
function exportSourceOf(src: CheckpointSource): ExportSource {
  const components: ExportSource['components'] = {};
  for (const c of COMPONENTS) {
    const comp = src.components[c];
    if (!comp) continue;
    const tensors = new Map<string, ExportTensor>();
    for (const [k, ref] of comp.tensors) tensors.set(k, { shape: ref.shape, dtype: ref.dtype, read: async () => (await readTensorRef(ref)).data });
    components[c] = { config: comp.config, tensors };
  }
  return { path: src.path, variant: src.variant, components, schedulerConfig: src.schedulerConfig, modelIndex: src.modelIndex, tokenizerDir: src.tokenizerDir, embeddedTokenizer: src.embeddedTokenizer };
}

/** The tensors of one file, each read (and counted by `tick`) only when the writer gets to it. */
const lazy = (t: ExportTensor, shape: number[], prec: SavePrecision | undefined, tick: () => void): LazyTensor => ({
  shape,
  dtype: outDtype(t, prec),
  load: async () => {
    const d = await t.read();
    tick();
    return d;
  },
});

/**
 * SD 2's text encoder (OpenCLIP ViT-H as a CLIPTextModel) goes into a single file in OpenCLIP's layout, as diffusers'
 * converter and A1111 have it; it is told from SD v1's OpenAI CLIP by its exact gelu (OpenAI CLIP uses quick_gelu).
 */
const isOpenClip = (config: Record<string, unknown>) => config.hidden_act === 'gelu';

/** q, k, v tensors as one fused in_proj tensor (rows concatenated in that order), read when written. */
function fuseRows(parts: ExportTensor[]): ExportTensor {
  const [rows, ...rest] = parts[0].shape;
  return {
    shape: [3 * rows, ...rest],
    dtype: parts[0].dtype,
    read: async () => {
      const data = await Promise.all(parts.map((p) => p.read()));
      const out = new Float32Array(data.reduce((n, d) => n + d.length, 0));
      let off = 0;
      for (const d of data) (out.set(d, off), (off += d.length));
      return out;
    },
  };
}

/** One LDM-keyed file with the diffusers converter's key set, configs in the metadata; written tensor by tensor. */
async function writeSingleFile(src: ExportSource, present: Component[], output: string, prec: SavePrecision | undefined, tick: () => void, tokenizer?: Partial<Record<TokenizerFileName, string>>) {
  const tensors = new Map<string, LazyTensor>();
  const configs: Record<string, unknown> = { scheduler: src.schedulerConfig };
  for (const c of present) {
    const comp = src.components[c]!;
    configs[c] = withDtype(comp, prec);
    if (c === 'text_encoder' && isOpenClip(comp.config)) {
      for (const e of diffusersToOpenClipTable(comp.tensors.keys(), src.path)) {
        const parts = e.from.map((k) => comp.tensors.get(k)!);
        const t = parts.length === 1 ? parts[0] : fuseRows(parts);
        tensors.set(e.to, lazy(t, t.shape, prec, parts.length === 1 ? tick : () => parts.forEach(tick)));
      }
      continue;
    }
    for (const e of diffusersToLdmTable(c, comp.tensors.keys(), src.path)) {
      const t = comp.tensors.get(e.from)!;
      tensors.set(e.to, lazy(t, transformShape(e.transform, t.shape, e.to), prec, tick));
    }
  }
  const metadata: Record<string, string> = { [CONFIGS_METADATA_KEY]: JSON.stringify(configs) };
  for (const [name, text] of Object.entries(tokenizer ?? {})) metadata[TOKENIZER_METADATA_PREFIX + name] = text;
  await writeSafetensors(output, tensors, { metadata });
  return { layout: 'single-file', tensors: tensors.size, bytes: (await stat(output)).size };
}

/** A diffusers folder, built in a hidden sibling folder and renamed into place; each weights file tensor by tensor. */
async function writeDiffusers(src: ExportSource, present: Component[], output: string, prec: SavePrecision | undefined, tick: () => void, tokenizer?: Partial<Record<TokenizerFileName, string>>, replace = false) {
  const out = path.resolve(output);
  const tmp = path.join(path.dirname(out), `.sdtune-tmp-${path.basename(out)}-${process.pid}-${randomBytes(4).toString('hex')}`);
  await mkdir(tmp, { recursive: true });
  let count = 0, bytes = 0;
  try {
    const index = src.modelIndex ? { ...src.modelIndex } : sd15ModelIndex(src.variant === 'inpaint', src.variant === 'depth');
    for (const c of COMPONENTS) if (!src.components[c] && Array.isArray(index[c])) index[c] = [null, null];
    await writeFileAtomic(path.join(tmp, 'model_index.json'), jsonBytes(index));
    for (const c of present) {
      const comp = src.components[c]!;
      const dir = path.join(tmp, c);
      await mkdir(dir);
      await writeFileAtomic(path.join(dir, 'config.json'), jsonBytes(withDtype(comp, prec)));
      const tensors = new Map<string, LazyTensor>();
      for (const [k, t] of comp.tensors) tensors.set(k, lazy(t, t.shape, prec, tick));
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
    if (replace) {
      // the complete new folder is in place before the old one goes: move the old aside, rename, then delete it
      const old = `${tmp}-old`;
      const had = await rename(out, old).then(() => true, () => false);
      await rename(tmp, out);
      if (had) await rm(old, { recursive: true, force: true });
    } else {
      await assertFree(out, true);
      await rmdir(out).catch(() => {}); // an empty folder may stand in the way of the rename
      await rename(tmp, out);
    }
  } catch (e) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    throw e;
  }
  return { layout: 'diffusers', tensors: count, bytes };
}
