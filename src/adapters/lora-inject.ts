/**
 * LoRA for training: inject trainable low-rank factors into a params tree (design principle 9), read them back as
 * LoraModules for export, and remove them. `linear()` / `conv2d()` in models/layers.ts apply any module that has
 * `lora_down`, `lora_up` and `lora_scale` leaves.
 */
import * as tf from '@tensorflow/tfjs';
import { usageError } from '../errors.js';
import { tfToTorchLayout, torchToTfLayout } from '../io/layout.js';
import { type ParamTree, flattenParams, has, leaf, sub } from '../models/params.js';
import type { TorchGenerator } from '../runtime/rng.js';
import type { LoraComponent, LoraModule } from './lora.js';

/** Which modules a LoRA adapts (kohya networks.lora / LoCon conventions). */
export type LoraTargets = 'attn' | 'attn+ff' | 'attn+ff+conv';

const UNET_ATTN = /\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$/;
const UNET_FF = /(\.ff\.net\.0\.proj|\.ff\.net\.2|attentions\.\d+\.proj_in|attentions\.\d+\.proj_out)$/;
const UNET_CONV = /(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(down|up)samplers\.0\.conv)$/;
const TE_ATTN = /\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$/;
const TE_FF = /\.mlp\.(fc1|fc2)$/;

/** Module paths (diffusers names) of a tree that the target set adapts. */
export function loraTargetModules(tree: ParamTree, component: LoraComponent, targets: LoraTargets): string[] {
  const out: string[] = [];
  for (const [key, t] of flattenParams(tree)) {
    if (!key.endsWith('.weight') || key.includes('.lora_') || (t.rank !== 2 && t.rank !== 4)) continue;
    const m = key.slice(0, -'.weight'.length);
    const hit =
      component === 'unet'
        ? UNET_ATTN.test(m) || (targets !== 'attn' && UNET_FF.test(m)) || (targets === 'attn+ff+conv' && UNET_CONV.test(m))
        : TE_ATTN.test(m) || (targets !== 'attn' && TE_FF.test(m));
    if (hit) out.push(m);
  }
  return out;
}

function nodeAt(tree: ParamTree, module: string): ParamTree {
  return sub(tree, ...module.split('.'));
}

let varCounter = 0;

/** A trainable variable that takes over `init` (tf.variable keeps the initial tensor object alive otherwise). */
export function ownedVariable(init: tf.Tensor, name: string): tf.Variable {
  const v = tf.variable(init, true, name);
  init.dispose();
  return v;
}

/**
 * Add trainable factors to every target module: down initialised as torch's kaiming_uniform(a=sqrt(5)) of a
 * Linear/Conv (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) from the torch-compatible generator, up = 0 (so training starts
 * at the base model, as kohya and PEFT do). Returns the variables keyed `<module>.lora_down.weight` / `.lora_up.weight`.
 */
export function injectLora(
  tree: ParamTree,
  modules: string[],
  opts: { rank: number; alpha: number; gen: TorchGenerator; prefix?: string },
): Map<string, tf.Variable> {
  const { rank, alpha, gen } = opts;
  if (!Number.isInteger(rank) || rank < 1) throw usageError(`LoRA rank must be a positive integer, got ${rank}`);
  const vars = new Map<string, tf.Variable>();
  for (const module of modules) {
    const node = nodeAt(tree, module);
    if (has(node, 'lora_down')) throw usageError(`module ${module} already has a LoRA`);
    const w = leaf(node, 'weight');
    const conv = w.rank === 4 && !(w.shape[0] === 1 && w.shape[1] === 1);
    // tfjs layouts: linear [in,out] (1x1 convs treated as linear), conv HWIO
    const inDim = w.rank === 4 ? w.shape[2]! : w.shape[0]!;
    const outDim = w.rank === 4 ? w.shape[3]! : w.shape[1]!;
    const kh = conv ? w.shape[0]! : 1;
    const kw = conv ? w.shape[1]! : 1;
    const fanIn = inDim * kh * kw;
    const bound = 1 / Math.sqrt(fanIn);
    const u = gen.rand([rank * fanIn]).map((v) => (2 * v - 1) * bound);
    // drawn in torch's [r, in(, kh, kw)] order, then moved to tfjs layout
    const downTf = torchToTfLayout(`${module}.lora_down.weight`, { shape: conv ? [rank, inDim, kh, kw] : [rank, inDim], data: u });
    const down = ownedVariable(tf.tensor(downTf.data as Float32Array, downTf.shape), `${opts.prefix ?? 'lora'}/${module}.lora_down#${varCounter++}`);
    const up = ownedVariable(tf.zeros(conv ? [1, 1, rank, outDim] : [rank, outDim]), `${opts.prefix ?? 'lora'}/${module}.lora_up#${varCounter++}`);
    node.lora_down = { weight: down };
    node.lora_up = { weight: up };
    node.lora_scale = tf.scalar(alpha / rank);
    vars.set(`${module}.lora_down.weight`, down);
    vars.set(`${module}.lora_up.weight`, up);
  }
  return vars;
}

/** Module paths that carry injected LoRA factors. */
export function loraModulesOf(tree: ParamTree): string[] {
  return [...flattenParams(tree).keys()].filter((k) => k.endsWith('.lora_down.weight')).map((k) => k.slice(0, -'.lora_down.weight'.length));
}

/** The injected factors as torch-layout LoraModules (for writeLoraKohya / writeLoraPeft). */
export async function extractLora(tree: ParamTree, component: LoraComponent, alpha: number): Promise<LoraModule[]> {
  const out: LoraModule[] = [];
  for (const module of loraModulesOf(tree)) {
    const node = nodeAt(tree, module);
    const host = async (name: 'lora_down' | 'lora_up') => {
      const t = leaf(sub(node, name), 'weight');
      const key = `${module}.${name}.weight`;
      const data = (await t.data()) as Float32Array;
      const shape = [...t.shape];
      // 1x1-conv targets keep a 4-D torch shape; their factors were held as 2-D linear ones
      const base = leaf(node, 'weight');
      if (base.rank === 4 && t.rank === 2) {
        const torch = tfToTorchLayout(key, { shape, data });
        return { shape: [...torch.shape, 1, 1], data: torch.data as Float32Array };
      }
      const torch = tfToTorchLayout(key, { shape, data });
      return { shape: torch.shape, data: torch.data as Float32Array };
    };
    out.push({ component, module, down: await host('lora_down'), up: await host('lora_up'), alpha });
  }
  return out;
}

/** Remove injected factors (disposing them unless `keep`), returning the tree to the base model. */
export function removeLora(tree: ParamTree, keep = false): void {
  for (const module of loraModulesOf(tree)) {
    const node = nodeAt(tree, module);
    if (!keep) tf.dispose([leaf(sub(node, 'lora_down'), 'weight'), leaf(sub(node, 'lora_up'), 'weight')]);
    leaf(node, 'lora_scale').dispose();
    delete node.lora_down;
    delete node.lora_up;
    delete node.lora_scale;
  }
}
