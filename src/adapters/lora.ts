/**
 * LoRA adapters (spec: shared/spec/lora-formats.md): read kohya/A1111, PEFT and older diffusers files into modules
 * resolved against the model's real module names, merge them into params trees (W += m * alpha/r * up@down) with an
 * exact restore, and write kohya and PEFT files that sd-scripts, A1111 and diffusers load.
 */
import * as tf from '@tensorflow/tfjs';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError, fmtShape, formatError, usageError } from '../errors.js';
import { addnetHash, legacyModelHash } from '../io/hashes.js';
import { layoutKind, torchShapeOf } from '../io/layout.js';
import { unetModuleToLdm, unetStructureOf } from '../io/ldm-keymap.js';
import { isPickleFile, openTensorFile } from '../io/pickle.js';
import { type RawTensor, type WritableTensor, writeSafetensors } from '../io/safetensors.js';
import { type ParamTree, flattenParams } from '../models/params.js';

export type LoraComponent = 'unet' | 'text_encoder';

/** A host tensor in torch layout. */
export interface HostArray {
  shape: number[];
  data: Float32Array;
}

/** One adapted module: torch-layout factors, as kohya's LoRAModule holds them (rank = down.shape[0]). */
export interface LoraModule {
  component: LoraComponent;
  /** diffusers / transformers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` */
  module: string;
  /** lora_down / lora_A: [r,in] (Linear), [r,in,kh,kw] (Conv2d), [r,in,1,1] with `mid` */
  down: HostArray;
  /** lora_up / lora_B: [out,r] or [out,r,1,1] */
  up: HostArray;
  /** LoCon CP decomposition (LyCORIS `lora_mid.weight`): [r,r,kh,kw] */
  mid?: HostArray;
  /** scale = alpha / rank; alpha = rank when the file has none */
  alpha: number;
}

export interface LoraFile {
  path: string;
  format: 'kohya' | 'peft' | 'diffusers-old';
  modules: LoraModule[];
  metadata: Record<string, string>;
}

export interface LoraModel {
  unet?: ParamTree;
  textEncoder?: ParamTree;
}

/** Per-component multipliers (A1111 `<lora:name:te:unet>`); a number applies to both. */
export type LoraScale = number | { unet?: number; textEncoder?: number };

const KOHYA_PREFIX: Record<LoraComponent, string> = { unet: 'lora_unet_', text_encoder: 'lora_te_' };
const PEFT_PREFIX: Record<LoraComponent, string> = { unet: 'unet.', text_encoder: 'text_encoder.' };
const treeOf = (model: LoraModel, c: LoraComponent) => (c === 'unet' ? model.unet : model.textEncoder);
const rankOf = (m: LoraModule) => m.down.shape[0];
const list = (xs: string[], n = 8) => `${xs.slice(0, n).join(', ')}${xs.length > n ? `, ... (${xs.length} in all)` : ''}`;

// ---- the model's adaptable modules ------------------------------------------------------------------------------

interface Target {
  component: LoraComponent;
  module: string;
  /** torch shape of the module's weight */
  shape: number[];
}

/** Every Linear / Conv2d module of the given trees (a 2-D or 4-D `.weight` that is not an embedding table). */
function targetsOf(model: LoraModel): Map<string, Target> {
  const out = new Map<string, Target>();
  for (const component of ['unet', 'text_encoder'] as const) {
    const tree = treeOf(model, component);
    if (!tree) continue;
    for (const [key, t] of flattenParams(tree)) {
      if (!key.endsWith('.weight') || layoutKind(key, t.shape) === 'as-is') continue;
      const module = key.slice(0, -'.weight'.length);
      out.set(`${component}:${module}`, { component, module, shape: torchShapeOf(key, t.shape) });
    }
  }
  return out;
}

/**
 * kohya name -> module, generated from the model's own module paths (spec §1.2, §3.3 "recommended"): prefix + path
 * with '.' -> '_'; `lora_te1_` as diffusers' convert_state_dict_to_kohya writes for SD1; LDM-named UNet modules
 * (A1111 convert_diffusers_name_to_compvis, §2) as a fallback. Colliding flat names are marked ambiguous.
 */
function kohyaLookup(targets: Map<string, Target>): Map<string, Target | null> {
  const table = new Map<string, Target | null>();
  const put = (name: string, t: Target) => table.set(name, table.has(name) && table.get(name) !== t ? null : t);
  const flat = (s: string) => s.replace(/\./g, '_');
  const unetKeys = [...targets.values()].filter((t) => t.component === 'unet').map((t) => `${t.module}.weight`);
  const structure = unetStructureOf(unetKeys);
  for (const t of targets.values()) {
    put(KOHYA_PREFIX[t.component] + flat(t.module), t);
    if (t.component === 'text_encoder') put(`lora_te1_${flat(t.module)}`, t);
  }
  for (const t of targets.values()) {
    const ldm = t.component === 'unet' ? unetModuleToLdm(t.module, structure) : undefined;
    if (ldm && !table.has(`lora_unet_${flat(ldm)}`)) table.set(`lora_unet_${flat(ldm)}`, t);
  }
  return table;
}

// ---- reading ----------------------------------------------------------------------------------------------------

type Role = 'down' | 'up' | 'mid' | 'alpha';
interface Parts {
  down?: RawTensor;
  up?: RawTensor;
  mid?: RawTensor;
  alpha?: RawTensor;
}

/** LyCORIS / DoRA suffixes we recognise in order to refuse them by name. */
const UNSUPPORTED_SUFFIX: [RegExp, string][] = [
  [/^hada_/, 'LyCORIS LoHa'],
  [/^lokr_/, 'LyCORIS LoKr'],
  [/^oft_|^oft_blocks/, 'LyCORIS OFT'],
  [/^(dora_scale|lora_magnitude_vector)$/, 'DoRA'],
  [/^(diff|diff_b|on_input|w_norm|b_norm)$/, 'LyCORIS full/norm'],
  [/^lora_B\.bias$/, 'LoRA with bias (lora_bias)'],
];

function refuseSuffix(file: string, key: string, suffix: string): void {
  for (const [re, what] of UNSUPPORTED_SUFFIX) {
    if (re.test(suffix)) throw new SdtuneError('unsupported', `${file}: "${key}" is a ${what} tensor; only plain LoRA / LoCon files are supported`);
  }
}

/** kohya key -> [lora name, role] (spec §1.1). */
function parseKohyaKey(key: string): [string, Role | string] {
  const dot = key.indexOf('.');
  const name = dot < 0 ? key : key.slice(0, dot);
  const suffix = dot < 0 ? '' : key.slice(dot + 1);
  const role = ({ 'lora_down.weight': 'down', 'lora_up.weight': 'up', 'lora_mid.weight': 'mid', alpha: 'alpha' } as Record<string, Role>)[suffix];
  return [name, role ?? suffix];
}

/**
 * Older diffusers key -> PEFT key (spec §3.2 normalisation recipe): attention-processor era (`processor.to_q_lora.down`),
 * LoRACompatible layers (`.lora.down`) and the text encoder's `lora_linear_layer`; UNet-only files get `unet.`.
 */
function normalizeDiffusersKey(key: string): string {
  let k = /^(unet|text_encoder)\./.test(key) ? key : `unet.${key}`;
  const te = k.startsWith('text_encoder.');
  k = k.replace('.processor.', '.');
  for (const p of ['q', 'k', 'v', 'out']) {
    const to = te ? `${p}_proj` : p === 'out' ? 'to_out.0' : `to_${p}`;
    k = k.replace(`.to_${p}_lora.down.`, `.${to}.lora_A.`).replace(`.to_${p}_lora.up.`, `.${to}.lora_B.`);
  }
  return k.replace('.lora.down.', '.lora_A.').replace('.lora.up.', '.lora_B.')
    .replace('.lora_linear_layer.down.', '.lora_A.').replace('.lora_linear_layer.up.', '.lora_B.');
}

/** PEFT key -> [component, module, role] (spec §3.1). */
function parsePeftKey(key: string): [LoraComponent, string, Role | string] | undefined {
  const m = /^(unet|text_encoder)\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?)$/.exec(key);
  if (!m) return undefined;
  const role = m[3] === 'lora_A.weight' ? 'down' : m[3] === 'lora_B.weight' ? 'up' : m[3].replace(/\.weight$/, '');
  return [m[1] as LoraComponent, m[2], role];
}

/** A guess at the architecture a LoRA was trained for, from metadata and shapes (only used in error messages). */
function architectureHint(metadata: Record<string, string>, keys: string[], modules: Map<string, Parts>): string | undefined {
  const base = metadata.ss_base_model_version ?? '';
  if (base.startsWith('sdxl') || keys.some((k) => /^lora_te2_|^text_encoder_2\./.test(k))) return 'SDXL';
  if (metadata.ss_v2 === 'True' || base.startsWith('sd_v2')) return 'SD 2.x';
  for (const [name, p] of modules) {
    if (!/attn2[._]to_[kv]$/.test(name) || !p.down) continue;
    if (p.down.shape[1] === 2048) return 'SDXL';
    if (p.down.shape[1] === 1024) return 'SD 2.x';
  }
  return undefined;
}

const toF32 = (file: string, key: string, t: RawTensor): HostArray => {
  if (!(t.data instanceof Float32Array)) throw formatError(`${file}: "${key}" has dtype ${t.dtype}, expected a float tensor`);
  return { shape: t.shape, data: t.data };
};

/** Check one module's factors against its target (spec §4 validation) and build the LoraModule. */
function buildModule(file: string, name: string, t: Target, p: Parts, alpha: number | undefined, hint: string | undefined): LoraModule {
  if (!p.down || !p.up) throw formatError(`${file}: module "${name}" has ${p.down ? 'lora_down' : 'lora_up'} but no ${p.down ? 'lora_up' : 'lora_down'}`);
  const down = toF32(file, name, p.down);
  const up = toF32(file, name, p.up);
  const mid = p.mid && toF32(file, name, p.mid);
  const r = down.shape[0];
  const upOk = up.shape[1] === r && (up.shape.length === 2 || (up.shape.length === 4 && up.shape[2] === 1 && up.shape[3] === 1));
  const downOk = down.shape.length === 2 || down.shape.length === 4;
  const midOk = !mid || (mid.shape.length === 4 && mid.shape[0] === up.shape[1] && mid.shape[1] === r && down.shape.length === 4 && down.shape[2] * down.shape[3] === 1);
  const kernel = mid ? mid.shape.slice(2) : down.shape.length === 4 ? down.shape.slice(2) : [1, 1];
  const delta = [up.shape[0], down.shape[1], ...kernel];
  const targetKernel = t.shape.length === 4 ? t.shape.slice(2) : [1, 1];
  const fits = delta[0] === t.shape[0] && delta[1] === t.shape[1] && delta[2] === targetKernel[0] && delta[3] === targetKernel[1];
  if (!upOk || !downOk || !midOk) {
    const shapes = `down ${fmtShape(down.shape)}, up ${fmtShape(up.shape)}${mid ? `, mid ${fmtShape(mid.shape)}` : ''}`;
    throw formatError(`${file}: module "${name}" has inconsistent LoRA factors (${shapes}); expected down [r,in(,k,k)], up [out,r(,1,1)]`);
  }
  if (!fits) {
    const msg = `${file}: module "${name}" (${t.component} ${t.module}) changes a weight of shape ${fmtShape(t.shape)}, but its delta is ${fmtShape(t.shape.length === 4 ? delta : delta.slice(0, 2))}`;
    if (hint === 'SDXL') throw new SdtuneError('unsupported', `${msg}: this looks like an SDXL LoRA, which SD v1 models cannot use`);
    throw formatError(`${msg}${hint ? ` (this looks like an ${hint} LoRA)` : ''}`);
  }
  // kohya: alpha missing, 0 or NaN means alpha = rank (scale 1)
  const a = alpha !== undefined && Number.isFinite(alpha) && alpha !== 0 ? alpha : r;
  return { component: t.component, module: t.module, down, up, ...(mid ? { mid } : {}), alpha: a };
}

/** PEFT `lora_adapter_metadata` (diffusers save_lora_weights): per-module alpha with rank/alpha patterns (spec §3.1). */
function peftAlpha(metadata: Record<string, string>, file: string): ((c: LoraComponent, module: string, rank: number) => number) | undefined {
  const raw = metadata.lora_adapter_metadata;
  if (!raw) return undefined;
  let cfg: Record<string, unknown>;
  try {
    cfg = JSON.parse(raw) as Record<string, unknown>;
  } catch {
    throw formatError(`${file}: metadata "lora_adapter_metadata" is not valid JSON`);
  }
  // PEFT get_pattern_key: a pattern matches the module path itself or a dotted suffix of it
  const match = (patterns: unknown, module: string): number | undefined => {
    for (const [p, v] of Object.entries((patterns as Record<string, number>) ?? {})) {
      if (module === p || module.endsWith(`.${p}`)) return v;
      try {
        if (new RegExp(`^(.*\\.)?${p}$`).test(module)) return v;
      } catch {
        /* not a regex: plain names were checked above */
      }
    }
    return undefined;
  };
  return (c, module, rank) => {
    const prefix = c === 'unet' ? 'unet' : 'text_encoder';
    const r = match(cfg[`${prefix}.rank_pattern`], module) ?? (cfg[`${prefix}.r`] as number | undefined) ?? rank;
    const alpha = match(cfg[`${prefix}.alpha_pattern`], module) ?? (cfg[`${prefix}.lora_alpha`] as number | undefined) ?? r;
    return (alpha / r) * rank; // keep PEFT's scale alpha/r even if r differs from the tensors' rank
  };
}

/**
 * Read a kohya/A1111 (`lora_unet_*`, `lora_te_*`), PEFT (`unet.<module>.lora_A.weight`) or older diffusers LoRA
 * (spec §4 detection), resolving every module against the model's real module names; strict: unknown keys, modules
 * the model lacks, shape mismatches and SDXL / LyCORIS files fail with one message naming them.
 */
export async function readLora(file: string, model: LoraModel): Promise<LoraFile> {
  if (!/\.safetensors$/i.test(file) && !isPickleFile(file)) {
    throw new SdtuneError('unsupported', `${file}: LoRA files are read from .safetensors, or .pt/.bin files (PyTorch pickles, read as data)`);
  }
  const f = await openTensorFile(file); // kohya's torch.save(state_dict) .pt: the same flat keys
  try {
    const keys = f.keys();
    const metadata = { ...f.metadata };
    if (!keys.length) throw formatError(`${file}: the file holds no tensors`);
    if (architectureHint(metadata, keys, new Map()) === 'SDXL') {
      throw new SdtuneError('unsupported', `${file}: this is an SDXL LoRA (${metadata.ss_base_model_version ? `ss_base_model_version = ${metadata.ss_base_model_version}` : 'it adapts a second text encoder'}); SD v1 models cannot use it`);
    }
    const kohya = keys.some((k) => /^lora_(unet|te\d?)_/.test(k));
    const format: LoraFile['format'] = kohya ? 'kohya' : keys.some((k) => normalizeDiffusersKey(k) !== k) ? 'diffusers-old' : 'peft';

    // 1. group keys by module name (the kohya flat name, or component:module for diffusers)
    const groups = new Map<string, Parts>();
    const keyOf = new Map<string, { name: string; role: Role }>();
    const unknown: string[] = [];
    for (const key of keys) {
      let name: string, role: string;
      if (kohya) [name, role] = parseKohyaKey(key);
      else {
        const p = parsePeftKey(normalizeDiffusersKey(key));
        if (!p) {
          unknown.push(key);
          continue;
        }
        [name, role] = [`${p[0]}:${p[1]}`, p[2]];
      }
      if (!['down', 'up', 'mid', 'alpha'].includes(role)) {
        refuseSuffix(file, key, role);
        unknown.push(key);
        continue;
      }
      keyOf.set(key, { name, role: role as Role });
      if (!groups.has(name)) groups.set(name, {});
    }
    if (unknown.length) {
      const expect = kohya ? '<lora_name>.lora_down.weight / .lora_up.weight / .alpha' : 'unet.|text_encoder.<module>.lora_A.weight / .lora_B.weight';
      throw formatError(`${file}: ${unknown.length} keys are not ${format} LoRA tensors (expected ${expect}): ${list(unknown)}`);
    }
    for (const [key, { name, role }] of keyOf) groups.get(name)![role] = await (role === 'alpha' ? f.read(key) : f.readFloat(key)); // alpha may be an integer (spec §1.5)

    // 2. resolve module names against the model
    const targets = targetsOf(model);
    const lookup = kohya ? kohyaLookup(targets) : undefined;
    const hint = architectureHint(metadata, keys, groups);
    const missing: string[] = [];
    const resolved: [string, Target, Parts][] = [];
    for (const [name, parts] of groups) {
      const t = lookup ? lookup.get(name) : targets.get(name);
      if (lookup && t === null) throw formatError(`${file}: "${name}" matches more than one module of the model`);
      if (t) resolved.push([name, t, parts]);
      else missing.push(name);
    }
    if (missing.length) {
      const given = [model.unet && 'unet', model.textEncoder && 'text encoder'].filter(Boolean).join(' and ') || 'no components';
      const ldm = missing.filter((n) => /^lora_unet_(input_blocks|middle_block|output_blocks)_/.test(n));
      const msg = `${file}: ${missing.length} modules are not Linear/Conv2d modules of this model (${given} given): ${list(missing)}`;
      if (ldm.length) throw new SdtuneError('unsupported', `${msg}; they use LDM block names that do not exist in this SD v1 UNet: this looks like an ${hint ?? 'SDXL'} LoRA`);
      throw formatError(`${msg}${hint ? ` (this looks like an ${hint} LoRA)` : ''}`);
    }

    // 3. validate shapes and scales
    const alphaOf = kohya ? undefined : peftAlpha(metadata, file);
    const seen = new Map<string, string>();
    const modules = resolved.map(([name, t, p]) => {
      const id = `${t.component}:${t.module}`;
      if (seen.has(id)) throw formatError(`${file}: "${seen.get(id)}" and "${name}" adapt the same module ${t.module}`);
      seen.set(id, name);
      const alpha = p.alpha ? Number(p.alpha.data[0]) : alphaOf?.(t.component, t.module, p.down?.shape[0] ?? 1);
      return buildModule(file, name, t, p, alpha, hint);
    });
    return { path: file, format, modules, metadata };
  } finally {
    await f.close();
  }
}

// ---- merging ----------------------------------------------------------------------------------------------------

/** The unscaled delta up ⊗ down (spec §1.5) in the tf layout of a weight of tf shape `tfShape`. */
function deltaTf(m: LoraModule, tfShape: number[]): tf.Tensor {
  return tf.tidy(() => {
    const r = rankOf(m);
    const out = m.up.shape[0];
    const inDim = m.down.shape[1];
    const up = tf.tensor2d(m.up.data, [out, m.up.shape[1]]);
    let torch: tf.Tensor4D; // [out, in, kh, kw]
    if (m.mid) {
      // CP: dW[o,c,y,x] = sum_p sum_q up[o,p] mid[p,q,y,x] down[q,c]
      const [p, q, kh, kw] = m.mid.shape;
      const md = tf.tensor4d(m.mid.data, [p, q, kh, kw]).transpose([0, 2, 3, 1]).reshape([p * kh * kw, q]);
      const pyxc = tf.matMul(md, tf.tensor2d(m.down.data, [r, inDim])).reshape([p, kh * kw * inDim]);
      torch = tf.matMul(up, pyxc).reshape([out, kh, kw, inDim]).transpose([0, 3, 1, 2]);
    } else {
      const [kh, kw] = m.down.shape.length === 4 ? m.down.shape.slice(2) : [1, 1];
      torch = tf.matMul(up, tf.tensor2d(m.down.data, [r, inDim * kh * kw])).reshape([out, inDim, kh, kw]);
    }
    return tfShape.length === 4 ? torch.transpose([2, 3, 1, 0]) : torch.reshape([out, inDim]).transpose();
  });
}

/** The params-tree node that holds a module's `weight`. */
function moduleNode(tree: ParamTree, module: string): ParamTree {
  let node: ParamTree | tf.Tensor = tree;
  for (const part of module.split('.')) {
    node = (node as ParamTree)[part];
    if (!node || node instanceof tf.Tensor) throw formatError(`LoRA merge: the model has no module ${module}`);
  }
  if (!((node as ParamTree).weight instanceof tf.Tensor)) throw formatError(`LoRA merge: module ${module} has no weight`);
  return node as ParamTree;
}

/**
 * Merge a LoRA into the params trees in place, W += scale * (alpha/r) * up@down (kohya LoRAModule.merge_to, A1111
 * network_apply_weights, diffusers fuse_lora). Returns restore(), which puts the original tensors back and frees the
 * merged ones; with several LoRAs merged, restore in reverse order.
 */
export function mergeLora(model: LoraModel, lora: LoraFile, scale: LoraScale): () => void {
  const swaps: { node: ParamTree; merged: tf.Tensor; original: tf.Tensor }[] = [];
  const restore = () => {
    for (const s of swaps.reverse()) {
      if (s.node.weight !== s.merged) throw new Error('LoRA restore: the weight was replaced since merging (restore merged LoRAs in reverse order)');
      s.node.weight = s.original;
      s.merged.dispose();
    }
    swaps.length = 0;
  };
  try {
    for (const m of lora.modules) {
      const tree = treeOf(model, m.component);
      if (!tree) throw usageError(`${lora.path}: the LoRA adapts the ${m.component === 'unet' ? 'UNet' : 'text encoder'} but no such params tree was given`);
      const mult = typeof scale === 'number' ? scale : ((m.component === 'unet' ? scale.unet : scale.textEncoder) ?? 1);
      const node = moduleNode(tree, m.module);
      const w = node.weight as tf.Tensor;
      const merged = tf.tidy(() => {
        const d = deltaTf(m, w.shape);
        if (d.size !== w.size) throw formatError(`${lora.path}: ${m.module}: LoRA delta ${fmtShape(d.shape)} does not fit the weight ${fmtShape(w.shape)}`);
        return tf.add(w, tf.mul(d.reshape(w.shape), (mult * m.alpha) / rankOf(m)));
      });
      node.weight = merged;
      swaps.push({ node, merged, original: w });
    }
  } catch (e) {
    restore();
    throw e;
  }
  return restore;
}

// ---- writing ----------------------------------------------------------------------------------------------------

function checkUnique(file: string, names: string[]): void {
  const seen = new Set<string>();
  for (const n of names) {
    if (seen.has(n)) throw usageError(`${file}: two modules would both be written as "${n}"`);
    seen.add(n);
  }
}

/**
 * Write kohya/A1111 keys (sd-scripts LoRANetwork.save_weights): `lora_unet_*` / `lora_te_*` + `.lora_down.weight`,
 * `.lora_up.weight`, F32 scalar `.alpha`; the caller's ss_* metadata plus the `sshs_model_hash` / `sshs_legacy_hash`
 * that kohya precalculates (train_util.precalculate_safetensors_hashes, over a copy with only ss_* metadata).
 */
export async function writeLoraKohya(file: string, modules: LoraModule[], opts: { metadata?: Record<string, string>; half?: boolean } = {}): Promise<void> {
  const tensors = new Map<string, WritableTensor>();
  const names = modules.map((m) => KOHYA_PREFIX[m.component] + m.module.replace(/\./g, '_'));
  checkUnique(file, names);
  modules.forEach((m, i) => {
    tensors.set(`${names[i]}.lora_down.weight`, m.down);
    tensors.set(`${names[i]}.lora_up.weight`, m.up);
    if (m.mid) tensors.set(`${names[i]}.lora_mid.weight`, m.mid);
    tensors.set(`${names[i]}.alpha`, { shape: [], data: Float32Array.of(m.alpha), dtype: 'F32' });
  });
  const floatDtype = opts.half ? 'F16' : 'F32';
  const metadata = { ...opts.metadata };
  const ss = Object.fromEntries(Object.entries(metadata).filter(([k]) => k.startsWith('ss_')));
  const scratch = path.join(path.dirname(path.resolve(file)), `.${path.basename(file)}.${process.pid}.hash.tmp`);
  try {
    await writeSafetensors(scratch, tensors, { metadata: ss, floatDtype });
    metadata.sshs_model_hash = await addnetHash(scratch);
    metadata.sshs_legacy_hash = await legacyModelHash(scratch);
  } finally {
    await rm(scratch, { force: true });
  }
  await writeSafetensors(file, tensors, { metadata, floatDtype });
}

/**
 * Write diffusers/PEFT keys (`unet.<module>.lora_A.weight` / `lora_B.weight`, diffusers save_lora_weights) with
 * alpha/r folded into lora_B and no adapter metadata, so loaders use scale 1 (spec §3.1).
 */
export async function writeLoraPeft(file: string, modules: LoraModule[], opts: { half?: boolean } = {}): Promise<void> {
  const tensors = new Map<string, WritableTensor>();
  const names = modules.map((m) => PEFT_PREFIX[m.component] + m.module);
  checkUnique(file, names);
  modules.forEach((m, i) => {
    if (m.mid) throw new SdtuneError('unsupported', `${file}: ${m.module} has a CP (lora_mid) factor, which the PEFT format cannot hold; write it as kohya`);
    const s = m.alpha / rankOf(m);
    tensors.set(`${names[i]}.lora_A.weight`, m.down);
    tensors.set(`${names[i]}.lora_B.weight`, { shape: m.up.shape, data: s === 1 ? m.up.data : m.up.data.map((x) => x * s) });
  });
  await writeSafetensors(file, tensors, { metadata: { format: 'pt' }, floatDtype: opts.half ? 'F16' : 'F32' });
}
