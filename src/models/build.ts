/**
 * Turning torch-layout tensors (diffusers keys) into a model's params tree, strictly: every key the model reads
 * must be present with the right shape, and nothing else may be.
 */
import * as tf from '@tensorflow/tfjs';
import type { RawTensor } from '../io/safetensors.js';
import { tensorFromTorch, tfShapeOf } from '../io/layout.js';
import { type ParamTree, checkAgainstSpec, unflattenParams } from './params.js';

/** Keys a checkpoint may carry that no model reads (regenerated buffers). */
const IGNORABLE = [/(^|\.)position_ids$/];

/** Build a params tree from torch-layout tensors after checking them against `spec` (torch shapes). */
export function buildParams(what: string, spec: Map<string, number[]>, tensors: Map<string, RawTensor>): ParamTree {
  const found = new Map<string, number[]>();
  for (const [k, t] of tensors) if (!IGNORABLE.some((r) => r.test(k))) found.set(k, t.shape);
  checkAgainstSpec(what, spec, found);
  const leaves: [string, tf.Tensor][] = [];
  for (const key of spec.keys()) {
    const t = tensors.get(key)!;
    leaves.push([key, tensorFromTorch(key, { shape: t.shape, data: t.data })]);
  }
  return unflattenParams(leaves);
}

/**
 * Random parameters for a spec (benchmarks with SD v1 shapes, tiny test models): weights ~ N(0, 1/fan_in),
 * biases 0, norm scales 1, embeddings N(0, 0.02). Deterministic for a seed.
 */
export function randomParams(spec: Map<string, number[]>, seed = 0): ParamTree {
  const leaves: [string, tf.Tensor][] = [];
  let s = seed;
  for (const [key, torchShape] of spec) {
    const t = tf.tidy(() => {
      const isNorm = /norm[^.]*\.weight$|layer_norm\d?\.weight$/.test(key) && torchShape.length === 1;
      if (isNorm) return tf.ones([torchShape[0]]);
      if (key.endsWith('bias')) return tf.zeros(torchShape);
      const fanIn = torchShape.length === 4 ? torchShape[1] * torchShape[2] * torchShape[3] : torchShape.length === 2 ? torchShape[1] : 1;
      const std = /embedding/.test(key) ? 0.02 : 1 / Math.sqrt(fanIn);
      // drawn directly in tfjs layout: i.i.d. values need no transpose
      return tf.randomNormal(tfShapeOf(key, torchShape), 0, std, 'float32', s++);
    });
    leaves.push([key, t]);
  }
  return unflattenParams(leaves);
}
