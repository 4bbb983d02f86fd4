/**
 * Kernels we register on tfjs' wasm backend (4.22) so that it can train: it lacks Conv2DBackpropFilter and
 * UnsortedSegmentSum, its Conv2DBackpropInput is a naive loop (~3 GFLOP/s against ~20-33 for its XNNPACK Conv2D),
 * its BatchMatMul leaves XNNPACK for a naive loop whenever an operand is transposed or batched (every backward
 * product, all of attention), and its Identity copies data (the engine clones every tensor saved for backprop
 * through Identity, so a taped forward would copy each frozen weight). Each kernel is built from wasm kernels that
 * run in XNNPACK or C++ (Conv2D, BatchMatMul on its fast path, Transpose, Add, ScatterNd) plus plain copies on the
 * wasm heap; wasm's own Slice is avoided because it copies its whole input to JS on every call.
 */
import * as tf from '@tensorflow/tfjs';
import type { BackendWasm } from '@tensorflow/tfjs-backend-wasm';

type Info = tf.TensorInfo;
type Shape4 = [number, number, number, number];
type Pads4 = [[number, number], [number, number], [number, number], [number, number]];
type KernelArgs = Parameters<tf.KernelFunc>[0];

/** Tunables; tests lower im2colBytes to exercise the chunked accumulation on small shapes. */
export const WASM_KERNEL_LIMITS = {
  /** upper bound on one im2col chunk of Conv2DBackpropFilter: bounds the heap it needs (XNNPACK packs a copy) */
  im2colBytes: 64 * 1024 * 1024,
};
/** Below this many floats a JS loop beats TypedArray.set's call overhead. */
const SMALL_COPY = 32;
/** Conv2DBackpropFilter's im2col rows: TypedArray.set only above this length (measured: a loop is ~3x faster at 32). */
const ROW_COPY = 256;

let registered = false;
let originalBackpropInput: tf.KernelFunc | undefined;
let originalBatchMatMul: tf.KernelFunc | undefined;
let originalSlice: tf.KernelFunc | undefined;

/** Run another wasm kernel directly (no engine, no tape); the caller owns and frees the result. */
function run(name: string, backend: BackendWasm, inputs: tf.NamedTensorInfoMap, attrs: object = {}): Info {
  const kernel = tf.getKernel(name, 'wasm');
  if (!kernel) throw new Error(`wasm kernel ${name} is not registered (import @tensorflow/tfjs-backend-wasm first)`);
  const out = kernel.kernelFunc({ inputs, backend, attrs: attrs as tf.NamedAttrMap });
  return Array.isArray(out) ? out[0] : out;
}

/** A named kernel input (the engine always passes them; the type says they may be absent). */
function input(inputs: tf.NamedTensorInfoMap, name: string): Info {
  const t = inputs[name];
  if (!t) throw new Error(`kernel input ${name} is missing`);
  return t;
}

/** wasm's own BatchMatMul on operands already in its XNNPACK layout: a [1, M, K] x b [1, K, N]. */
function xnnGemm(backend: BackendWasm, a: Info, b: Info): Info {
  const kernel = originalBatchMatMul ?? tf.getKernel('BatchMatMul', 'wasm')?.kernelFunc;
  if (!kernel) throw new Error('wasm kernel BatchMatMul is not registered');
  return kernel({ inputs: { a, b }, backend, attrs: { transposeA: false, transposeB: false } }) as Info;
}

/** Drop our reference to each intermediate (backend refcount; storage goes with the last one). */
function free(backend: BackendWasm, ...infos: (Info | undefined)[]): void {
  for (const t of infos) if (t) backend.disposeData(t.dataId);
}

/** A view of the same data under another shape (refcounted, like wasm's Reshape). */
function reshape(backend: BackendWasm, x: Info, shape: number[]): Info {
  backend.incRef(x.dataId);
  return { dataId: x.dataId, shape, dtype: x.dtype };
}

/** wasm's C++ Transpose. */
function transpose(backend: BackendWasm, x: Info, perm: number[]): Info {
  return run('Transpose', backend, { x }, { perm });
}

/** Float32 view on the heap; re-take it after any allocation (the heap may grow and detach old views). */
function f32(backend: BackendWasm, t: Info): Float32Array {
  return backend.typedArrayFromHeap(t) as Float32Array;
}

/** dst[d..d+n) = src[s..s+n); short runs by hand (TypedArray.set's call overhead dominates below SMALL_COPY). */
function copy(dst: Float32Array, d: number, src: Float32Array, s: number, n: number): void {
  if (n < SMALL_COPY) for (let k = 0; k < n; k++) dst[d + k] = src[s + k];
  else dst.set(src.subarray(s, s + n), d);
}

/** A float32 zero tensor (makeOutput's heap memory is not cleared). */
function zeros(backend: BackendWasm, shape: number[]): Info {
  const out = backend.makeOutput(shape, 'float32');
  f32(backend, out).fill(0);
  return out;
}

/** A contiguous-by-rows crop of an NHWC tensor, copied row by row on the heap. */
function crop4d(backend: BackendWasm, x: Info, begin: Shape4, size: Shape4): Info {
  const [, H, W, C] = x.shape;
  const out = backend.makeOutput(size, 'float32');
  const xv = f32(backend, x);
  const ov = f32(backend, out);
  const len = size[2] * C;
  let o = 0;
  for (let n = 0; n < size[0]; n++) {
    for (let h = 0; h < size[1]; h++) {
      copy(ov, o, xv, (((n + begin[0]) * H + h + begin[1]) * W + begin[2]) * C, len);
      o += len;
    }
  }
  return out;
}

/** tfjs' own output-size and padding rules ('same', 'valid', numbers, explicit pads, dimRoundingMode). */
function convInfo(xShape: number[], filterShape: number[], attrs: tf.Conv2DBackpropFilterAttrs | tf.Conv2DBackpropInputAttrs) {
  const fmt = tf.backend_util.convertConv2DDataFormat(attrs.dataFormat);
  return tf.backend_util.computeConv2DInfo(xShape as Shape4, filterShape as Shape4, attrs.strides, 1, attrs.pad, attrs.dimRoundingMode, false, fmt);
}

/** Our kernels compute in float32 only, as wasm's Conv2D and BatchMatMul do. */
function assertFloat(kernel: string, ...ts: Info[]): void {
  for (const t of ts) if (t.dtype !== 'float32') throw new Error(`${kernel} on wasm supports float32 only, got ${t.dtype}`);
}

/** Identity shares the dataId (refcount), as the cpu backend does: tensors are immutable, so a copy buys nothing. */
function identity({ inputs, backend }: KernelArgs): Info {
  const x = input(inputs, 'x');
  (backend as BackendWasm).incRef(x.dataId);
  return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
}

/**
 * Conv2DBackpropFilter as im2col + one GEMM per chunk: dW^T[cout, kh*kw*cin] = dy^T[cout, M] x cols[M, kh*kw*cin],
 * M = N*OH*OW. The operands are laid out so that wasm's BatchMatMul takes its XNNPACK path (no transpose flags,
 * batch 1); its transposeA path is a naive loop. cols is built by heap copies in chunks of output rows (<= 64 MB).
 */
function conv2DBackpropFilter({ inputs, backend: b, attrs }: KernelArgs): Info {
  const backend = b as BackendWasm;
  const a = attrs as unknown as tf.Conv2DBackpropFilterAttrs;
  const x0 = input(inputs, 'x');
  const dy0 = input(inputs, 'dy');
  assertFloat('Conv2DBackpropFilter', x0, dy0);
  const info = convInfo(x0.shape, a.filterShape, a);
  const { batchSize: N, inHeight: H, inWidth: W, inChannels: C, outHeight: OH, outWidth: OW, outChannels: CO } = info;
  const { strideHeight: sh, strideWidth: sw, filterHeight: kh, filterWidth: kw } = info;
  const pt = info.padInfo.top;
  const pl = info.padInfo.left;
  const K = kh * kw * C;
  const M = N * OH * OW;
  // NCHW arrives as the same convolution on NHWC copies
  const channelsFirst = info.dataFormat === 'channelsFirst';
  const x = channelsFirst ? transpose(backend, x0, [0, 2, 3, 1]) : x0;
  const dy = channelsFirst ? transpose(backend, dy0, [0, 2, 3, 1]) : dy0;
  const expect = [N, OH, OW, CO];
  if (dy.shape.some((d, i) => d !== expect[i])) {
    throw new Error(`Conv2DBackpropFilter: dy shape ${dy.shape} does not match the convolution's output ${expect}`);
  }
  if (M === 0 || K === 0 || CO === 0) {
    if (channelsFirst) free(backend, x, dy);
    return zeros(backend, a.filterShape);
  }
  // dW[K, CO] = colsT[K, M] x dy[M, CO], K = (i, j, c) filter taps, M = (n, oh, ow) output positions: the result is
  // the filter in its HWIO layout, and XNNPACK packs only dy (its b operand; packing the much larger cols on every
  // call is what made the [CO, M] x [M, K] form slow). colsT row (i, j, c) is x's channel c shifted by the tap, so it
  // is built from x transposed to [C, N, H, W] in runs of one output row.
  const xT = transpose(backend, x, [3, 0, 1, 2]);
  const unitsPerChunk = Math.max(1, Math.floor(WASM_KERNEL_LIMITS.im2colBytes / (4 * OW * K)));
  const units = N * OH; // one unit = one output row of one image
  let acc: Info | undefined;
  for (let u0 = 0; u0 < units; u0 += unitsPerChunk) {
    const u1 = Math.min(units, u0 + unitsPerChunk);
    const rows = (u1 - u0) * OW;
    const colsT = backend.makeOutput([1, K, rows], 'float32');
    const cv = f32(backend, colsT);
    const xv = f32(backend, xT);
    for (let i = 0; i < kh; i++) {
      for (let j = 0; j < kw; j++) {
        // the output columns whose input column iw = ow*sw + j - pl lies inside the image: ow in [owLo, owHi)
        const owLo = Math.min(OW, Math.max(0, Math.ceil((pl - j) / sw)));
        const owHi = Math.max(owLo, Math.min(OW, Math.floor((W - 1 + pl - j) / sw) + 1));
        for (let c = 0; c < C; c++) {
          let d = ((i * kw + j) * C + c) * rows;
          const xc = c * N * H * W;
          for (let u = u0; u < u1; u++, d += OW) {
            const n = Math.floor(u / OH);
            const ih = (u % OH) * sh + i - pt;
            // plain loops: these runs are one output row (tens of floats), where fill/set/subarray calls cost more
            if (ih < 0 || ih >= H) {
              for (let k = d; k < d + OW; k++) cv[k] = 0;
              continue;
            }
            for (let k = d; k < d + owLo; k++) cv[k] = 0;
            for (let k = d + owHi; k < d + OW; k++) cv[k] = 0;
            const src = xc + (n * H + ih) * W + owLo * sw + j - pl;
            if (sw === 1 && owHi - owLo > ROW_COPY) cv.set(xv.subarray(src, src + owHi - owLo), d + owLo);
            else for (let ow = owLo, s = src; ow < owHi; ow++, s += sw) cv[d + ow] = xv[s];
          }
        }
      }
    }
    // dy's rows of this chunk: a copy of our own (XNNPACK caches its packed b by tensor id until that tensor dies)
    const dyc = backend.makeOutput([1, rows, CO], 'float32');
    f32(backend, dyc).set(f32(backend, dy).subarray(u0 * OW * CO, u1 * OW * CO));
    const part = xnnGemm(backend, colsT, dyc);
    free(backend, colsT, dyc);
    if (acc) {
      const sum = run('Add', backend, { a: acc, b: part });
      free(backend, acc, part);
      acc = sum;
    } else {
      acc = part;
    }
  }
  free(backend, xT);
  const dw = reshape(backend, acc!, a.filterShape);
  free(backend, acc);
  if (channelsFirst) free(backend, x, dy);
  return dw;
}

/**
 * Conv2DBackpropInput as a transposed convolution by sub-pixel phases: for stride s, the input rows with
 * (h + padTop) % s == r receive only the filter taps r, r+s, ...; each of the s*s phases is a stride-1 XNNPACK Conv2D
 * of dy with that spatially flipped, in/out-swapped sub-filter (no zero-dilated dy, no wasted multiplies), and the
 * phases are interleaved into dx. Stride 1 is the single phase, which is dx itself. NCHW goes to wasm's own kernel.
 */
function conv2DBackpropInput(args: KernelArgs): Info {
  const { inputs, backend: b, attrs } = args;
  const backend = b as BackendWasm;
  const a = attrs as unknown as tf.Conv2DBackpropInputAttrs;
  const dy = input(inputs, 'dy');
  const filter = input(inputs, 'filter');
  const info = convInfo(a.inputShape, filter.shape, a);
  if (info.dataFormat !== 'channelsLast' || dy.dtype !== 'float32' || filter.dtype !== 'float32') {
    if (!originalBackpropInput) throw new Error('Conv2DBackpropInput: no wasm fallback for this case');
    return originalBackpropInput(args) as Info;
  }
  const { batchSize: N, inHeight: H, inWidth: W, inChannels: CI, outHeight: OH, outWidth: OW, outChannels: CO } = info;
  const { strideHeight: sh, strideWidth: sw, filterHeight: kh, filterWidth: kw } = info;
  const pt = info.padInfo.top;
  const pl = info.padInfo.left;
  const expect = [N, OH, OW, CO];
  if (dy.shape.some((d, i) => d !== expect[i])) {
    throw new Error(`Conv2DBackpropInput: dy shape ${dy.shape} does not match the convolution's output ${expect}`);
  }
  const dxShape = [N, H, W, CI];
  if (N * H * W * CI === 0) return backend.makeOutput(dxShape, 'float32');
  if (OH * OW * CO === 0) return zeros(backend, dxShape);
  const wT = transpose(backend, filter, [0, 1, 3, 2]); // [kh, kw, cout, cin]
  const block = CO * CI;

  /** Phase (rh, rw): its dx rows h = q*sh + rh - pt for q in [qa, qa + Q); null when no filter tap reaches it. */
  const phase = (rh: number, rw: number) => {
    const th = rh < kh ? Math.ceil((kh - rh) / sh) : 0;
    const tw = rw < kw ? Math.ceil((kw - rw) / sw) : 0;
    const qa = Math.ceil((pt - rh) / sh) | 0;
    const qaw = Math.ceil((pl - rw) / sw) | 0;
    const Q = (Math.ceil((pt + H - rh) / sh) | 0) - qa;
    const Qw = (Math.ceil((pl + W - rw) / sw) | 0) - qaw;
    if (Q <= 0 || Qw <= 0) return { qa, qaw, Q: 0, Qw: 0, out: null };
    // dy rows [lo, hi) feed output q in [qa, qa + Q) through a th-tap correlation; outside [0, OH) is zero padding
    const lo = qa - th + 1;
    const hi = qa + Q;
    const low = qaw - tw + 1;
    const hiw = qaw + Qw;
    const r0 = Math.max(0, lo);
    const r1 = Math.min(OH, hi);
    const c0 = Math.max(0, low);
    const c1 = Math.min(OW, hiw);
    if (th === 0 || tw === 0 || r1 <= r0 || c1 <= c0) return { qa, qaw, Q, Qw, out: null };
    const whole = r0 === 0 && r1 === OH && c0 === 0 && c1 === OW;
    const dyc = whole ? dy : crop4d(backend, dy, [0, r0, c0, 0], [N, r1 - r0, c1 - c0, CO]);
    const sub = backend.makeOutput([th, tw, CO, CI], 'float32');
    const sv = f32(backend, sub);
    const wv = f32(backend, wT);
    for (let k = 0; k < th; k++) {
      for (let l = 0; l < tw; l++) {
        const i = rh + sh * (th - 1 - k);
        const j = rw + sw * (tw - 1 - l);
        copy(sv, (k * tw + l) * block, wv, (i * kw + j) * block, block);
      }
    }
    const pad: Pads4 = [[0, 0], [r0 - lo, hi - r1], [c0 - low, hiw - c1], [0, 0]];
    const out = run('Conv2D', backend, { x: dyc, filter: sub }, { strides: [1, 1], pad, dataFormat: 'NHWC', dilations: [1, 1] });
    free(backend, sub);
    if (!whole) free(backend, dyc);
    return { qa, qaw, Q, Qw, out };
  };

  let dx: Info;
  if (sh === 1 && sw === 1) {
    const p = phase(0, 0); // qa = pt, Q = H: the phase is dx
    dx = p.out ?? zeros(backend, dxShape);
  } else {
    dx = backend.makeOutput(dxShape, 'float32');
    for (let rh = 0; rh < sh; rh++) {
      for (let rw = 0; rw < sw; rw++) {
        const p = phase(rh, rw);
        if (p.Q === 0) continue;
        const dv = f32(backend, dx);
        const pv = p.out ? f32(backend, p.out) : undefined;
        for (let n = 0; n < N; n++) {
          for (let q = 0; q < p.Q; q++) {
            const h = (p.qa + q) * sh + rh - pt;
            for (let qw = 0; qw < p.Qw; qw++) {
              const d = ((n * H + h) * W + (p.qaw + qw) * sw + rw - pl) * CI;
              if (pv) copy(dv, d, pv, ((n * p.Q + q) * p.Qw + qw) * CI, CI);
              else dv.fill(0, d, d + CI);
            }
          }
        }
        free(backend, p.out ?? undefined);
      }
    }
  }
  free(backend, wT);
  return dx;
}

/**
 * UnsortedSegmentSum (the gradient of gather, e.g. an embedding table) as wasm's C++ ScatterNd, which sums duplicate
 * indices; ScatterNd does not bounds-check, so ids outside [0, numSegments) (which the op drops) take a JS loop.
 */
function unsortedSegmentSum({ inputs, backend: b, attrs }: KernelArgs): Info {
  const backend = b as BackendWasm;
  const x = input(inputs, 'x');
  const segmentIds = input(inputs, 'segmentIds');
  const { numSegments } = attrs as unknown as tf.UnsortedSegmentSumAttrs;
  if (x.dtype !== 'float32' && x.dtype !== 'int32') throw new Error(`UnsortedSegmentSum on wasm: unsupported dtype ${x.dtype}`);
  if (segmentIds.dtype !== 'int32') throw new Error('UnsortedSegmentSum: segmentIds must be int32');
  const idRank = segmentIds.shape.length;
  if (segmentIds.shape.some((d, i) => d !== x.shape[i])) {
    throw new Error(`UnsortedSegmentSum: segmentIds shape ${segmentIds.shape} is not a prefix of x shape ${x.shape}`);
  }
  const rows = tf.util.sizeFromShape(segmentIds.shape);
  const inner = tf.util.sizeFromShape(x.shape.slice(idRank));
  const outShape = [numSegments, ...x.shape.slice(idRank)];
  const ids = backend.typedArrayFromHeap(segmentIds) as Int32Array;
  let inRange = true;
  for (let i = 0; i < rows; i++) {
    if (ids[i] < 0 || ids[i] >= numSegments) {
      inRange = false;
      break;
    }
  }
  if (inRange && rows > 0 && inner > 0) {
    const indices = reshape(backend, segmentIds, [rows, 1]);
    const updates = reshape(backend, x, [rows, inner]);
    const out = run('ScatterNd', backend, { indices, updates }, { shape: [numSegments, inner] });
    free(backend, indices, updates);
    const res = reshape(backend, out, outShape);
    free(backend, out);
    return res;
  }
  const out = backend.makeOutput(outShape, x.dtype);
  const ov = backend.typedArrayFromHeap(out);
  const xv = backend.typedArrayFromHeap(x);
  const iv = backend.typedArrayFromHeap(segmentIds) as Int32Array;
  ov.fill(0);
  for (let i = 0; i < rows; i++) {
    const s = iv[i];
    if (s < 0 || s >= numSegments) continue;
    for (let k = 0; k < inner; k++) ov[s * inner + k] += xv[i * inner + k];
  }
  return out;
}

/**
 * BatchMatMul routed to XNNPACK: wasm's kernel takes XNNPACK only for an untransposed, batch-1 product and runs
 * every other case (a backward pass's transposed products, attention's batched ones) in a naive loop, ~10x slower.
 * Transposed operands are transposed explicitly; a batch against a shared b is one tall GEMM; other batches are one
 * GEMM per item on copies of its slices. Broadcasts other than against a batch of one go to wasm's kernel.
 */
function batchMatMul(args: KernelArgs): Info {
  const { inputs, backend: be, attrs } = args;
  const backend = be as BackendWasm;
  const original = originalBatchMatMul;
  if (!original) throw new Error('BatchMatMul: wasm kernel missing');
  const a = input(inputs, 'a');
  const b = input(inputs, 'b');
  const { transposeA, transposeB } = attrs as unknown as tf.BatchMatMulAttrs;
  const ar = a.shape.length;
  const br = b.shape.length;
  const M = transposeA ? a.shape[ar - 1] : a.shape[ar - 2];
  const K = transposeA ? a.shape[ar - 2] : a.shape[ar - 1];
  const N = transposeB ? b.shape[br - 2] : b.shape[br - 1];
  const Kb = transposeB ? b.shape[br - 1] : b.shape[br - 2];
  const outerA = a.shape.slice(0, -2);
  const outerB = b.shape.slice(0, -2);
  const batchA = tf.util.sizeFromShape(outerA);
  const batchB = tf.util.sizeFromShape(outerB);
  const fast = !transposeA && !transposeB && batchA === 1 && batchB === 1;
  if (fast || a.dtype !== 'float32' || b.dtype !== 'float32' || K !== Kb || M * N * K === 0) return original(args) as Info;
  const outOuter = tf.broadcast_util.assertAndGetBroadcastShape(outerA, outerB);
  const batch = tf.util.sizeFromShape(outOuter);
  if (batch !== Math.max(batchA, batchB) || (batchA !== batchB && batchA !== 1 && batchB !== 1)) return original(args) as Info;
  // operands as [batch, M, K] and [batch, K, N]
  const a3 = reshape(backend, a, transposeA ? [batchA, K, M] : [batchA, M, K]);
  const b3 = reshape(backend, b, transposeB ? [batchB, N, K] : [batchB, K, N]);
  const at = transposeA ? transpose(backend, a3, [0, 2, 1]) : a3;
  const bt = transposeB ? transpose(backend, b3, [0, 2, 1]) : b3;
  // every b handed to XNNPACK is a tensor of our own (a transpose or a copy): XNNPACK caches its packed b on b's
  // tensor id, keyed without the shape, so a caller's tensor must not be left holding a cached operator
  const own = (t: Info, i: number, rows: number, cols: number) => {
    const c = backend.makeOutput([1, rows, cols], 'float32');
    f32(backend, c).set(f32(backend, t).subarray(i * rows * cols, (i + 1) * rows * cols));
    return c;
  };
  let out: Info;
  if (batchB === 1) {
    const a2 = reshape(backend, at, [1, batchA * M, K]);
    const b2 = transposeB ? reshape(backend, bt, [1, K, N]) : own(bt, 0, K, N);
    const prod = xnnGemm(backend, a2, b2);
    out = reshape(backend, prod, [...outOuter, M, N]);
    free(backend, a2, b2, prod);
  } else {
    out = backend.makeOutput([...outOuter, M, N], 'float32');
    for (let i = 0; i < batch; i++) {
      const ai = batchA === 1 ? reshape(backend, at, [1, M, K]) : own(at, i, M, K);
      const bi = own(bt, i, K, N);
      const oi = xnnGemm(backend, ai, bi);
      f32(backend, out).set(f32(backend, oi), i * M * N);
      free(backend, ai, bi, oi);
    }
  }
  free(backend, a3, b3);
  if (transposeA) free(backend, at);
  if (transposeB) free(backend, bt);
  return out;
}

type Heap = Float32Array | Int32Array | Uint8Array;

/**
 * Slice by runs copied straight from the heap. wasm's own Slice first copies its whole input out of the heap
 * (readSync) and then copies each innermost row with TypedArray.set; for the GEGLU split and attention's chunks
 * that cost more than the matrix products around them. The trailing axes that are taken whole are merged into one
 * contiguous run, and the outer axes are walked with an odometer.
 */
function slice(args: KernelArgs): Info {
  const { inputs, backend: b, attrs } = args;
  const backend = b as BackendWasm;
  const x = input(inputs, 'x');
  if (x.dtype === 'string' || x.dtype === 'complex64') return originalSlice!(args) as Info;
  const a = attrs as unknown as { begin: number | number[]; size?: number | number[] };
  const [begin, size] = tf.slice_util.parseSliceParams(x as unknown as tf.TensorInfo & { rank: number }, a.begin, a.size);
  return sliceRuns(backend, x, begin, size);
}

function sliceRuns(backend: BackendWasm, x: Info, begin: number[], size: number[]): Info {
  const out = backend.makeOutput(size, x.dtype);
  const total = size.reduce((p, v) => p * v, 1);
  if (total === 0) return out;
  const xv = backend.typedArrayFromHeap(x) as Heap; // views taken after makeOutput (an allocation may grow the heap)
  const ov = backend.typedArrayFromHeap(out) as Heap;
  const shape = x.shape;
  const r = shape.length;
  if (r === 0) {
    ov[0] = xv[0];
    return out;
  }
  const strides = tf.util.computeStrides(shape);
  const stride = (i: number) => (i === r - 1 ? 1 : strides[i]);
  // merge trailing axes taken whole: axis k is the last one that may be partial
  let k = r - 1;
  let run = size[r - 1];
  while (k > 0 && size[k] === shape[k]) run *= size[--k];
  let base = 0;
  for (let i = 0; i < r; i++) base += begin[i] * stride(i);
  const idx = new Array<number>(k).fill(0);
  let o = 0;
  for (;;) {
    let src = base;
    for (let i = 0; i < k; i++) src += idx[i] * stride(i);
    if (run < SMALL_COPY) for (let j = 0; j < run; j++) ov[o + j] = xv[src + j];
    else ov.set(xv.subarray(src, src + run), o);
    o += run;
    // odometer over the outer axes 0..k-1
    let i = k - 1;
    while (i >= 0 && ++idx[i] === size[i]) idx[i--] = 0;
    if (i < 0) break;
  }
  return out;
}

/** SplitV as consecutive fast slices along the axis (wasm's goes through its slow Slice once per part). */
function splitV({ inputs, backend: b, attrs }: KernelArgs): Info[] {
  const backend = b as BackendWasm;
  const x = input(inputs, 'x');
  const a = attrs as unknown as { numOrSizeSplits: number | number[]; axis: number | number[] };
  const axis = tf.util.parseAxisParam(a.axis, x.shape)[0];
  const sizes = tf.backend_util.prepareSplitSize(x as unknown as tf.Tensor, a.numOrSizeSplits, axis);
  const begin = new Array<number>(x.shape.length).fill(0);
  return sizes.map((n) => {
    const size = [...x.shape];
    size[axis] = n;
    const part = x.dtype === 'string' ? (originalSlice!({ inputs: { x }, backend, attrs: { begin: [...begin], size } }) as Info) : sliceRuns(backend, x, [...begin], size);
    begin[axis] += n;
    return part;
  });
}

const KERNELS: [string, tf.KernelFunc][] = [
  ['Identity', identity as tf.KernelFunc],
  ['Conv2DBackpropFilter', conv2DBackpropFilter as tf.KernelFunc],
  ['Conv2DBackpropInput', conv2DBackpropInput as tf.KernelFunc],
  ['UnsortedSegmentSum', unsortedSegmentSum as tf.KernelFunc],
  ['BatchMatMul', batchMatMul as tf.KernelFunc],
  ['Slice', slice as tf.KernelFunc],
  ['SplitV', splitV as unknown as tf.KernelFunc],
];

/**
 * Register our wasm kernels (idempotent). Call once @tensorflow/tfjs-backend-wasm is imported (its kernels are what
 * ours are built from), best once the backend is active; ours replace wasm's Identity, Conv2DBackpropInput and
 * BatchMatMul and add Conv2DBackpropFilter and UnsortedSegmentSum.
 */
export function registerWasmKernels(): void {
  if (registered) return;
  if (!tf.getKernel('Conv2D', 'wasm')) throw new Error('registerWasmKernels: the wasm backend is not loaded (import @tensorflow/tfjs-backend-wasm)');
  originalBackpropInput = tf.getKernel('Conv2DBackpropInput', 'wasm')?.kernelFunc;
  originalBatchMatMul = tf.getKernel('BatchMatMul', 'wasm')?.kernelFunc;
  originalSlice = tf.getKernel('Slice', 'wasm')?.kernelFunc;
  for (const [kernelName, kernelFunc] of KERNELS) {
    const prev = tf.getKernel(kernelName, 'wasm');
    if (prev) tf.unregisterKernel(kernelName, 'wasm');
    // keep the replaced kernel's setup: a backend initialised after this call must still bind the C++ function
    // that our fallbacks to the original kernel call
    tf.registerKernel({ kernelName, backendName: 'wasm', kernelFunc, setupFunc: prev?.setupFunc, disposeFunc: prev?.disposeFunc });
  }
  registered = true;
}
