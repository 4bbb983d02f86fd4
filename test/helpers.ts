/** Small numeric helpers for tests. */
import * as tf from '@tensorflow/tfjs';
import type { RawTensor } from '../src/io/safetensors.js';

/** max |a - b| over all elements (shapes must match). */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length mismatch ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** A golden NCHW tensor as an NHWC tf tensor. */
export function nhwc(t: RawTensor): tf.Tensor4D {
  return tf.tidy(() => tf.tensor4d(t.data as Float32Array, t.shape as [number, number, number, number]).transpose([0, 2, 3, 1]));
}

/** A tf NHWC result as NCHW host data, for comparing with goldens. */
export function toNchwData(x: tf.Tensor4D): Float32Array {
  const t = x.transpose([0, 3, 1, 2]);
  const d = t.dataSync() as Float32Array;
  t.dispose();
  return d;
}

export function rawTensor(t: RawTensor | undefined, name: string): RawTensor {
  if (!t) throw new Error(`golden tensor ${name} missing`);
  return t;
}
