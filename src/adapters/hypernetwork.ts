/**
 * A1111 hypernetworks (modules/hypernetworks/hypernetwork.py; spec embeddings-and-hypernetworks.md §3): for each
 * context width d a pair of residual MLPs H_k, H_v; every attention whose context has width d reads
 * k = to_k(H_k(context)), v = to_v(H_v(context)) (self-attention included), with H(x) = x + MLP(x) * strength.
 *
 * Layers: the file-format front ends (our safetensors form here; A1111's .pt through the pickle reader) produce a
 * plain HypernetworkData { meta, layers: width -> [k state dict, v state dict] } in torch layout; loadHypernetwork
 * validates it against the structure its meta describes and puts it on the backend; hypernetworkAdapter turns
 * loaded networks into the UNet's context adapter (models/layers.ts ContextAdapter).
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { SdtuneError, fmtShape, formatError, usageError } from '../errors.js';
import { type HostTensor, tfToTorchLayout, torchToTfLayout } from '../io/layout.js';
import { type PyValue, PyOrderedDict, pyFloat, pyTuple, torchSaveBytes } from '../io/pickle-write.js';
import { type LazyTensor, SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { type ContextAdapter, type Forward, dropout, gelu, layerNorm, linear, silu } from '../models/layers.js';
import { type ParamTree, flattenParams, sub } from '../models/params.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import type { TorchGenerator } from '../runtime/rng.js';
import { HYPERNETWORK_ACTIVATION_NAMES, HYPERNETWORK_INITS, type HypernetworkActivation } from './hypernetwork-names.js';
import { ownedVariable } from './lora-inject.js';

/** The non-tensor keys of an A1111 hypernetwork file, under A1111's names. */
export interface HypernetworkMeta {
  /** width multipliers, first and last 1 (A1111 default [1, 2, 1]) */
  layer_structure: number[];
  /** A1111 name ('relu', 'swish' = Hardswish, ...); null or 'linear' = no activation */
  activation_func: string | null;
  is_layer_norm: boolean;
  /** 'Normal' | 'XavierUniform' | 'XavierNormal' | 'KaimingUniform' | 'KaimingNormal' (only used to create networks) */
  weight_initialization: string;
  use_dropout: boolean;
  /** dropout probability after each layer (same length as layer_structure; derived when a file lacks it) */
  dropout_structure: number[];
  last_layer_dropout: boolean;
  /** activation after the last Linear too (default true when a file lacks the key, as A1111 loads it) */
  activate_output: boolean;
  name: string | null;
  step: number | null;
  sd_checkpoint: string | null;
  sd_checkpoint_name: string | null;
  optional_info: string | null;
}

/** A file's content, format-free: the meta (missing keys take A1111's load defaults) and each width's two state dicts. */
export interface HypernetworkData {
  meta: Partial<HypernetworkMeta>;
  /** width -> [H_k state dict, H_v state dict], keys `linear.<i>.weight` / `.bias` as A1111 saves them, torch layout */
  layers: Map<number, [Map<string, HostTensor>, Map<string, HostTensor>]>;
}

/** A hypernetwork on the backend: full meta, and per width the k and v modules as params trees (tfjs layout). */
export interface Hypernetwork {
  meta: HypernetworkMeta;
  /** width -> [H_k, H_v]; each tree flattens to the A1111 state-dict keys (`linear.0.weight`, ...) */
  layers: Map<number, [ParamTree, ParamTree]>;
}

/** One entry of a module's torch.nn.Sequential `linear` (the index counts parameter-less entries too). */
export type HypernetworkEntry =
  | { kind: 'linear'; index: number; inDim: number; outDim: number }
  | { kind: 'activation'; index: number; name: string }
  | { kind: 'norm'; index: number; dim: number }
  | { kind: 'dropout'; index: number; p: number };

const INITS: readonly string[] = HYPERNETWORK_INITS;

/** softplus with torch's threshold 20 (beyond it, x) */
const softplus = (x: tf.Tensor) => tf.where(tf.greater(x, 20), x, tf.softplus(x));
const hardswish = (x: tf.Tensor) => tf.div(tf.mul(x, tf.relu6(tf.add(x, 3))), 6);
/** torch.nn.RReLU defaults: slope U(1/8, 1/3) per element while training, their mean otherwise */
const RRELU = [1 / 8, 1 / 3] as const;

/**
 * Activations by A1111's names: its own table (linear, relu, leakyrelu, elu, swish = torch Hardswish, tanh, sigmoid)
 * plus the lower-cased torch.nn activation classes it adds, with torch's default arguments. The classes that change
 * the width or need arguments (GLU, Softmax and kin, Threshold, MultiheadAttention) cannot sit in the MLP.
 */
const ACTIVATIONS: Record<Exclude<HypernetworkActivation, 'linear'>, (x: tf.Tensor, node: ParamTree, f: Forward) => tf.Tensor> = {
  relu: (x) => tf.relu(x),
  leakyrelu: (x) => tf.leakyRelu(x, 0.01),
  elu: (x) => tf.elu(x),
  celu: (x) => tf.elu(x), // alpha 1: the same function
  selu: (x) => tf.selu(x),
  swish: hardswish,
  hardswish,
  tanh: (x) => tf.tanh(x),
  sigmoid: (x) => tf.sigmoid(x),
  gelu: (x) => gelu(x),
  silu: (x) => silu(x),
  mish: (x) => tf.mul(x, tf.tanh(softplus(x))),
  softplus,
  softsign: (x) => tf.div(x, tf.add(1, tf.abs(x))),
  hardtanh: (x) => tf.clipByValue(x, -1, 1),
  relu6: (x) => tf.relu6(x),
  hardsigmoid: (x) => tf.div(tf.relu6(tf.add(x, 3)), 6),
  logsigmoid: (x) => tf.logSigmoid(x),
  tanhshrink: (x) => tf.sub(x, tf.tanh(x)),
  hardshrink: (x) => tf.where(tf.greater(tf.abs(x), 0.5), x, tf.zerosLike(x)),
  softshrink: (x) => tf.sub(x, tf.clipByValue(x, -0.5, 0.5)),
  prelu: (x, node) => tf.prelu(x, node.weight as tf.Tensor),
  rrelu: (x, _n, f) => {
    if (!f.training) return tf.leakyRelu(x, (RRELU[0] + RRELU[1]) / 2);
    if (!f.rng) throw usageError('rrelu while training needs a random generator (Forward.rng)');
    const slope = Float32Array.from(f.rng.rand(x.shape), (u) => RRELU[0] + (RRELU[1] - RRELU[0]) * u);
    return tf.where(tf.greaterEqual(x, 0), x, tf.mul(x, tf.tensor(slope, x.shape)));
  },
};

/** Activation names this module runs (A1111's table + the usable torch.nn classes). */
export const HYPERNETWORK_ACTIVATIONS: readonly string[] = HYPERNETWORK_ACTIVATION_NAMES;

/** A1111 parse_dropout_structure: zeros without dropout, else [0, 0.3 x (L-3), 0.3 if last_layer_dropout else 0, 0]. */
export function defaultDropoutStructure(layers: number[], useDropout: boolean, lastLayerDropout: boolean): number[] {
  if (!useDropout) return layers.map(() => 0);
  return [0, ...Array<number>(Math.max(0, layers.length - 3)).fill(0.3), lastLayerDropout ? 0.3 : 0, 0];
}

/** Full meta from a file's keys: A1111's load defaults for missing ones, validated (a clear error naming the key). */
export function resolveHypernetworkMeta(m: Partial<HypernetworkMeta>, source = 'hypernetwork'): HypernetworkMeta {
  const bad = (key: string, want: string, v: unknown) => formatError(`${source}: ${key} must be ${want}, found ${String(JSON.stringify(v)).slice(0, 120)}`);
  const bool = (key: keyof HypernetworkMeta, dflt: boolean) => {
    const v = m[key] ?? dflt;
    if (typeof v !== 'boolean') throw bad(key, 'true or false', v);
    return v;
  };
  const str = (key: keyof HypernetworkMeta) => {
    const v = m[key] ?? null;
    if (v !== null && typeof v !== 'string') throw bad(key, 'a string or null', v);
    return v;
  };
  const ls = m.layer_structure ?? [1, 2, 1];
  if (!Array.isArray(ls) || ls.length < 2 || !ls.every((x) => typeof x === 'number' && x > 0 && Number.isFinite(x)) || ls[0] !== 1 || ls[ls.length - 1] !== 1) {
    throw bad('layer_structure', 'a list of positive numbers starting and ending with 1', ls);
  }
  if (ls.length > 64) throw bad('layer_structure', 'at most 64 entries', ls.length);
  const act = str('activation_func');
  if (act !== null && !HYPERNETWORK_ACTIVATIONS.includes(act)) {
    throw new SdtuneError('unsupported', `${source}: activation_func ${JSON.stringify(act)} is not supported (supported: ${HYPERNETWORK_ACTIVATIONS.join(', ')})`);
  }
  const wi = m.weight_initialization ?? 'Normal';
  if (typeof wi !== 'string' || !INITS.includes(wi)) throw bad('weight_initialization', `one of ${INITS.join(', ')}`, wi);
  const lastLayerDropout = bool('last_layer_dropout', false);
  const ds0 = m.dropout_structure ?? null;
  // A1111: use_dropout is forced on when a dropout structure has a non-zero entry
  const useDropout = ds0 !== null && Array.isArray(ds0) && ds0.some((p) => p !== 0) ? true : bool('use_dropout', false);
  const ds = ds0 ?? defaultDropoutStructure(ls, useDropout, lastLayerDropout);
  if (!Array.isArray(ds) || ds.length !== ls.length || !ds.every((p) => typeof p === 'number' && p >= 0 && p < 1)) {
    throw bad('dropout_structure', `${ls.length} probabilities in [0, 1) (one per layer_structure entry)`, ds);
  }
  const step = m.step ?? null;
  if (step !== null && !Number.isInteger(step)) throw bad('step', 'an integer or null', step);
  return {
    layer_structure: [...ls],
    activation_func: act,
    is_layer_norm: bool('is_layer_norm', false),
    weight_initialization: wi,
    use_dropout: useDropout,
    dropout_structure: [...ds],
    last_layer_dropout: lastLayerDropout,
    activate_output: bool('activate_output', true),
    name: str('name'),
    step,
    sd_checkpoint: str('sd_checkpoint'),
    sd_checkpoint_name: str('sd_checkpoint_name'),
    optional_info: str('optional_info'),
  };
}

/** The Sequential of one module of width d (A1111 HypernetworkModule.__init__, spec §3.2). */
export function hypernetworkEntries(meta: HypernetworkMeta, d: number): HypernetworkEntry[] {
  const s = meta.layer_structure;
  const L = s.length - 1;
  const out: HypernetworkEntry[] = [];
  for (let i = 0; i < L; i++) {
    const inDim = Math.trunc(d * s[i]); // Python int(): toward zero
    const outDim = Math.trunc(d * s[i + 1]);
    if (inDim < 1 || outDim < 1) throw formatError(`hypernetwork: layer_structure ${JSON.stringify(s)} gives an empty layer at width ${d}`);
    out.push({ kind: 'linear', index: out.length, inDim, outDim });
    const act = meta.activation_func;
    if (act !== null && act !== 'linear' && (i < L - 1 || meta.activate_output)) out.push({ kind: 'activation', index: out.length, name: act });
    if (meta.is_layer_norm) out.push({ kind: 'norm', index: out.length, dim: outDim });
    if (meta.dropout_structure[i + 1] > 0) out.push({ kind: 'dropout', index: out.length, p: meta.dropout_structure[i + 1] });
  }
  return out;
}

/** The state-dict keys and torch shapes a module of width d has. */
export function hypernetworkModuleShapes(meta: HypernetworkMeta, d: number): Map<string, number[]> {
  const m = new Map<string, number[]>();
  for (const e of hypernetworkEntries(meta, d)) {
    if (e.kind === 'linear') {
      m.set(`linear.${e.index}.weight`, [e.outDim, e.inDim]);
      m.set(`linear.${e.index}.bias`, [e.outDim]);
    } else if (e.kind === 'norm') {
      m.set(`linear.${e.index}.weight`, [e.dim]);
      m.set(`linear.${e.index}.bias`, [e.dim]);
    } else if (e.kind === 'activation' && e.name === 'prelu') m.set(`linear.${e.index}.weight`, [1]);
  }
  return m;
}

/** Very old files name the two Linear layers linear1 / linear2 (A1111 fix_old_state_dict). */
const OLD_KEYS: Record<string, string> = {
  'linear1.weight': 'linear.0.weight',
  'linear1.bias': 'linear.0.bias',
  'linear2.weight': 'linear.1.weight',
  'linear2.bias': 'linear.1.bias',
};

/**
 * Check a file's content against the structure its meta describes (every key, every shape; loud on any mismatch)
 * and put the weights on the backend. The result's tensors belong to the caller (disposeHypernetwork).
 */
export function loadHypernetwork(data: HypernetworkData, source = 'hypernetwork'): Hypernetwork {
  const meta = resolveHypernetworkMeta(data.meta, source);
  if (data.layers.size === 0) throw formatError(`${source}: no layers (no integer context-width keys)`);
  const host: [number, [Map<string, HostTensor>, Map<string, HostTensor>]][] = [];
  for (const [d, pair] of data.layers) {
    if (!Number.isInteger(d) || d < 1 || d > 65536) throw formatError(`${source}: context width ${d} is not a positive integer`);
    if (!Array.isArray(pair) || pair.length !== 2) throw formatError(`${source}: width ${d} must hold 2 state dicts (k, v), found ${Array.isArray(pair) ? pair.length : typeof pair}`);
    const want = hypernetworkModuleShapes(meta, d);
    const fixed = pair.map((sd, j) => {
      const which = `${source}: width ${d} ${j === 0 ? 'k' : 'v'} module`;
      const m = new Map<string, HostTensor>();
      for (const [k0, t] of sd) m.set(OLD_KEYS[k0] ?? k0, t);
      for (const k of m.keys()) {
        if (!want.has(k)) throw formatError(`${which}: unexpected key ${k} (the structure ${JSON.stringify(meta.layer_structure)}, ${meta.activation_func ?? 'no activation'}${meta.is_layer_norm ? ', layer norm' : ''} has ${[...want.keys()].join(', ')})`);
      }
      for (const [k, shape] of want) {
        const t = m.get(k);
        if (!t) throw formatError(`${which}: missing key ${k} ${fmtShape(shape)}`);
        if (t.shape.length !== shape.length || t.shape.some((n, i) => n !== shape[i])) throw formatError(`${which}: ${k} has shape ${fmtShape(t.shape)}, expected ${fmtShape(shape)}`);
        if (!(t.data instanceof Float32Array)) throw formatError(`${which}: ${k} must be float32 data`);
        if (t.data.length !== shape.reduce((a, b) => a * b, 1)) throw formatError(`${which}: ${k} holds ${t.data.length} values, its shape needs ${shape.reduce((a, b) => a * b, 1)}`);
      }
      return m;
    }) as [Map<string, HostTensor>, Map<string, HostTensor>];
    host.push([d, fixed]);
  }
  const layers = new Map<number, [ParamTree, ParamTree]>();
  for (const [d, pair] of host) {
    layers.set(d, pair.map((sd) => moduleTree([...sd].map(([k, t]) => {
      const c = torchToTfLayout(k, t);
      return [k, tf.tensor(c.data as Float32Array, c.shape)];
    }))) as [ParamTree, ParamTree]);
  }
  return { meta, layers };
}

/** Params tree { linear: { <i>: { weight, bias } } } from state-dict keys. */
function moduleTree(entries: [string, tf.Tensor][]): ParamTree {
  const root: ParamTree = { linear: {} };
  for (const [k, t] of entries) {
    const [, idx, name] = /^linear\.(\d+)\.(weight|bias)$/.exec(k)!;
    const lin = root.linear as ParamTree;
    lin[idx] ??= {};
    (lin[idx] as ParamTree)[name] = t;
  }
  return root;
}

/** Dispose a hypernetwork's tensors. */
export function disposeHypernetwork(net: Hypernetwork): void {
  for (const [k, v] of net.layers.values()) tf.dispose([...flattenParams(k).values(), ...flattenParams(v).values()]);
}

/** Every tensor of a hypernetwork (the trainables of one it created: createHypernetwork), in A1111's weights() order. */
export function hypernetworkTensors(net: Hypernetwork): tf.Tensor[] {
  return [...net.layers.values()].flatMap(([k, v]) => [...flattenParams(k).values(), ...flattenParams(v).values()]);
}

/**
 * One module: H(x) = x + MLP(x) * strength (A1111 HypernetworkModule.forward; the multiplier is 1 while training).
 * Dropout and RReLU draw from `f.rng` only when `f.training`.
 */
export function hypernetworkModule(tree: ParamTree, entries: HypernetworkEntry[], x: tf.Tensor3D, strength: number, f: Forward = {}): tf.Tensor3D {
  return tf.tidy(() => {
    let h: tf.Tensor = x;
    for (const e of entries) {
      if (e.kind === 'linear') h = linear(sub(tree, 'linear', e.index), h);
      else if (e.kind === 'norm') h = layerNorm(sub(tree, 'linear', e.index), h, 1e-5);
      else if (e.kind === 'dropout') h = dropout(h, e.p, f);
      else h = ACTIVATIONS[e.name as keyof typeof ACTIVATIONS](h, e.name === 'prelu' ? sub(tree, 'linear', e.index) : {}, f);
    }
    return tf.add(x, tf.mul(h, f.training ? 1 : strength)) as tf.Tensor3D;
  });
}

/** A loaded hypernetwork at a strength (A1111's multiplier). */
export interface HypernetworkUse {
  net: Hypernetwork;
  /** default 1 */
  strength?: number;
}

/**
 * The UNet context adapter of one or more hypernetworks (A1111 apply_single_hypernetwork, chained in order as
 * apply_hypernetworks does): for an attention whose context width has modules, [H_k(c), H_v(c)]; else unchanged.
 */
export function hypernetworkAdapter(uses: HypernetworkUse[]): ContextAdapter {
  const entries = new Map<string, HypernetworkEntry[]>();
  const entriesOf = (i: number, d: number) => {
    const key = `${i}:${d}`;
    let e = entries.get(key);
    if (!e) entries.set(key, (e = hypernetworkEntries(uses[i].net.meta, d)));
    return e;
  };
  return {
    params: uses.flatMap((u) => [...u.net.layers.values()].flat()),
    kv(c, site, f) {
      let ck = c;
      let cv = c;
      let hit = false;
      uses.forEach((u, i) => {
        const pair = u.net.layers.get(site.width);
        if (!pair) return;
        hit = true;
        const e = entriesOf(i, site.width);
        ck = hypernetworkModule(pair[0], e, ck, u.strength ?? 1, f);
        cv = hypernetworkModule(pair[1], e, cv, u.strength ?? 1, f);
      });
      return hit ? [ck, cv] : undefined;
    },
  };
}

export interface CreateHypernetworkOptions extends Partial<Pick<HypernetworkMeta, 'layer_structure' | 'activation_func' | 'is_layer_norm' | 'weight_initialization' | 'use_dropout' | 'last_layer_dropout' | 'activate_output' | 'dropout_structure' | 'name'>> {
  /** the context widths to adapt (SD v1: [768]; the NovelAI set 768, 320, 640, 1280) */
  widths: number[];
  /** torch-compatible generator for the initial weights (A1111 draws them with the global torch generator) */
  gen: TorchGenerator;
}

/**
 * A new trainable hypernetwork (A1111 create_hypernetwork + HypernetworkModule init): for each width, H_k then H_v,
 * each layer in order: Normal -> weight N(0, 0.01), bias 0 (its N(0, 0) draw is still made, as torch's normal_ does);
 * LayerNorm weights always Normal (A1111's quirk); Xavier / Kaiming (gain of relu, or of leaky_relu for leakyrelu)
 * for Linear weights with zero biases. Creation defaults are A1111's UI ones: no activation unless given,
 * activate_output false, last_layer_dropout true only with use_dropout. Leaves are trainable tf.Variables.
 */
export function createHypernetwork(o: CreateHypernetworkOptions): Hypernetwork {
  const useDropout = o.use_dropout ?? false;
  const meta = resolveHypernetworkMeta(
    {
      layer_structure: o.layer_structure,
      activation_func: o.activation_func ?? null,
      is_layer_norm: o.is_layer_norm ?? false,
      weight_initialization: o.weight_initialization ?? 'Normal',
      use_dropout: useDropout,
      last_layer_dropout: o.last_layer_dropout ?? useDropout,
      activate_output: o.activate_output ?? false,
      dropout_structure: o.dropout_structure,
      name: o.name ?? null,
      step: 0,
    },
    'createHypernetwork',
  );
  if (!o.widths.length || new Set(o.widths).size !== o.widths.length) throw usageError(`hypernetwork widths must be distinct and at least one, got ${JSON.stringify(o.widths)}`);
  const { gen } = o;
  const f32 = Math.fround;
  const normal = (n: number, std: number) => Float32Array.from(gen.randn([n]), (v) => f32(v * f32(std)));
  const uniform = (n: number, bound: number) => Float32Array.from(gen.rand([n]), (u) => f32(f32(u * f32(2 * bound)) - f32(bound)));
  const gain = Math.SQRT2; // calculate_gain('relu') = calculate_gain('leaky_relu', 0) = sqrt(2)
  const layers = new Map<number, [ParamTree, ParamTree]>();
  for (const d of o.widths) {
    if (!Number.isInteger(d) || d < 1) throw usageError(`hypernetwork width must be a positive integer, got ${d}`);
    const pair = [0, 1].map(() => {
      const vars: [string, tf.Tensor][] = [];
      const put = (key: string, shape: number[], data: Float32Array) => {
        const c = torchToTfLayout(key, { shape, data });
        vars.push([key, ownedVariable(tf.tensor(c.data as Float32Array, c.shape), `hypernetwork/${d}/${key}#${varId++}`)]);
      };
      for (const e of hypernetworkEntries(meta, d)) {
        if (e.kind === 'linear') {
          const [fo, fi] = [e.outDim, e.inDim];
          const n = fo * fi;
          const w =
            meta.weight_initialization === 'Normal' ? normal(n, 0.01)
            : meta.weight_initialization === 'XavierUniform' ? uniform(n, Math.sqrt(6 / (fi + fo)))
            : meta.weight_initialization === 'XavierNormal' ? normal(n, Math.sqrt(2 / (fi + fo)))
            : meta.weight_initialization === 'KaimingUniform' ? uniform(n, gain * Math.sqrt(3 / fi))
            : normal(n, gain / Math.sqrt(fi));
          put(`linear.${e.index}.weight`, [fo, fi], w);
          if (meta.weight_initialization === 'Normal') gen.randn([fo]); // normal_(b, 0, 0): drawn, all zeros
          put(`linear.${e.index}.bias`, [fo], new Float32Array(fo));
        } else if (e.kind === 'norm') {
          put(`linear.${e.index}.weight`, [e.dim], normal(e.dim, 0.01));
          gen.randn([e.dim]);
          put(`linear.${e.index}.bias`, [e.dim], new Float32Array(e.dim));
        } else if (e.kind === 'activation' && e.name === 'prelu') {
          put(`linear.${e.index}.weight`, [1], Float32Array.of(0.25)); // torch PReLU init
        }
      }
      return moduleTree(vars);
    }) as [ParamTree, ParamTree];
    layers.set(d, pair);
  }
  return { meta, layers };
}
let varId = 0;

/** The network back on the host in torch layout, as a file front end writes it. */
export async function hypernetworkData(net: Hypernetwork): Promise<HypernetworkData> {
  const layers: HypernetworkData['layers'] = new Map();
  for (const [d, pair] of net.layers) {
    const out: Map<string, HostTensor>[] = [];
    for (const tree of pair) {
      const m = new Map<string, HostTensor>();
      for (const [k, t] of flattenParams(tree)) m.set(k, tfToTorchLayout(k, { shape: [...t.shape], data: (await t.data()) as Float32Array }));
      out.push(m);
    }
    layers.set(d, out as [Map<string, HostTensor>, Map<string, HostTensor>]);
  }
  return { meta: { ...net.meta }, layers };
}

// ---- our safetensors form -----------------------------------------------------------------------------------------
// Tensors `<width>.<j>.<state-dict key>` (j = 0 for H_k, 1 for H_v); the meta in __metadata__, each value as text:
// JSON for lists, booleans, numbers and null, the bare string for string values ('relu', 'Normal', the name), as
// the golden tiny_hypernet.safetensors is written.

const META_KEYS: (keyof HypernetworkMeta)[] = ['layer_structure', 'activation_func', 'is_layer_norm', 'weight_initialization', 'use_dropout',
  'dropout_structure', 'last_layer_dropout', 'activate_output', 'name', 'step', 'sd_checkpoint', 'sd_checkpoint_name', 'optional_info'];
const STRING_KEYS = new Set<string>(['activation_func', 'weight_initialization', 'name', 'sd_checkpoint', 'sd_checkpoint_name', 'optional_info']);

/** Python repr-like JSON ("[1, 2, 1]", "false") for the metadata text. */
const metaText = (v: unknown) => (typeof v === 'string' ? v : JSON.stringify(v).replace(/,/g, ', '));

/** Parse the metadata of our safetensors form (values as metaText writes them). */
export function parseHypernetworkMetadata(md: Record<string, string>, source: string): Partial<HypernetworkMeta> {
  const out: Record<string, unknown> = {};
  for (const k of META_KEYS) {
    const v = md[k];
    if (v === undefined) continue;
    if (STRING_KEYS.has(k)) out[k] = v === 'null' ? null : v;
    else {
      try {
        out[k] = JSON.parse(v);
      } catch {
        throw formatError(`${source}: metadata ${k} = ${JSON.stringify(v.slice(0, 80))} is not JSON`);
      }
    }
  }
  return out as Partial<HypernetworkMeta>;
}

/** Read our safetensors form (front end of loadHypernetwork). */
export async function readHypernetworkSafetensors(file: string): Promise<HypernetworkData> {
  const f = await SafetensorsFile.open(file);
  try {
    const layers: HypernetworkData['layers'] = new Map();
    for (const key of f.keys()) {
      const m = /^(\d+)\.([01])\.(.+)$/.exec(key);
      if (!m) throw formatError(`${file}: tensor ${key} is not a hypernetwork key (<width>.<0 = k | 1 = v>.linear.<i>.weight|bias)`);
      const d = Number(m[1]);
      if (!layers.has(d)) layers.set(d, [new Map(), new Map()]);
      const t = await f.readFloat(key);
      layers.get(d)![Number(m[2])].set(m[3], { shape: t.shape, data: t.data });
    }
    return { meta: parseHypernetworkMetadata(f.metadata, file), layers };
  } finally {
    await f.close();
  }
}

/** Write our safetensors form (atomically). */
export async function writeHypernetworkSafetensors(file: string, data: HypernetworkData): Promise<void> {
  const meta = resolveHypernetworkMeta(data.meta, file);
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [d, pair] of data.layers) pair.forEach((sd, j) => { for (const [k, t] of sd) tensors.set(`${d}.${j}.${k}`, { shape: t.shape, data: t.data as Float32Array }); });
  const metadata = Object.fromEntries(META_KEYS.map((k) => [k, metaText(meta[k])]));
  await writeSafetensors(file, tensors, { metadata });
}

// ---- A1111 .pt ----------------------------------------------------------------------------------------------------

/**
 * The object A1111's Hypernetwork.save pickles, as plain data: { <width>: (k_state_dict, v_state_dict), step, name,
 * layer_structure (floats, as create_hypernetwork makes them), activation_func, is_layer_norm, weight_initialization,
 * sd_checkpoint, sd_checkpoint_name, activate_output, use_dropout, dropout_structure, last_layer_dropout,
 * optional_info } in A1111's key order; each state dict an OrderedDict with nn.Module's `_metadata`.
 */
export function hypernetworkPickleObject(data: HypernetworkData): Map<PyValue, PyValue> {
  const meta = resolveHypernetworkMeta(data.meta);
  const obj = new Map<PyValue, PyValue>();
  for (const [d, pair] of data.layers) {
    const entries = hypernetworkEntries(meta, d);
    const modules = ['', 'linear', ...entries.map((e) => `linear.${e.index}`)];
    const keys = [...hypernetworkModuleShapes(meta, d).keys()]; // nn.Module.state_dict() order, whatever the source's
    obj.set(d, pyTuple(pair.map((sd) => new PyOrderedDict(
      keys.map((k): [PyValue, PyValue] => {
        const t = sd.get(k);
        if (!t) throw formatError(`hypernetwork width ${d}: missing ${k}`);
        return [k, { dtype: 'float32', shape: t.shape, data: t.data as Float32Array }];
      }),
      new PyOrderedDict(modules.map((m) => [m, new Map<PyValue, PyValue>([['version', 1]])])),
    ))));
  }
  obj.set('step', meta.step ?? 0);
  obj.set('name', meta.name);
  obj.set('layer_structure', meta.layer_structure.map((x) => pyFloat(x)));
  obj.set('activation_func', meta.activation_func);
  obj.set('is_layer_norm', meta.is_layer_norm);
  obj.set('weight_initialization', meta.weight_initialization);
  obj.set('sd_checkpoint', meta.sd_checkpoint);
  obj.set('sd_checkpoint_name', meta.sd_checkpoint_name);
  obj.set('activate_output', meta.activate_output);
  obj.set('use_dropout', meta.use_dropout);
  obj.set('dropout_structure', meta.dropout_structure.map((p) => (Number.isInteger(p) ? p : pyFloat(p))));
  obj.set('last_layer_dropout', meta.last_layer_dropout);
  obj.set('optional_info', meta.optional_info);
  return obj;
}

/** Write an A1111 .pt (torch.save zip, protocol 2; loads with torch.load(weights_only=True)), atomically. */
export async function writeHypernetworkPt(file: string, data: HypernetworkData): Promise<void> {
  await writeFileAtomic(file, torchSaveBytes(hypernetworkPickleObject(data)));
}

/** A tensor as a data-only unpickler hands it over: torch-layout shape and float32 values. */
export interface UnpickledTensor {
  shape: number[];
  data: Float32Array;
}

/**
 * The front end for an A1111 .pt once it is unpickled AS DATA (never executed): the top-level dict as a Map (or
 * its entries) whose integer keys hold a 2-element list/tuple (an array) of state dicts (Map or plain object of
 * key -> tensor), and whose other keys hold plain values (numbers, strings, booleans, null, arrays of numbers).
 * Every value is type-checked (files are hostile); unknown keys are ignored, as A1111 does.
 */
export function hypernetworkDataFromObject(top: Map<unknown, unknown> | Iterable<[unknown, unknown]>, source: string): HypernetworkData {
  const entries = top instanceof Map ? [...top] : [...top];
  const layers: HypernetworkData['layers'] = new Map();
  const meta: Record<string, unknown> = {};
  const isTensor = (v: unknown): v is UnpickledTensor =>
    typeof v === 'object' && v !== null && Array.isArray((v as UnpickledTensor).shape) && (v as UnpickledTensor).data instanceof Float32Array;
  const stateDict = (v: unknown, what: string): Map<string, HostTensor> => {
    const kv = v instanceof Map ? [...v] : typeof v === 'object' && v !== null && !Array.isArray(v) ? Object.entries(v) : undefined;
    if (!kv) throw formatError(`${source}: ${what} is not a state dict`);
    const out = new Map<string, HostTensor>();
    for (const [k, t] of kv) {
      if (typeof k !== 'string') throw formatError(`${source}: ${what} has a non-string key ${String(k)}`);
      if (!isTensor(t)) throw formatError(`${source}: ${what} ${k} is not a float tensor`);
      out.set(k, { shape: [...t.shape], data: t.data });
    }
    return out;
  };
  for (const [k, v] of entries) {
    const width = typeof k === 'bigint' ? Number(k) : k;
    if (typeof width === 'number') {
      if (!Array.isArray(v) || v.length !== 2) throw formatError(`${source}: width ${width} must hold (k_state_dict, v_state_dict)`);
      layers.set(width, [stateDict(v[0], `width ${width} k module`), stateDict(v[1], `width ${width} v module`)]);
    } else if (typeof k === 'string' && (META_KEYS as string[]).includes(k)) {
      const num = (x: unknown) => (typeof x === 'bigint' ? Number(x) : x);
      meta[k] = Array.isArray(v) ? v.map(num) : num(v);
    }
  }
  return { meta: meta as Partial<HypernetworkMeta>, layers };
}

const PICKLE_EXT = /\.(pt|pth|ckpt|bin)$/i;

/** An A1111 `.pt` read as data by the pickle reader (never executed; io/pickle.ts), through hypernetworkDataFromObject. */
export async function readHypernetworkPickle(file: string): Promise<HypernetworkData> {
  const { readHypernetworkPt } = await import('../io/pickle.js');
  const pt = await readHypernetworkPt(file);
  try {
    const host = async (m: Map<string, LazyTensor>) => {
      const out = new Map<string, UnpickledTensor>();
      for (const [k, t] of m) {
        const data = await t.load();
        if (!(data instanceof Float32Array)) throw formatError(`${file}: hypernetwork tensor ${k} has dtype ${t.dtype}, expected a floating-point dtype`);
        out.set(k, { shape: [...t.shape], data });
      }
      return out;
    };
    const top = new Map<unknown, unknown>(Object.entries(pt.fields));
    for (const [w, [k, v]] of pt.layers) top.set(w, [await host(k), await host(v)]);
    return hypernetworkDataFromObject(top, file);
  } finally {
    await pt.close();
  }
}

/** Read a hypernetwork file by its extension (front ends above), validated and on the backend. */
export async function readHypernetwork(file: string): Promise<Hypernetwork> {
  if (/\.safetensors$/i.test(file)) return loadHypernetwork(await readHypernetworkSafetensors(file), file);
  if (PICKLE_EXT.test(file)) return loadHypernetwork(await readHypernetworkPickle(file), file);
  throw usageError(`${file}: a hypernetwork is a .safetensors (our form) or an A1111 .pt file`);
}

/** A1111's name for a hypernetwork file (what `<hypernet:NAME>` and the PNG text use): the file name's stem. */
export const hypernetworkName = (file: string) => path.basename(file).replace(/\.(safetensors|pt|pth|ckpt|bin)$/i, '');
