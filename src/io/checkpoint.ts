/**
 * Opening a model from a path (spec: checkpoint-layouts.md §2, §6): a diffusers folder (whole pipeline or one
 * component folder) or a single-file LDM .safetensors. Opening reads headers and configs only and yields, per
 * component, its diffusers config and a table diffusers key -> tensor in some file (+ layout transform); weights are
 * read later, one tensor at a time. PyTorch pickles (.ckpt/.pt/.bin) are read as data by src/io/pickle.ts (any
 * non-data global refused); LoRA / embedding files and other model families get errors that say what the file is.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError, fileError, fmtShape, formatError, usageError } from '../errors.js';
import { inferConfig, SD15_SCHEDULER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, structuralMismatches } from '../models/presets.js';
import {
  COMPONENTS, DEPTH_MODEL_PREFIX, emaKey, ldmToDiffusersTable, normalizeDiffusersKeys, OPENCLIP_PREFIX, QKV_PART, transformShape,
  type Component, type KeyMapEntry, type Transform,
} from './ldm-keymap.js';
import { type TensorFile, TorchFile, openTensorFile } from './pickle.js';
import type { Dtype, RawTensor } from './safetensors.js';
import { TOKENIZER_FILES, type TokenizerFileName } from '../tokenizer/clip.js';

export type { Component, Transform } from './ldm-keymap.js';

export interface TensorRef {
  /** a safetensors file or a PyTorch pickle read as data (src/io/pickle.ts) */
  file: TensorFile;
  /** key in the file */
  name: string;
  dtype: Dtype;
  /** torch shape AFTER transform */
  shape: number[];
  transform: Transform;
}
export interface ComponentSource {
  component: Component;
  /** diffusers config.json fields */
  config: Record<string, unknown>;
  /** key = diffusers key */
  tensors: Map<string, TensorRef>;
}
export interface CheckpointSource {
  path: string;
  layout: 'diffusers' | 'single-file';
  /** by the UNet's input channels: 4 (txt2img/img2img), 9 (inpainting), 5 (depth-to-image: latents + depth) */
  variant: 'v1' | 'inpaint' | 'depth';
  dtype: 'float32' | 'float16' | 'bfloat16' | 'mixed';
  hasEma: boolean;
  usedEma: boolean;
  components: Partial<Record<Component, ComponentSource>>;
  schedulerConfig: Record<string, unknown>;
  tokenizerDir?: string;
  /** tokenizer files embedded by our single-file writer (file name -> content); used when no tokenizerDir is found */
  embeddedTokenizer?: Partial<Record<TokenizerFileName, string>>;
  modelIndex?: Record<string, unknown>;
  /** e.g. "ignored unknown config key x", "config inferred from tensor shapes" */
  notes: string[];
  close(): Promise<void>;
}
export interface OpenOptions {
  /** diffusers folder whose configs to use for a single file (like diffusers' from_single_file(config=...)) */
  configDir?: string;
  tokenizerDir?: string;
  ema?: boolean;
  /** weights variant of a diffusers folder, e.g. 'fp16' */
  variant?: string;
}

/** Metadata key under which our single-file writer stores {unet, vae, text_encoder, scheduler} configs as JSON. */
export const CONFIGS_METADATA_KEY = 'sdtune_configs';
/** Metadata key prefix of the tokenizer files our single-file writer embeds: `sdtune_tokenizer/vocab.json`, ... */
export const TOKENIZER_METADATA_PREFIX = 'sdtune_tokenizer/';
const PICKLE_EXT = /\.(ckpt|pt|pth|bin)$/i;
/** diffusers weights saved by torch.save (older folders): read as data when no .safetensors weights are there */
const PICKLE_WEIGHTS_RE = /^(diffusion_pytorch_model|pytorch_model)\.bin$/;
const WEIGHTS_RE = /^(diffusion_pytorch_model|model)(?:\.([^.]+))?\.safetensors(\.index\.json)?$/;
const PRIMARY_BASE: Record<Component, string> = { unet: 'diffusion_pytorch_model', vae: 'diffusion_pytorch_model', text_encoder: 'model' };
const CLASS_COMPONENT: Record<string, Component> = { UNet2DConditionModel: 'unet', AutoencoderKL: 'vae', CLIPTextModel: 'text_encoder' };
const PRESETS: Record<Component, Readonly<Record<string, unknown>>> = { unet: SD15_UNET_CONFIG, vae: SD15_VAE_CONFIG, text_encoder: SD15_TEXT_ENCODER_CONFIG };
const META_KEYS = ['_class_name', '_diffusers_version', '_name_or_path', '_commit_hash', '_use_default_values', 'torch_dtype', 'dtype',
  'transformers_version', 'architectures', 'model_type', 'dropout'];
const INFERRED_NOTE = 'config inferred from tensor shapes (SD v1 preset)';

const unsupported = (msg: string) => new SdtuneError('unsupported', msg);
const exists = (p: string) => stat(p).then(() => true, () => false);
const isDir = (p: string) => stat(p).then((s) => s.isDirectory(), () => false);

/** Parse a JSON file; a missing or malformed file is SdtuneError('file') naming it. */
async function readJson(file: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw fileError(`${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  try {
    const v = JSON.parse(text);
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not a JSON object');
    return v;
  } catch (e) {
    throw fileError(`${file}: malformed JSON (${(e as Error).message})`);
  }
}

// ---- detection (§6) --------------------------------------------------------------------------------------------
export type FileKind = 'lora' | 'embedding' | 'ldm' | 'ldm-vae' | 'diffusers-unet' | 'diffusers-vae' | 'diffusers-text_encoder' | 'unknown';
type Shapes = ReadonlyMap<string, readonly number[]>;

/** What a safetensors file is, from its key names and shapes alone (§6.1; first match wins). */
export function detectFileKind(shapes: Shapes): { kind: FileKind; vaePrefix?: string } {
  const keys = [...shapes.keys()];
  if (keys.some((k) => /^lora_(unet|te[12]?)_/.test(k) || /\.lora_[AB]\.|\.lora_(down|up)\.|_lora\.down\./.test(k))) return { kind: 'lora' };
  const only = keys.length === 1 ? shapes.get(keys[0])! : undefined;
  if ((only && (only.length === 1 || only.length === 2)) || keys.some((k) => k === 'emb_params' || k.startsWith('string_to_param')) ||
    (shapes.has('clip_l') && shapes.has('clip_g')))
    return { kind: 'embedding' };
  if (keys.some((k) => k.startsWith('model.diffusion_model.'))) return { kind: 'ldm' };
  if (shapes.has('conv_in.weight') && shapes.has('time_embedding.linear_1.weight')) return { kind: 'diffusers-unet' };
  if (shapes.has('encoder.down_blocks.0.resnets.0.conv1.weight')) return { kind: 'diffusers-vae' };
  for (const p of ['', 'first_stage_model.', 'vae.']) if (shapes.has(`${p}encoder.down.0.block.0.conv1.weight`)) return { kind: 'ldm-vae', vaePrefix: p };
  if (shapes.has('text_model.encoder.layers.0.self_attn.q_proj.weight')) return { kind: 'diffusers-text_encoder' };
  return { kind: 'unknown' };
}

export type Family = 'v1' | 'v1-inpainting' | 'v2' | 'v2-inpainting' | 'v2-depth' | 'sdxl' | 'sdxl-inpainting' | 'sdxl-refiner' | 'upscale-x4' | 'controlnet' | 'instruct-pix2pix';
const FAMILY_NAME: Record<Family, string> = {
  'v1': 'SD v1', 'v1-inpainting': 'SD v1 inpainting', 'v2': 'SD 2.x', 'v2-inpainting': 'SD 2.x inpainting', 'v2-depth': 'SD 2.x depth', 'sdxl': 'SDXL',
  'sdxl-inpainting': 'SDXL inpainting', 'sdxl-refiner': 'SDXL refiner', 'upscale-x4': 'SD x4 upscaler', 'controlnet': 'ControlNet',
  'instruct-pix2pix': 'InstructPix2Pix',
};

/**
 * Model family of an LDM single file, in diffusers' infer_diffusers_model_type order (§6.2; v1 is the fallback).
 * diffusers has no depth type (its depth pipeline cannot load single files): a 5-channel conv_in (latents + depth,
 * stable-diffusion-2-depth's 512-depth-ema) is ours, tested first as the 9-channel inpainting one is.
 */
export function detectFamily(shapes: Shapes): Family {
  const conv = shapes.get('model.diffusion_model.input_blocks.0.0.weight');
  if (conv?.[1] === 5) return 'v2-depth';
  const v2 = shapes.get('model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight')?.at(-1) === 1024;
  const xlBase = shapes.has('conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias');
  if (conv?.[1] === 9) return v2 ? 'v2-inpainting' : xlBase ? 'sdxl-inpainting' : 'v1-inpainting';
  if (v2) return 'v2';
  if (xlBase) return 'sdxl';
  if (shapes.has('conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias')) return 'sdxl-refiner';
  if (shapes.has('model.diffusion_model.input_blocks.10.0.skip_connection.bias')) return 'upscale-x4';
  if (shapes.has('control_model.time_embed.0.weight')) return 'controlnet';
  if (conv?.[1] === 8) return 'instruct-pix2pix';
  const keys = [...shapes.keys()];
  if (keys.some((k) => k.startsWith('cond_stage_model.model.'))) return 'v2'; // OpenCLIP text tower
  if (keys.some((k) => k.startsWith('conditioner.'))) return 'sdxl';
  return 'v1';
}

// ---- shared helpers --------------------------------------------------------------------------------------------
const shapesOf = (f: TensorFile): Map<string, number[]> => new Map([...f.tensors].map(([k, t]) => [k, t.shape]));
const refShapes = (t: Map<string, TensorRef>): Map<string, number[]> => new Map([...t].map(([k, r]) => [k, r.shape]));

/** Turn table rows (file key -> diffusers key) into TensorRefs; a diffusers key reached twice is an error. */
function refsFrom(rows: KeyMapEntry[], fileOf: (key: string) => TensorFile, source: string): Map<string, TensorRef> {
  const out = new Map<string, TensorRef>();
  for (const e of rows) {
    if (out.has(e.to)) throw formatError(`${source}: keys "${out.get(e.to)!.name}" and "${e.from}" are the same weight (${e.to})`);
    const file = fileOf(e.from);
    const info = file.info(e.from);
    out.set(e.to, { file, name: e.from, dtype: info.dtype, shape: transformShape(e.transform, info.shape, `${file.path}: ${e.from}`), transform: e.transform });
  }
  return out;
}

/** Keep unknown config keys but say so (principle 4: read configs as diffusers writes them). */
function noteUnknownKeys(c: Component, config: Record<string, unknown>, where: string, notes: string[]): void {
  const known = new Set([...Object.keys(PRESETS[c]), ...META_KEYS]);
  const unknown = Object.keys(config).filter((k) => !known.has(k));
  if (unknown.length) notes.push(`${where}: ignored unknown config key${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}`);
}

/** A given config must agree with the weights on every field the shapes determine. */
function checkStructure(c: Component, config: Record<string, unknown>, tensors: Map<string, TensorRef>, where: string): void {
  const bad = structuralMismatches(c, config, inferConfig(c, refShapes(tensors), { requireHeads: false }));
  if (bad.length) throw formatError(`${where}: ${c} config does not match the weights: ${bad.join('; ')}`);
}

const FLOAT_NAMES: Partial<Record<Dtype, CheckpointSource['dtype']>> = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' };
/** Overall float dtype of the components' tensors ('mixed' when they differ). */
function overallDtype(components: Partial<Record<Component, ComponentSource>>): CheckpointSource['dtype'] {
  const seen = new Set<string>();
  for (const c of Object.values(components))
    for (const r of c!.tensors.values()) if (r.dtype.startsWith('F') || r.dtype === 'BF16') seen.add(FLOAT_NAMES[r.dtype] ?? 'mixed');
  return seen.size === 1 ? ([...seen][0] as CheckpointSource['dtype']) : seen.size === 0 ? 'float32' : 'mixed';
}
const variantOf = (components: Partial<Record<Component, ComponentSource>>): CheckpointSource['variant'] => {
  const inCh = components.unet?.tensors.get('conv_in.weight')?.shape[1];
  return inCh === 9 ? 'inpaint' : inCh === 5 ? 'depth' : 'v1';
};

/** Assemble the source; `files` are closed together by close(). */
function makeSource(
  fields: Omit<CheckpointSource, 'close' | 'dtype' | 'variant'>,
  files: TensorFile[],
): CheckpointSource {
  return {
    ...fields,
    dtype: overallDtype(fields.components),
    variant: variantOf(fields.components),
    close: async () => void (await Promise.all([...new Set(files)].map((f) => f.close()))),
  };
}

/** Open files, closing those already opened when one fails. */
async function openAll(paths: string[], opened: TensorFile[]): Promise<TensorFile[]> {
  const out: TensorFile[] = [];
  for (const p of paths) {
    const f = await openTensorFile(p);
    opened.push(f);
    out.push(f);
  }
  return out;
}

// ---- diffusers folders -----------------------------------------------------------------------------------------
/** Pick the weights of a component folder: plain name, `<name>.<variant>.safetensors`, or a sharded index. */
async function findWeights(dir: string, c: Component, variant: string | undefined, notes: string[]): Promise<string> {
  const names = (await readdir(dir)).sort();
  const cands = names
    .map((n) => ({ n, m: WEIGHTS_RE.exec(n) }))
    .filter((x) => x.m)
    .map(({ n, m }) => ({ n, variant: m![2], rank: (m![1] === PRIMARY_BASE[c] ? 0 : 2) + (m![3] ? 1 : 0) }))
    .sort((a, b) => a.rank - b.rank);
  const rel = path.basename(dir);
  if (variant !== undefined) {
    const v = cands.find((x) => x.variant === variant);
    if (!v) throw fileError(`${dir}: no "${variant}" weights variant (found: ${cands.map((x) => x.n).join(', ') || 'no safetensors weights'})`);
    return path.join(dir, v.n);
  }
  const plain = cands.find((x) => x.variant === undefined);
  if (plain) return path.join(dir, plain.n);
  const variants = [...new Set(cands.map((x) => x.variant!))];
  if (variants.length === 1) {
    notes.push(`${rel}: using the ${variants[0]} weights variant (the only weights there)`);
    return path.join(dir, cands[0].n);
  }
  if (variants.length > 1) throw usageError(`${dir}: several weights variants (${variants.join(', ')}) and no plain weights; choose one (variant)`);
  const pickled = names.find((n) => PICKLE_WEIGHTS_RE.test(n));
  if (pickled) return path.join(dir, pickled); // read as data (src/io/pickle.ts)
  const pickle = names.find((n) => PICKLE_EXT.test(n));
  throw fileError(`${dir}: no weights (expected ${PRIMARY_BASE[c]}.safetensors${c === 'text_encoder' ? ' or pytorch_model.bin' : ' or .bin'})${pickle ? `; ${pickle} is not a name diffusers uses for weights` : ''}`);
}

/** Open one weights file or sharded index; returns key -> shape and key -> file. */
async function openWeights(weights: string, opened: TensorFile[]) {
  const fileOf = new Map<string, TensorFile>();
  if (!weights.endsWith('.index.json')) {
    const [f] = await openAll([weights], opened);
    for (const k of f.keys()) fileOf.set(k, f);
    return { shapes: shapesOf(f), fileOf };
  }
  const index = await readJson(weights);
  const map = index.weight_map;
  if (typeof map !== 'object' || map === null || Array.isArray(map)) throw fileError(`${weights}: no "weight_map" object`);
  const entries = Object.entries(map as Record<string, unknown>);
  const bad = entries.find(([, v]) => typeof v !== 'string');
  if (bad || entries.some(([, v]) => path.basename(v as string) !== v))
    throw fileError(`${weights}: weight_map entry "${(bad ?? entries.find(([, v]) => path.basename(v as string) !== v))![0]}" is not a file name in this folder`);
  const shardNames = [...new Set(entries.map(([, v]) => v as string))];
  const shards = await openAll(shardNames.map((n) => path.join(path.dirname(weights), n)), opened);
  const byName = new Map(shardNames.map((n, i) => [n, shards[i]]));
  const shapes = new Map<string, number[]>();
  for (const [k, v] of entries) {
    const f = byName.get(v as string)!;
    if (!f.has(k)) throw formatError(`${weights}: weight_map puts "${k}" in ${v}, which has no such tensor`);
    shapes.set(k, f.info(k).shape);
    fileOf.set(k, f);
  }
  for (const f of shards) for (const k of f.keys()) if (fileOf.get(k) !== f) throw formatError(`${f.path}: tensor "${k}" is not listed in ${weights}`);
  return { shapes, fileOf };
}

/** Which component a folder with config.json holds (by class name, then by folder name). */
function componentOfConfig(dir: string, config: Record<string, unknown>): Component {
  const cls = [config._class_name, ...(Array.isArray(config.architectures) ? config.architectures : [])].find((x) => typeof x === 'string') as string | undefined;
  if (cls && CLASS_COMPONENT[cls]) return CLASS_COMPONENT[cls];
  if (config.model_type === 'clip_text_model') return 'text_encoder';
  if (cls) throw unsupported(`${dir}: a ${cls} folder; sdtune opens SD v1 components (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)`);
  const name = path.basename(dir) as Component;
  if (COMPONENTS.includes(name)) return name;
  throw formatError(`${dir}/config.json: cannot tell which component this is (no _class_name or architectures)`);
}

/** Open one diffusers component folder (config.json + weights). */
async function openComponentDir(dir: string, opts: OpenOptions, notes: string[], opened: TensorFile[], weightsFile?: string) {
  const config = await readJson(path.join(dir, 'config.json'));
  const c = componentOfConfig(dir, config);
  const where = `${path.basename(dir)}/config.json`;
  noteUnknownKeys(c, config, where, notes);
  const weights = weightsFile ?? (await findWeights(dir, c, opts.variant, notes));
  const { shapes, fileOf } = await openWeights(weights, opened);
  const { entries, ignored } = normalizeDiffusersKeys(c, shapes, weights);
  if (ignored.length) notes.push(`${path.basename(dir)}: ignored ${ignored.join(', ')}`);
  const tensors = refsFrom(entries, (k) => fileOf.get(k)!, weights);
  checkStructure(c, config, tensors, weights);
  return { component: c, config, tensors } satisfies ComponentSource;
}

/** Scheduler config of a pipeline folder, or the SD v1 preset with a note. */
async function schedulerOf(dir: string | undefined, notes: string[]): Promise<Record<string, unknown>> {
  const f = dir && path.join(dir, 'scheduler', 'scheduler_config.json');
  if (f && (await exists(f))) return readJson(f);
  notes.push('no scheduler/scheduler_config.json: using the SD v1 PNDM scheduler preset');
  return { ...SD15_SCHEDULER_CONFIG };
}
const dirIfExists = async (p: string | undefined) => (p && (await isDir(p)) ? p : undefined);

/** Open a pipeline folder with any subset of unet/, vae/, text_encoder/. */
async function openPipelineDir(dir: string, opts: OpenOptions, opened: TensorFile[]): Promise<CheckpointSource> {
  const notes: string[] = [];
  const indexFile = path.join(dir, 'model_index.json');
  const modelIndex = (await exists(indexFile)) ? await readJson(indexFile) : undefined;
  const cls = modelIndex?._class_name;
  if (typeof cls === 'string' && /XL/.test(cls)) throw unsupported(`${dir}: ${cls} is an SDXL pipeline; sdtune supports SD v1 and v1-inpainting`);
  const components: Partial<Record<Component, ComponentSource>> = {};
  for (const c of COMPONENTS) {
    const sub = path.join(dir, c);
    if (await exists(path.join(sub, 'config.json'))) components[c] = await openComponentDir(sub, opts, notes, opened);
    else if (Array.isArray(modelIndex?.[c]) && (modelIndex![c] as unknown[])[0] != null) notes.push(`${c}/ is listed in model_index.json but missing`);
  }
  if (!Object.keys(components).length) throw formatError(`${dir}: no unet/, vae/ or text_encoder/ folder with a config.json`);
  return makeSource(
    {
      path: dir, layout: 'diffusers', hasEma: false, usedEma: false, components, modelIndex, notes,
      schedulerConfig: await schedulerOf(dir, notes),
      tokenizerDir: opts.tokenizerDir ?? (await dirIfExists(path.join(dir, 'tokenizer'))),
    },
    opened,
  );
}

/** Open a component folder passed directly (e.g. `model/unet`); siblings give scheduler and tokenizer. */
async function openSingleComponent(dir: string, opts: OpenOptions, opened: TensorFile[], weightsFile?: string): Promise<CheckpointSource> {
  const notes: string[] = [];
  const src = await openComponentDir(dir, opts, notes, opened, weightsFile);
  const parent = path.dirname(dir);
  const hasPipeline = await exists(path.join(parent, 'scheduler', 'scheduler_config.json'));
  return makeSource(
    {
      path: dir, layout: 'diffusers', hasEma: false, usedEma: false, components: { [src.component]: src }, notes,
      schedulerConfig: await schedulerOf(hasPipeline ? parent : undefined, notes),
      tokenizerDir: opts.tokenizerDir ?? (await dirIfExists(path.join(parent, 'tokenizer'))),
    },
    opened,
  );
}

// ---- single files ----------------------------------------------------------------------------------------------
/** Configs embedded by our own single-file writer, if any. */
function embeddedConfigs(file: TensorFile): Record<string, Record<string, unknown>> | undefined {
  const text = file.metadata[CONFIGS_METADATA_KEY];
  if (text === undefined) return undefined;
  try {
    const v = JSON.parse(text);
    if (typeof v !== 'object' || v === null) throw new Error('not an object');
    return v;
  } catch (e) {
    throw fileError(`${file.path}: metadata "${CONFIGS_METADATA_KEY}" is not valid JSON (${(e as Error).message})`);
  }
}

/** Tokenizer files embedded by our single-file writer (TOKENIZER_METADATA_PREFIX keys), if any. */
function embeddedTokenizer(file: TensorFile): Partial<Record<TokenizerFileName, string>> | undefined {
  const out: Partial<Record<TokenizerFileName, string>> = {};
  for (const name of Object.keys(TOKENIZER_FILES) as TokenizerFileName[]) {
    const text = file.metadata[TOKENIZER_METADATA_PREFIX + name];
    if (text !== undefined) out[name] = text;
  }
  return Object.keys(out).length ? out : undefined;
}

/**
 * The tokenizer folder of a single file, first found: the one asked for, the config folder's tokenizer/, the
 * tokenizer/ of a diffusers folder named like the file (`x.safetensors` next to `x/`, as convert writes them), a
 * tokenizer/ beside the file. Otherwise the caller falls back to the file's embedded tokenizer.
 */
async function singleFileTokenizerDir(file: string, opts: OpenOptions): Promise<string | undefined> {
  if (opts.tokenizerDir) return opts.tokenizerDir;
  const dir = path.dirname(file);
  for (const cand of [opts.configDir && path.join(opts.configDir, 'tokenizer'), path.join(dir, path.basename(file).replace(/\.(safetensors|ckpt|pt|pth|bin)$/i, ''), 'tokenizer'), path.join(dir, 'tokenizer')]) {
    const found = await dirIfExists(cand || undefined);
    if (found) return found;
  }
  return undefined;
}

const SD2_FAMILIES: ReadonlySet<Family> = new Set(['v2', 'v2-depth', 'v2-inpainting']);

/**
 * SD 2 conditions on OpenCLIP's penultimate layer (its LDM configs say layer: "penultimate"); diffusers' text encoder
 * is the tower cut there (23 of ViT-H's 24 layers) and its converter skips resblocks.23. The rows of the last layer go
 * when the tower has one more layer than `layers` (the config's num_hidden_layers; without a config: 23 when it has
 * 24, else all layers are kept, as a tower already cut, which is what diffusers' converter writes).
 */
function cutAtPenultimate(rows: KeyMapEntry[], layers: number | undefined, notes: string[]): KeyMapEntry[] {
  let count = 0;
  for (const e of rows) {
    const r = /^text_model\.encoder\.layers\.(\d+)\./.exec(e.to);
    if (r) count = Math.max(count, +r[1] + 1);
  }
  const keep = layers ?? (count === 24 ? 23 : count);
  if (keep !== count - 1) {
    if (layers === undefined) notes.push(`text encoder: all ${count} OpenCLIP layers used (a tower already cut at the penultimate layer, as diffusers' converter writes it)`);
    return rows; // a config that disagrees otherwise fails checkStructure, naming both counts
  }
  notes.push(`text encoder: OpenCLIP layer ${count - 1} (the last) not loaded: SD 2 conditions on the penultimate layer`);
  return rows.filter((e) => !e.to.startsWith(`text_model.encoder.layers.${count - 1}.`));
}

/** Scheduler of an SD 2.x single file opened without a config: the prediction type cannot be read from weights (§6, point 3). */
function sd2Scheduler(family: Family, notes: string[]): Record<string, unknown> {
  // depth (512-depth-ema) and inpainting (512-inpainting-ema) are epsilon models; a plain 2.x file defaults to the
  // 768-v one, as diffusers' from_single_file does
  const v = family === 'v2';
  notes.push(v
    ? 'no scheduler config: using PNDM with prediction_type v_prediction (SD 2.x 768-v, diffusers\' default for SD 2 files); pass --config DIR for an epsilon model such as SD 2 base 512'
    : `no scheduler config: using PNDM with prediction_type epsilon (${FAMILY_NAME[family]} models are epsilon-prediction)`);
  return { ...SD15_SCHEDULER_CONFIG, prediction_type: v ? 'v_prediction' : 'epsilon' };
}

/** Open a single-file LDM checkpoint (full, or VAE-only). */
async function openLdmFile(file: TensorFile, vaePrefix: string | undefined, opts: OpenOptions): Promise<CheckpointSource> {
  const notes: string[] = [];
  const shapes = shapesOf(file);
  let family: Family = 'v1';
  if (vaePrefix === undefined) {
    family = detectFamily(shapes);
    if (family !== 'v1' && family !== 'v1-inpainting' && !SD2_FAMILIES.has(family))
      throw unsupported(`${file.path}: an ${FAMILY_NAME[family]} checkpoint; sdtune opens SD v1, v1-inpainting, 2.x, 2.x depth and 2.x inpainting single files`);
  }
  const sd2 = SD2_FAMILIES.has(family);
  const table = ldmToDiffusersTable(shapes, { vaePrefix, source: file.path });
  const midas = table.ignored.filter((k) => k.startsWith(DEPTH_MODEL_PREFIX));
  const other = table.ignored.filter((k) => !k.startsWith(DEPTH_MODEL_PREFIX));
  if (other.length) notes.push(`ignored ${other.length} non-weight key(s): ${other.join(', ')}`);
  if (midas.length) notes.push(`ignored the ${midas.length} tensors of the MiDaS depth estimator (${DEPTH_MODEL_PREFIX}*): the depth map comes from --depth-map`);

  // EMA (§2.3): substitute the flattened EMA copy for each UNet weight when asked.
  const hasEma = table.ema.length > 100;
  if (opts.ema && !hasEma) throw usageError(`${file.path} has no EMA weights (no model_ema.* keys); drop the EMA option`);
  let rows = table.entries;
  if (opts.ema) {
    const unused = new Set(table.ema);
    rows = rows.map((e) => {
      if (e.component !== 'unet') return e;
      const k = emaKey(e.from);
      if (!file.has(k)) throw formatError(`${file.path}: EMA weights incomplete: no "${k}" for "${e.from}"`);
      if (fmtShape(file.info(k).shape) !== fmtShape(file.info(e.from).shape))
        throw formatError(`${file.path}: EMA "${k}" has shape ${fmtShape(file.info(k).shape)}, expected ${fmtShape(file.info(e.from).shape)}`);
      unused.delete(k);
      return { ...e, from: k };
    });
    if (unused.size) throw formatError(`${file.path}: EMA key "${[...unused][0]}" matches no UNet weight`);
  } else if (table.ema.length) notes.push(`ignored ${table.ema.length} EMA key(s) (model_ema.*)${hasEma ? '; use the EMA option to load them' : ''}`);

  const configDir = opts.configDir;
  if (configDir && !(await isDir(configDir))) throw usageError(`config folder ${configDir} does not exist`);
  const embedded = embeddedConfigs(file);
  const components: Partial<Record<Component, ComponentSource>> = {};
  for (const c of COMPONENTS) {
    let own = rows.filter((e) => e.component === c);
    if (!own.length) continue;
    const cfgFile = configDir && path.join(configDir, c, 'config.json');
    let given: { config: Record<string, unknown>; where: string } | undefined;
    if (cfgFile && (await exists(cfgFile))) {
      given = { config: await readJson(cfgFile), where: `${file.path} with ${cfgFile}` };
      noteUnknownKeys(c, given.config, cfgFile, notes);
    } else if (embedded?.[c]) given = { config: embedded[c], where: `${file.path} (embedded ${c} config)` };
    if (c === 'text_encoder' && own.some((e) => e.from.startsWith(OPENCLIP_PREFIX))) {
      const layers = given?.config.num_hidden_layers;
      own = cutAtPenultimate(own, typeof layers === 'number' ? layers : undefined, notes);
    }
    const tensors = refsFrom(own, () => file, file.path);
    let config: Record<string, unknown>;
    if (given) {
      config = given.config;
      checkStructure(c, config, tensors, given.where);
    } else {
      try {
        config = inferConfig(c, refShapes(tensors), { sd2 });
        // a plain 2.x file is taken for the 768-v model (see sd2Scheduler): its native size is 768
        if (c === 'unet' && family === 'v2') config = { ...config, sample_size: 96 };
      } catch (e) {
        throw e instanceof SdtuneError ? new SdtuneError(e.kind, `${file.path}: ${e.message}`) : e;
      }
      const note = sd2 ? INFERRED_NOTE.replace('SD v1 preset', 'SD 2.x presets') : INFERRED_NOTE;
      if (!notes.includes(note)) notes.push(note);
    }
    components[c] = { component: c, config, tensors };
  }
  if (!Object.keys(components).length) throw formatError(`${file.path}: no weights`);
  if (opts.variant) notes.push(`the weights variant "${opts.variant}" applies to diffusers folders only; ignored`);

  let schedulerConfig: Record<string, unknown>;
  if (configDir && (await exists(path.join(configDir, 'scheduler', 'scheduler_config.json')))) schedulerConfig = await schedulerOf(configDir, notes);
  else if (embedded?.scheduler) schedulerConfig = embedded.scheduler;
  else if (sd2) schedulerConfig = sd2Scheduler(family, notes);
  else schedulerConfig = await schedulerOf(undefined, notes);
  const indexFile = configDir && path.join(configDir, 'model_index.json');
  return makeSource(
    {
      path: file.path, layout: 'single-file', hasEma, usedEma: !!opts.ema, components, notes, schedulerConfig,
      modelIndex: indexFile && (await exists(indexFile)) ? await readJson(indexFile) : undefined,
      tokenizerDir: await singleFileTokenizerDir(file.path, opts),
      embeddedTokenizer: embeddedTokenizer(file),
    },
    [file],
  );
}

/** Open a .safetensors file or a PyTorch pickle: classify it (§6) and open it as what it is, or say what it is. */
async function openFile(p: string, opts: OpenOptions, opened: TensorFile[]): Promise<CheckpointSource> {
  // a pickle is read as data (src/io/pickle.ts); Lightning's .ckpt nests the weights under "state_dict"
  const file = PICKLE_EXT.test(p) ? await TorchFile.open(p, { stateDict: true }) : await openTensorFile(p);
  opened.push(file);
  const shapes = shapesOf(file);
  const { kind, vaePrefix } = detectFileKind(shapes);
  switch (kind) {
    case 'lora':
      throw formatError(`${p} is a LoRA (e.g. key "${file.keys()[0]}"), not a model checkpoint; pass it with --lora`);
    case 'embedding':
      throw formatError(`${p} is a textual-inversion embedding (${file.keys().slice(0, 3).join(', ')}), not a model checkpoint; pass it with --embedding`);
    case 'ldm':
      return openLdmFile(file, undefined, opts);
    case 'ldm-vae':
      return openLdmFile(file, vaePrefix, opts);
    case 'unknown':
      if (shapes.has('control_model.time_embed.0.weight')) throw unsupported(`${p}: a ControlNet checkpoint; sdtune does not support ControlNet`);
      if ([...shapes.keys()].some((k) => k.startsWith('conditioner.'))) throw unsupported(`${p}: an SDXL checkpoint; sdtune opens SD v1 single files`);
      throw formatError(`${p}: not a Stable Diffusion checkpoint (no model.diffusion_model.*, first_stage_model.* or diffusers keys)`);
    default: {
      // a diffusers component weights file: open its folder with this file
      const dir = path.dirname(p);
      if (!(await exists(path.join(dir, 'config.json'))))
        throw formatError(`${p} holds diffusers ${kind.slice('diffusers-'.length)} weights but has no config.json next to it; pass the diffusers folder`);
      await file.close();
      return openSingleComponent(dir, opts, opened, p);
    }
  }
}

/** Open a diffusers folder or a single-file LDM .safetensors; reads headers and configs only. */
export async function openCheckpoint(p: string, opts: OpenOptions = {}): Promise<CheckpointSource> {
  const st = await stat(p).catch(() => undefined);
  if (!st) throw fileError(`${p}: no such file or folder`);
  const opened: TensorFile[] = [];
  try {
    if (!st.isDirectory()) return await openFile(p, opts, opened);
    if (opts.configDir) throw usageError(`${p} is a folder: its own configs are used (configDir applies to single files only)`);
    const subs = await Promise.all(COMPONENTS.map((c) => exists(path.join(p, c, 'config.json'))));
    if ((await exists(path.join(p, 'model_index.json'))) || subs.some(Boolean)) return await openPipelineDir(p, opts, opened);
    if (await exists(path.join(p, 'config.json'))) return await openSingleComponent(p, opts, opened);
    const names = await readdir(p);
    const pickle = names.find((n) => PICKLE_EXT.test(n));
    if (pickle) throw formatError(`${p}: not a diffusers folder, but it holds the PyTorch file ${pickle}: pass that file itself`);
    throw formatError(`${p}: not a diffusers folder (no model_index.json, config.json, or unet/ vae/ text_encoder/ with config.json)`);
  } catch (e) {
    await Promise.all(opened.map((f) => f.close().catch(() => {})));
    throw e;
  }
}

/** Read one tensor in torch layout, float32, transform applied. */
export async function readTensorRef(ref: TensorRef): Promise<RawTensor> {
  const raw = await ref.file.readFloat(ref.name); // weights are floats: an integer dtype is refused, not reinterpreted
  const shape = transformShape(ref.transform, raw.shape, `${ref.file.path}: ${ref.name}`);
  if (fmtShape(shape) !== fmtShape(ref.shape)) throw formatError(`${ref.file.path}: "${ref.name}" has shape ${fmtShape(shape)}, expected ${fmtShape(ref.shape)}`);
  const part = QKV_PART[ref.transform];
  if (part === undefined) return { dtype: raw.dtype, shape, data: raw.data };
  // one third of a fused q,k,v projection: its rows are contiguous in the row-major data
  const n = shape.reduce((a, b) => a * b, 1);
  return { dtype: raw.dtype, shape, data: raw.data.slice(part * n, (part + 1) * n) };
}

/** Read a whole component (diffusers keys, torch layout, f32). */
export async function readComponent(src: ComponentSource): Promise<Map<string, RawTensor>> {
  const out = new Map<string, RawTensor>();
  for (const [k, ref] of src.tensors) out.set(k, await readTensorRef(ref));
  return out;
}
