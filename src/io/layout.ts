/**
 * The one place where PyTorch layouts become tfjs layouts and back: conv weights OIHW <-> HWIO, linear weights
 * [out,in] <-> [in,out]. Embedding tables ([vocab, dim]) are not linear weights and stay as they are.
 */
import * as tf from '@tensorflow/tfjs';

/** Keys of 2-D tensors that are lookup tables, not Linear weights. */
const EMBEDDING_SUFFIXES = ['token_embedding.weight', 'position_embedding.weight', 'emb_params', 'string_to_param'];

export type LayoutKind = 'conv' | 'linear' | 'as-is';

/** How a torch tensor of this key and shape maps to tfjs. */
export function layoutKind(key: string, shape: readonly number[]): LayoutKind {
  if (shape.length === 4) return 'conv';
  if (shape.length === 2 && key.endsWith('weight') && !EMBEDDING_SUFFIXES.some((s) => key.endsWith(s))) return 'linear';
  return 'as-is';
}

/** Permute a row-major typed array (JS, no tf) by `perm`. */
function permute<T extends Float32Array | Int32Array>(data: T, shape: readonly number[], perm: readonly number[]): T {
  const n = shape.length;
  const outShape = perm.map((p) => shape[p]);
  const inStrides = new Array<number>(n);
  inStrides[n - 1] = 1;
  for (let i = n - 2; i >= 0; i--) inStrides[i] = inStrides[i + 1] * shape[i + 1];
  const strideForOut = perm.map((p) => inStrides[p]);
  const out = new (data.constructor as new (len: number) => T)(data.length);
  const idx = new Array<number>(n).fill(0);
  let src = 0;
  for (let o = 0; o < data.length; o++) {
    out[o] = data[src];
    // increment the output multi-index (last axis fastest) and track the source offset
    for (let d = n - 1; d >= 0; d--) {
      idx[d]++;
      src += strideForOut[d];
      if (idx[d] < outShape[d]) break;
      src -= strideForOut[d] * outShape[d];
      idx[d] = 0;
    }
  }
  return out;
}

export interface HostTensor {
  shape: number[];
  data: Float32Array | Int32Array;
}

/** torch layout -> tfjs layout (host arrays). */
export function torchToTfLayout(key: string, t: HostTensor): HostTensor {
  switch (layoutKind(key, t.shape)) {
    case 'conv': // [O,I,kh,kw] -> [kh,kw,I,O]
      return { shape: [t.shape[2], t.shape[3], t.shape[1], t.shape[0]], data: permute(t.data, t.shape, [2, 3, 1, 0]) };
    case 'linear': // [out,in] -> [in,out]
      return { shape: [t.shape[1], t.shape[0]], data: permute(t.data, t.shape, [1, 0]) };
    default:
      return t;
  }
}

/** tfjs layout -> torch layout (host arrays); the inverse of torchToTfLayout. */
export function tfToTorchLayout(key: string, t: HostTensor): HostTensor {
  if (t.shape.length === 4) {
    // [kh,kw,I,O] -> [O,I,kh,kw]
    return { shape: [t.shape[3], t.shape[2], t.shape[0], t.shape[1]], data: permute(t.data, t.shape, [3, 2, 0, 1]) };
  }
  if (layoutKind(key, t.shape) === 'linear') return { shape: [t.shape[1], t.shape[0]], data: permute(t.data, t.shape, [1, 0]) };
  return t;
}

/** The tfjs shape of a torch-layout tensor. */
export function tfShapeOf(key: string, torchShape: readonly number[]): number[] {
  const k = layoutKind(key, torchShape);
  if (k === 'conv') return [torchShape[2], torchShape[3], torchShape[1], torchShape[0]];
  if (k === 'linear') return [torchShape[1], torchShape[0]];
  return [...torchShape];
}

/** The torch shape of a tfjs-layout tensor. */
export function torchShapeOf(key: string, tfShape: readonly number[]): number[] {
  if (tfShape.length === 4) return [tfShape[3], tfShape[2], tfShape[0], tfShape[1]];
  if (layoutKind(key, tfShape) === 'linear') return [tfShape[1], tfShape[0]];
  return [...tfShape];
}

/** Make a tf tensor from a torch-layout host tensor. */
export function tensorFromTorch(key: string, t: HostTensor): tf.Tensor {
  const c = torchToTfLayout(key, t);
  return tf.tensor(c.data, c.shape, c.data instanceof Int32Array ? 'int32' : 'float32');
}

/** Read a tf tensor back to a torch-layout host tensor. */
export async function tensorToTorch(key: string, t: tf.Tensor): Promise<HostTensor> {
  const data = (await t.data()) as Float32Array | Int32Array;
  return tfToTorchLayout(key, { shape: [...t.shape], data });
}
