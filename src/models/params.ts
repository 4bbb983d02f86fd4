/**
 * Params trees: nested objects whose flattened dotted keys are exactly the diffusers checkpoint keys
 * (`down_blocks.0.resnets.1.conv1.weight`). Leaves are tf tensors in tfjs layout (conv HWIO, linear [in,out]).
 */
import * as tf from '@tensorflow/tfjs';
import { formatError, fmtShape } from '../errors.js';

export interface ParamTree {
  [key: string]: ParamTree | tf.Tensor;
}

const isTensor = (v: unknown): v is tf.Tensor => v instanceof tf.Tensor;

/** Flatten a tree to dotted keys, in insertion order. */
export function flattenParams(tree: ParamTree, prefix = '', out = new Map<string, tf.Tensor>()): Map<string, tf.Tensor> {
  for (const [k, v] of Object.entries(tree)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (isTensor(v)) out.set(key, v);
    else flattenParams(v, key, out);
  }
  return out;
}

/** Build a tree from dotted keys. */
export function unflattenParams(flat: Iterable<[string, tf.Tensor]>): ParamTree {
  const root: ParamTree = {};
  for (const [key, t] of flat) {
    const parts = key.split('.');
    let node = root;
    for (const p of parts.slice(0, -1)) {
      const next = node[p];
      if (next === undefined) node = node[p] = {};
      else if (isTensor(next)) throw new Error(`params: key ${key} nests under a tensor`);
      else node = next;
    }
    node[parts[parts.length - 1]] = t;
  }
  return root;
}

/** Sub-tree at a path (`sub(p, 'down_blocks', 0)`); a missing node is a bug in the model code or loader. */
export function sub(tree: ParamTree, ...path: (string | number)[]): ParamTree {
  let node: ParamTree | tf.Tensor = tree;
  for (const p of path) {
    if (isTensor(node)) throw new Error(`params: ${path.join('.')} reaches a tensor early`);
    const next: ParamTree | tf.Tensor | undefined = node[String(p)];
    if (next === undefined) throw formatError(`missing parameter group ${path.join('.')}`);
    node = next;
  }
  if (isTensor(node)) throw new Error(`params: ${path.join('.')} is a tensor, expected a group`);
  return node;
}

/** Does the tree have a child group or tensor at `name`? */
export const has = (tree: ParamTree, name: string) => tree[name] !== undefined;

/** A tensor leaf. */
export function leaf(tree: ParamTree, name: string): tf.Tensor {
  const v = tree[name];
  if (!isTensor(v)) throw formatError(`missing parameter ${name}`);
  return v;
}

/** Optional tensor leaf. */
export function maybeLeaf(tree: ParamTree, name: string): tf.Tensor | undefined {
  const v = tree[name];
  return isTensor(v) ? v : undefined;
}

/** Dispose every tensor of a tree. */
export function disposeParams(tree: ParamTree): void {
  for (const t of flattenParams(tree).values()) t.dispose();
}

/** Number of scalar parameters. */
export function countParams(tree: ParamTree): number {
  let n = 0;
  for (const t of flattenParams(tree).values()) n += t.size;
  return n;
}

/**
 * Strict comparison of a loaded key->shape map against the key->shape spec a model expects (both torch layout).
 * Throws one error that lists missing keys, unexpected keys and shape mismatches (first few of each).
 */
export function checkAgainstSpec(what: string, spec: Map<string, number[]>, found: Map<string, number[]>): void {
  const missing = [...spec.keys()].filter((k) => !found.has(k));
  const unexpected = [...found.keys()].filter((k) => !spec.has(k));
  const mismatched = [...spec.entries()]
    .filter(([k, s]) => found.has(k) && fmtShape(s) !== fmtShape(found.get(k)!))
    .map(([k, s]) => `${k}: expected ${fmtShape(s)}, found ${fmtShape(found.get(k)!)}`);
  if (!missing.length && !unexpected.length && !mismatched.length) return;
  const list = (label: string, xs: string[]) =>
    xs.length ? `\n  ${label} (${xs.length}): ${xs.slice(0, 8).join(', ')}${xs.length > 8 ? ', ...' : ''}` : '';
  throw formatError(
    `${what}: weights do not match the config` +
      list('missing keys', missing) +
      list('unexpected keys', unexpected) +
      list('shape mismatches', mismatched),
  );
}

let trainableCounter = 0;

/**
 * Make the leaves of `tree` whose dotted key passes `filter` trainable, in place: each becomes a tf.Variable holding
 * the same data (the original tensor is released), so the networks' forward functions use it unchanged and
 * gradients reach it. Returns the variables by dotted key. `frozen(tree, vars)` turns them back into plain tensors.
 */
export function makeTrainable(tree: ParamTree, filter: (key: string) => boolean, tag = 'params'): Map<string, tf.Variable> {
  const vars = new Map<string, tf.Variable>();
  const walk = (node: ParamTree, prefix: string) => {
    for (const [k, v] of Object.entries(node)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (!isTensor(v)) walk(v, key);
      else if (!(v instanceof tf.Variable) && v.dtype === 'float32' && filter(key)) {
        const variable = tf.variable(v, true, `${tag}/${key}#${trainableCounter++}`);
        v.dispose(); // the variable keeps the data
        node[k] = variable;
        vars.set(key, variable);
      }
    }
  };
  walk(tree, '');
  return vars;
}

/** Undo makeTrainable: the variables' current values become plain tensors of the tree again. */
export function frozen(tree: ParamTree, vars: Map<string, tf.Variable>): void {
  for (const [key, variable] of vars) {
    const parts = key.split('.');
    const node = sub(tree, ...parts.slice(0, -1));
    node[parts[parts.length - 1]] = tf.clone(variable);
    variable.dispose();
  }
}
