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

/**
 * Which modules a LoRA adapts, as kohya sd-scripts networks/lora.py chooses them (spec lora-formats.md §1.3):
 * - 'attn': the attention projections attn1/attn2 to_q, to_k, to_v, to_out.0 (diffusers' default LoRA targets);
 *   text encoder: self_attn q/k/v/out_proj;
 * - 'attn+ff': every Linear / Conv2d inside each Transformer2DModel (proj_in, proj_out, attention, ff.net.0.proj,
 *   ff.net.2), which is kohya's default `networks.lora`; text encoder: CLIPAttention + CLIPMLP (fc1, fc2);
 * - 'attn+ff+conv': that plus every Linear / Conv2d inside each ResnetBlock2D (conv1, conv2, time_emb_proj,
 *   conv_shortcut), Downsample2D and Upsample2D (conv), which is kohya's LoCon ("LoRA-C3Lier", `conv_dim` set).
 * 3x3 convolutions take the conv rank/alpha (kohya conv_dim/conv_alpha); Linear layers and 1x1 convolutions
 * (time_emb_proj, conv_shortcut, proj_in/out) take the network rank/alpha, exactly as kohya assigns them.
 */
export type LoraTargets = 'attn' | 'attn+ff' | 'attn+ff+conv';

/** kohya UNET_TARGET_REPLACE_MODULE: Transformer2DModel, at <down_blocks.i|up_blocks.i|mid_block>.attentions.j */
const UNET_TRANSFORMER = /^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\./;
/** kohya UNET_TARGET_REPLACE_MODULE_CONV2D_3X3: ResnetBlock2D, Downsample2D, Upsample2D */
const UNET_CONV_BLOCK = /^((down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+|down_blocks\.\d+\.downsamplers\.\d+|up_blocks\.\d+\.upsamplers\.\d+)\./;
const UNET_ATTN = /\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$/;
/** kohya TEXT_ENCODER_TARGET_REPLACE_MODULE: CLIPAttention, CLIPMLP */
const TE_ATTN = /^text_model\.encoder\.layers\.\d+\.self_attn\./;
const TE_MLP = /^text_model\.encoder\.layers\.\d+\.mlp\./;

/** Whether a tfjs-layout weight is a convolution with a kernel larger than 1x1 (HWIO): LoCon's conv rank applies. */
export const isSpatialConv = (w: tf.Tensor): boolean => w.rank === 4 && (w.shape[0] !== 1 || w.shape[1] !== 1);

/** Module paths (diffusers names) of a tree that the target set adapts: every Linear / Conv2d the rule selects. */
export function loraTargetModules(tree: ParamTree, component: LoraComponent, targets: LoraTargets): string[] {
  const out: string[] = [];
  for (const [key, t] of flattenParams(tree)) {
    // Linear ([in,out]) and Conv2d (HWIO) weights; norms are 1-D, embedding tables are not inside the target blocks
    if (!key.endsWith('.weight') || key.includes('.lora_') || (t.rank !== 2 && t.rank !== 4)) continue;
    const m = key.slice(0, -'.weight'.length);
    const hit =
      component === 'unet'
        ? targets === 'attn'
          ? UNET_TRANSFORMER.test(m) && UNET_ATTN.test(m)
          : UNET_TRANSFORMER.test(m) || (targets === 'attn+ff+conv' && UNET_CONV_BLOCK.test(m))
        : TE_ATTN.test(m) || (targets !== 'attn' && TE_MLP.test(m));
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

export interface LoraRanks {
  /** rank / alpha of Linear layers and 1x1 convolutions (kohya network_dim / network_alpha) */
  rank: number;
  alpha: number;
  /** rank / alpha of 3x3 (k x k) convolutions (kohya conv_dim / conv_alpha); default: rank / alpha */
  convRank?: number;
  convAlpha?: number;
}

/** The rank and alpha a module gets (kohya LoRANetwork.create_modules: k x k convs take conv_dim/conv_alpha). */
export function rankFor(w: tf.Tensor, r: LoraRanks): { rank: number; alpha: number } {
  return isSpatialConv(w) ? { rank: r.convRank ?? r.rank, alpha: r.convAlpha ?? r.alpha } : { rank: r.rank, alpha: r.alpha };
}

/**
 * Add trainable factors to every target module: down initialised as torch's kaiming_uniform(a=sqrt(5)) of a
 * Linear/Conv (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) from the torch-compatible generator, up = 0 (so training starts
 * at the base model, as kohya and PEFT do). A k x k conv gets a k x k down kernel (applied with the layer's stride
 * and padding) and a 1x1 up kernel (kohya LoRAModule / LyCORIS LoCon) at the conv rank; Linear layers and 1x1 convs
 * get 2-D factors at the network rank. Returns the variables keyed `<module>.lora_down.weight` / `.lora_up.weight`.
 */
export function injectLora(tree: ParamTree, modules: string[], opts: LoraRanks & { gen: TorchGenerator; prefix?: string }): Map<string, tf.Variable> {
  const { gen } = opts;
  for (const [what, r] of [['rank', opts.rank], ['conv rank', opts.convRank ?? opts.rank]] as const) {
    if (!Number.isInteger(r) || r < 1) throw usageError(`LoRA ${what} must be a positive integer, got ${r}`);
  }
  const vars = new Map<string, tf.Variable>();
  for (const module of modules) {
    const node = nodeAt(tree, module);
    if (has(node, 'lora_down')) throw usageError(`module ${module} already has a LoRA`);
    const w = leaf(node, 'weight');
    const conv = isSpatialConv(w);
    const { rank, alpha } = rankFor(w, opts);
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

/**
 * The injected factors as torch-layout LoraModules (for writeLoraKohya / writeLoraPeft). `alphas` is the alpha of
 * every module (a number) or the LoraRanks they were injected with (k x k convs then get convAlpha).
 */
export async function extractLora(tree: ParamTree, component: LoraComponent, alphas: number | LoraRanks): Promise<LoraModule[]> {
  const out: LoraModule[] = [];
  for (const module of loraModulesOf(tree)) {
    const node = nodeAt(tree, module);
    const alpha = typeof alphas === 'number' ? alphas : rankFor(leaf(node, 'weight'), alphas).alpha;
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
