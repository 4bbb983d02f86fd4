// The kernels we register on the wasm backend, each against the cpu backend's kernel on the same data.
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';
import type { BackendWasm } from '@tensorflow/tfjs-backend-wasm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WASM_KERNEL_LIMITS, registerWasmKernels } from '../../src/runtime/wasm-kernels.js';

// float32 with different summation orders (im2col GEMM vs the cpu's direct loops, <= ~3000 products per output):
// |wasm - cpu| <= 2e-6 * max|cpu| (about 16 ulp of the largest value); measured worst is below 5e-7.
const RTOL = 2e-6;

type Pad = 'same' | 'valid' | number | [[number, number], [number, number], [number, number], [number, number]];
interface ConvCase {
  x: [number, number, number, number];
  k: [number, number];
  cout: number;
  strides: number | [number, number];
  pad: Pad;
  dimRoundingMode?: 'floor' | 'round' | 'ceil';
  dataFormat?: 'NHWC' | 'NCHW';
}

const CASES: ConvCase[] = [
  { x: [1, 7, 9, 3], k: [3, 3], cout: 5, strides: 1, pad: 'same' },
  { x: [2, 7, 9, 8], k: [3, 3], cout: 6, strides: 1, pad: 'valid' },
  { x: [1, 9, 9, 40], k: [3, 3], cout: 24, strides: 1, pad: [[0, 0], [1, 2], [0, 1], [0, 0]] },
  { x: [2, 9, 7, 5], k: [3, 3], cout: 7, strides: 2, pad: 'same' },
  { x: [1, 8, 10, 16], k: [3, 3], cout: 9, strides: 2, pad: 'valid' }, // SD's downsampler: tf.pad then 'valid'
  { x: [2, 11, 9, 6], k: [3, 3], cout: 4, strides: 2, pad: 1 },
  { x: [2, 8, 8, 10], k: [3, 3], cout: 3, strides: [2, 1], pad: [[0, 0], [0, 1], [2, 0], [0, 0]] },
  { x: [2, 7, 9, 12], k: [1, 1], cout: 20, strides: 1, pad: 'valid' },
  { x: [1, 7, 9, 4], k: [1, 1], cout: 6, strides: 2, pad: 'same' },
  { x: [1, 10, 7, 3], k: [2, 3], cout: 5, strides: 3, pad: 'valid' }, // kernel narrower than stride: empty phases
  { x: [1, 8, 8, 4], k: [3, 3], cout: 5, strides: 2, pad: 0, dimRoundingMode: 'ceil' }, // last output past the input
  { x: [1, 6, 7, 5], k: [3, 3], cout: 4, strides: 1, pad: [[0, 0], [3, 0], [0, 3], [0, 0]] }, // pad > kernel - 1
  { x: [2, 5, 7, 9], k: [3, 3], cout: 6, strides: 2, pad: 'same', dataFormat: 'NCHW' }, // x is NCHW here
];

/** Deterministic uniform(-1, 1) data (mulberry32). */
function rand(n: number, seed: number): Float32Array {
  let a = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = ((t ^ (t >>> 14)) >>> 0) / 2147483648 - 1;
  }
  return out;
}

function wasm(): BackendWasm {
  return tf.backend() as BackendWasm;
}

let worst = 0; // over the exact-kernel comparisons, printed at the end

/** max |a - b| / max |b|, after checking the reference is real (finite, not all zero). */
function relErr(a: ArrayLike<number>, b: ArrayLike<number>, track = true): number {
  expect(a.length).toBe(b.length);
  let err = 0;
  let scale = 0;
  for (let i = 0; i < b.length; i++) {
    expect(Number.isFinite(a[i])).toBe(true);
    err = Math.max(err, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  expect(scale).toBeGreaterThan(0.1);
  if (track) worst = Math.max(worst, err / scale);
  return err / scale;
}

function describeCase(c: ConvCase): string {
  const pad = Array.isArray(c.pad) ? JSON.stringify(c.pad.slice(1, 3)) : c.pad;
  return `x ${c.x} k ${c.k} cout ${c.cout} s ${c.strides} pad ${pad}${c.dimRoundingMode ? ` ${c.dimRoundingMode}` : ''}${c.dataFormat === 'NCHW' ? ' NCHW' : ''}`;
}

function convShapes(c: ConvCase) {
  const fmt = c.dataFormat === 'NCHW' ? 'channelsFirst' : 'channelsLast';
  const cin = fmt === 'channelsFirst' ? c.x[1] : c.x[3];
  const filterShape: [number, number, number, number] = [c.k[0], c.k[1], cin, c.cout];
  const info = tf.backend_util.computeConv2DInfo(c.x, filterShape, c.strides, 1, c.pad, c.dimRoundingMode, false, fmt);
  const attrs = { strides: c.strides, pad: c.pad, dataFormat: c.dataFormat ?? 'NHWC', dimRoundingMode: c.dimRoundingMode };
  return { filterShape, dyShape: info.outShape, attrs };
}

/** Both backprop kernels of one case on the current backend, as host arrays. */
function backprops(c: ConvCase, seed: number): { dw: Float32Array; dx: Float32Array } {
  const { filterShape, dyShape, attrs } = convShapes(c);
  return tf.tidy(() => {
    const x = tf.tensor(rand(tf.util.sizeFromShape(c.x), seed), c.x);
    const w = tf.tensor(rand(tf.util.sizeFromShape(filterShape), seed + 1), filterShape);
    const dy = tf.tensor(rand(tf.util.sizeFromShape(dyShape), seed + 2), dyShape);
    const dw = tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, { ...attrs, filterShape } as unknown as tf.NamedAttrMap) as tf.Tensor;
    const dx = tf.engine().runKernel('Conv2DBackpropInput', { dy, filter: w }, { ...attrs, inputShape: c.x } as unknown as tf.NamedAttrMap) as tf.Tensor;
    expect(dw.shape).toEqual(filterShape);
    expect(dx.shape).toEqual(c.x);
    return { dw: dw.dataSync() as Float32Array, dx: dx.dataSync() as Float32Array };
  });
}

beforeAll(async () => {
  await tf.setBackend('wasm');
  await tf.ready();
  registerWasmKernels();
  registerWasmKernels(); // idempotent
  tf.env().set('IS_TEST', true); // the engine then checks every kernel call for leaked data ids
});

afterAll(async () => {
  console.log(`wasm kernels vs cpu: worst max|diff| / max|ref| = ${worst.toExponential(2)} (bound ${RTOL})`);
  tf.env().set('IS_TEST', false);
  await tf.setBackend('cpu');
});

describe('wasm Conv2DBackpropFilter / Conv2DBackpropInput match the cpu kernels', () => {
  for (const [i, c] of CASES.entries()) {
    it(describeCase(c), async () => {
      await tf.setBackend('cpu');
      const ref = backprops(c, 100 + i);
      await tf.setBackend('wasm');
      const ids = wasm().numDataIds();
      const got = backprops(c, 100 + i);
      expect(wasm().numDataIds()).toBe(ids);
      expect(relErr(got.dw, ref.dw)).toBeLessThanOrEqual(RTOL);
      expect(relErr(got.dx, ref.dx)).toBeLessThanOrEqual(RTOL);
    });
  }

  it('chunked im2col (chunks of 1 and of 5 output rows, across images) equals the one-chunk result', async () => {
    const c: ConvCase = { x: [2, 9, 7, 6], k: [3, 3], cout: 5, strides: 1, pad: 'same' };
    await tf.setBackend('cpu');
    const ref = backprops(c, 7);
    await tf.setBackend('wasm');
    const saved = WASM_KERNEL_LIMITS.im2colBytes;
    const row = 4 * 7 * 3 * 3 * 6; // bytes of one output row's im2col
    try {
      for (const rows of [1, 5]) {
        WASM_KERNEL_LIMITS.im2colBytes = rows * row;
        const ids = wasm().numDataIds();
        const got = backprops(c, 7);
        expect(wasm().numDataIds()).toBe(ids);
        expect(relErr(got.dw, ref.dw)).toBeLessThanOrEqual(RTOL);
      }
    } finally {
      WASM_KERNEL_LIMITS.im2colBytes = saved;
    }
  });
});

describe('wasm UnsortedSegmentSum', () => {
  const run = (x: Float32Array, xShape: number[], ids: number[], numSegments: number) =>
    tf.tidy(() => {
      const out = tf.unsortedSegmentSum(tf.tensor(x, xShape), tf.tensor1d(ids, 'int32'), numSegments);
      expect(out.shape).toEqual([numSegments, ...xShape.slice(1)]);
      return out.dataSync() as Float32Array;
    });
  const cases: [string, number[], number[], number][] = [
    ['duplicate ids', [10, 7], [3, 0, 3, 12, 5, 3, 0, 1, 12, 2], 13],
    ['rank-3 rows', [6, 2, 3], [1, 1, 0, 4, 4, 4], 5],
    ['ids outside [0, numSegments) are dropped', [5, 4], [-1, 2, 9, 2, 0], 4],
  ];
  for (const [name, shape, ids, numSegments] of cases) {
    it(name, async () => {
      const x = rand(tf.util.sizeFromShape(shape), ids.length);
      await tf.setBackend('cpu');
      const ref = run(x, shape, ids, numSegments);
      await tf.setBackend('wasm');
      const got = run(x, shape, ids, numSegments);
      expect(relErr(got, ref)).toBeLessThanOrEqual(RTOL);
      // a segment no id points at is exactly zero
      const inner = ref.length / numSegments;
      const unused = [...Array(numSegments).keys()].find((s) => !ids.includes(s));
      if (unused !== undefined) expect(Array.from(got.subarray(unused * inner, (unused + 1) * inner))).toEqual(new Array(inner).fill(0));
    });
  }

  it('the gradient of tf.gather on an embedding table', async () => {
    const table = rand(50 * 8, 3);
    const grad = () =>
      tf.tidy(() => {
        const idx = tf.tensor2d([[1, 3, 3], [49, 0, 3]], [2, 3], 'int32');
        const g = tf.grad((t: tf.Tensor) => tf.gather(t, idx).square().sum())(tf.tensor2d(table, [50, 8]));
        return g.dataSync() as Float32Array;
      });
    await tf.setBackend('cpu');
    const ref = grad();
    await tf.setBackend('wasm');
    expect(relErr(grad(), ref)).toBeLessThanOrEqual(RTOL);
  });
});

describe('wasm BatchMatMul on XNNPACK', () => {
  // [a shape, b shape, transposeA, transposeB]
  const cases: [number[], number[], boolean, boolean][] = [
    [[33, 17], [17, 9], false, false], // wasm's own fast path, passed through
    [[17, 33], [17, 9], true, false], // a weight gradient: x^T dy
    [[33, 17], [9, 17], false, true], // an input gradient: dy W^T
    [[17, 33], [9, 17], true, true],
    [[6, 13, 8], [6, 8, 11], false, false], // attention: softmax(s) v
    [[6, 13, 8], [6, 11, 8], false, true], // attention: q k^T
    [[6, 8, 13], [6, 8, 11], true, false],
    [[2, 3, 13, 8], [8, 11], false, false], // a batch against a shared b: one tall GEMM
    [[4, 13, 8], [1, 11, 8], false, true],
    [[13, 8], [5, 8, 11], false, false], // a shared a against a batch of b
    [[1, 8, 13], [5, 11, 8], true, true],
    // larger batched products (one XNNPACK GEMM per item, and a batch against a shared b)
    [[2, 70, 64], [2, 64, 70], false, false],
    [[2, 64, 70], [1, 70, 64], true, true],
  ];
  for (const [as, bs, ta, tb] of cases) {
    it(`${as} x ${bs}${ta ? ' transposeA' : ''}${tb ? ' transposeB' : ''}`, async () => {
      const av = rand(tf.util.sizeFromShape(as), as.length * 7 + 1);
      const bv = rand(tf.util.sizeFromShape(bs), bs.length * 7 + 2);
      const mm = () =>
        tf.tidy(() => {
          const out = tf.matMul(tf.tensor(av, as), tf.tensor(bv, bs), ta, tb);
          return { shape: out.shape, data: out.dataSync() as Float32Array };
        });
      await tf.setBackend('cpu');
      const ref = mm();
      await tf.setBackend('wasm');
      const ids = wasm().numDataIds();
      const got = mm();
      expect(wasm().numDataIds()).toBe(ids);
      expect(got.shape).toEqual(ref.shape);
      expect(relErr(got.data, ref.data)).toBeLessThanOrEqual(RTOL);
    });
  }
});

describe('training through the wasm kernels', () => {
  /** A tiny conv net (3x3 same, SiLU, pad + 3x3 stride 2, 1x1, 2x nearest upsample, group-norm-like moments, softmax). */
  function net(x: tf.Tensor4D, w1: tf.Tensor4D, w2: tf.Tensor4D, w3: tf.Tensor4D): tf.Scalar {
    let h = tf.conv2d(x, w1, 1, 'same');
    h = tf.mul(h, tf.sigmoid(h));
    h = tf.conv2d(tf.pad(h, [[0, 0], [0, 1], [0, 1], [0, 0]]), w2, 2, 'valid');
    h = tf.conv2d(h, w3, 1, 'valid');
    // 2x nearest by concat, as the models do: the cpu backend's ResizeNearestNeighborGrad reads dy with the image's
    // batch stride, so it is wrong for batch > 1 and cannot be the reference here
    const [n, h0, w0, c] = h.shape;
    const cols = h.reshape([n, h0, w0, 1, c]);
    const wide = tf.concat([cols, cols], 3).reshape([n, h0, 1, w0 * 2, c]);
    h = tf.concat([wide, wide], 2).reshape([n, h0 * 2, w0 * 2, c]);
    const [hh, ww] = [h0 * 2, w0 * 2];
    const g = h.reshape([n, hh, ww, 2, c / 2]);
    const { mean, variance } = tf.moments(g, [1, 2, 4], true);
    h = g.sub(mean).div(variance.add(1e-5).sqrt()).reshape([n, hh, ww, c]);
    return tf.softmax(h).mul(tf.erf(h)).sum();
  }
  const shapes = { x: [2, 9, 7, 3], w1: [3, 3, 3, 8], w2: [3, 3, 8, 12], w3: [1, 1, 12, 6] } as const;
  const data = Object.fromEntries(Object.entries(shapes).map(([k, s], i) => [k, rand(tf.util.sizeFromShape([...s]), 50 + i)]));

  function grads(): Float32Array[] {
    const [x, w1, w2, w3] = (['x', 'w1', 'w2', 'w3'] as const).map((k) => tf.tensor4d(data[k], [...shapes[k]] as [number, number, number, number]));
    const gs = tf.grads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor, d: tf.Tensor) => net(a as tf.Tensor4D, b as tf.Tensor4D, c as tf.Tensor4D, d as tf.Tensor4D))([x, w1, w2, w3]);
    const out = gs.map((g) => g.dataSync() as Float32Array);
    tf.dispose([...gs, x, w1, w2, w3]);
    return out;
  }

  it('gradients w.r.t. the input and every filter equal the cpu backend, without leaks', async () => {
    await tf.setBackend('cpu');
    const ref = grads();
    await tf.setBackend('wasm');
    const tensors = tf.memory().numTensors;
    const ids = wasm().numDataIds();
    const got = grads();
    expect(tf.memory().numTensors).toBe(tensors);
    expect(wasm().numDataIds()).toBe(ids);
    for (let i = 0; i < ref.length; i++) expect(relErr(got[i], ref[i], false)).toBeLessThanOrEqual(1e-5); // through erf/softmax/norm
  });
});

describe('wasm Identity shares data', () => {
  it('a clone shares the dataId and survives the original', () => {
    const a = tf.tensor1d([1, 2, 3]);
    const ids = wasm().numDataIds();
    const c = tf.clone(a);
    expect(wasm().numDataIds()).toBe(ids);
    a.dispose();
    expect(Array.from(c.dataSync())).toEqual([1, 2, 3]);
    c.dispose();
    expect(wasm().numDataIds()).toBe(ids - 1);
  });

  it('a taped matMul with a frozen 4 MB weight does not copy the weight', () => {
    const weight = tf.tensor2d(rand(512 * 2048, 9), [512, 2048]); // frozen: a plain tensor
    const x = tf.variable(tf.tensor2d(rand(4 * 512, 10), [4, 512]));
    let buffers = -1;
    let ids = -1;
    let tensors = -1;
    const { value, grads } = tf.variableGrads(() => {
      // tf.memory().numBytes counts bytes per tensor, shared or not; buffers and backend data ids count storage
      const m0 = tf.memory();
      const i0 = wasm().numDataIds();
      const y = tf.matMul(x, weight); // saves x and weight for backprop (the engine clones both through Identity)
      const m1 = tf.memory();
      buffers = m1.numDataBuffers - m0.numDataBuffers;
      tensors = m1.numTensors - m0.numTensors;
      ids = wasm().numDataIds() - i0;
      return y.square().sum();
    }, [x]);
    expect(tensors).toBe(3); // y and the two saved clones ...
    expect(ids).toBe(1); // ... but only y has storage of its own
    expect(buffers).toBe(1);
    expect(value.dataSync()[0]).toBeGreaterThan(0);
    tf.dispose([value, grads[x.name], weight, x]);
  });
});

describe('wasm Slice / SplitV copy straight from the heap', () => {
  const cases: { shape: number[]; begin: number[]; size: number[] }[] = [
    { shape: [10], begin: [3], size: [5] },
    { shape: [4, 7], begin: [1, 2], size: [2, 5] },
    { shape: [4, 7], begin: [1, 0], size: [3, 7] }, // whole rows: one run
    { shape: [3, 5, 70], begin: [0, 1, 3], size: [3, 3, 60] }, // long runs (TypedArray.set)
    { shape: [2, 6, 5, 8], begin: [1, 2, 0, 0], size: [1, 3, 5, 8] },
    { shape: [2, 3, 4, 5, 6], begin: [0, 1, 1, 2, 3], size: [2, 2, 3, 2, 3] },
    { shape: [3, 4], begin: [1, 1], size: [0, 2] }, // empty
  ];
  const data = (shape: number[], dtype: 'float32' | 'int32', seed: number) =>
    dtype === 'int32' ? Int32Array.from(rand(tf.util.sizeFromShape(shape), seed), (v) => Math.round(v * 1000)) : rand(tf.util.sizeFromShape(shape), seed);
  const onBoth = async (f: () => tf.Tensor | tf.Tensor[]) => {
    const run = () => tf.tidy(() => [f()].flat().map((t) => Array.from(t.dataSync())));
    const w = run();
    await tf.setBackend('cpu');
    const c = run();
    await tf.setBackend('wasm');
    return { w, c };
  };
  for (const dtype of ['float32', 'int32'] as const) {
    for (const [i, c] of cases.entries()) {
      it(`${dtype} slice of ${c.shape} at ${c.begin} size ${c.size}: identical to cpu`, async () => {
        const x = data(c.shape, dtype, 50 + i);
        const { w, c: ref } = await onBoth(() => tf.slice(tf.tensor(x, c.shape, dtype), c.begin, c.size));
        expect(w).toEqual(ref);
        if (c.size.every((s) => s > 0)) expect(ref[0].length).toBe(tf.util.sizeFromShape(c.size));
      });
    }
  }
  it('split along every axis, equal and uneven parts: identical to cpu, no leaks', async () => {
    const shape = [4, 6, 10];
    const x = rand(tf.util.sizeFromShape(shape), 77);
    for (let axis = 0; axis < 3; axis++) {
      for (const parts of [2, [1, shape[axis] - 3, 2]] as const) {
        const before = tf.memory().numTensors;
        const { w, c } = await onBoth(() => tf.split(tf.tensor(x, shape), parts as number | number[], axis));
        expect(w).toEqual(c);
        expect(w.length).toBe(typeof parts === 'number' ? parts : parts.length);
        expect(tf.memory().numTensors).toBe(before);
      }
    }
  });
});
