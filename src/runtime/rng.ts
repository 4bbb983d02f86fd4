/**
 * PyTorch's CPU random generator, bit-exact (spec: shared/spec/torch-rng.md): mt19937 (`CPUGeneratorImpl`),
 * `torch.rand`/`randint` (`uniform_real_distribution`, `uniform_int_from_to_distribution`) and `torch.randn`
 * (`normal_kernel`: the double Box-Muller with a cached normal for n < 16, the 16-wide AVX2 `normal_fill` with
 * Cephes log/sincos for n >= 16), so `--seed N` reproduces `torch.manual_seed(N); torch.randn(shape)`.
 */
import * as tf from '@tensorflow/tfjs';
import { usageError, fmtShape } from '../errors.js';

const N = 624;
const f32 = Math.fround;

/** JSON-friendly generator state: the uint64 seed (decimal), the mt19937 words, the draw position, the cached normal. */
export interface GeneratorState {
  seed: string;
  mt: number[];
  left: number;
  next: number;
  /** torch's `next_double_normal_sample` (the second value of the scalar path's Box-Muller pair), or null */
  normal: number | null;
}

/** PyTorch CPU generator (`at::CPUGeneratorImpl`: mt19937 + torch's uniform/normal/randint algorithms). */
export class TorchGenerator {
  private readonly mt = new Uint32Array(N);
  private left = 1;
  private next = 0;
  private seed = 0n;
  private normal: number | null = null;

  constructor(seed: number | bigint = 67280421310721n) {
    this.manualSeed(seed); // default = torch's default_rng_seed_val
  }

  /** `Generator.manual_seed`: uint64 seed (negatives wrap as two's complement); mt19937 uses its low 32 bits. */
  manualSeed(seed: number | bigint): this {
    if (typeof seed === 'number' && !Number.isInteger(seed)) throw usageError(`seed must be an integer, got ${seed}`);
    const s = BigInt(seed);
    if (s < -(1n << 63n) || s >= 1n << 64n) throw usageError(`seed ${s} is outside [-2^63, 2^64)`);
    this.seed = BigInt.asUintN(64, s);
    const mt = this.mt;
    mt[0] = Number(this.seed & 0xffffffffn);
    for (let j = 1; j < N; j++) mt[j] = Math.imul(1812433253, mt[j - 1] ^ (mt[j - 1] >>> 30)) + j;
    this.left = 1;
    this.next = 0;
    this.normal = null;
    return this;
  }

  /** `Generator.initial_seed()` as a uint64. */
  initialSeed(): bigint {
    return this.seed;
  }

  /** `CPUGeneratorImpl::random()`: the next tempered mt19937 word (uint32). */
  nextU32(): number {
    if (--this.left === 0) this.twist();
    let y = this.mt[this.next++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  private twist(): void {
    const mt = this.mt;
    for (let i = 0; i < N; i++) {
      const a = mt[(i + 1) % N];
      mt[i] = mt[(i + 397) % N] ^ (((mt[i] & 0x80000000) | (a & 0x7fffffff)) >>> 1) ^ (a & 1 ? 0x9908b0df : 0);
    }
    this.left = N;
    this.next = 0;
  }

  /** `uniform_real_distribution<double>(0,1)`: 53 bits of `random64()` (first word high). */
  private uniformDouble(): number {
    const hi = this.nextU32() & 0x1fffff;
    return (hi * 4294967296 + this.nextU32()) * 2 ** -53;
  }

  /** `normal_distribution<double>(0,1)`: Box-Muller; the sin half is cached in the generator. */
  private normalDouble(): number {
    if (this.normal !== null) {
      const v = this.normal;
      this.normal = null;
      return v;
    }
    const u1 = this.uniformDouble();
    const u2 = this.uniformDouble();
    const r = Math.sqrt(-2 * Math.log1p(-u2));
    const theta = 2 * Math.PI * u1;
    this.normal = r * Math.sin(theta);
    return r * Math.cos(theta);
  }

  /** `torch.randn(shape)` float32 row-major: `normal_kernel` (scalar double path n < 16, `normal_fill` AVX2 n >= 16). */
  randn(shape: readonly number[]): Float32Array {
    const n = numel(shape);
    const out = new Float32Array(n);
    if (n < 16) {
      for (let i = 0; i < n; i++) out[i] = this.normalDouble();
      return out;
    }
    for (let i = 0; i < n; i++) out[i] = (this.nextU32() & 0xffffff) * 2 ** -24;
    for (let i = 0; i + 16 <= n; i += 16) fill16(out, i);
    if (n % 16) {
      // tail: torch redraws 16 fresh uniforms over the last 16 slots and transforms them as one block
      for (let i = n - 16; i < n; i++) out[i] = (this.nextU32() & 0xffffff) * 2 ** -24;
      fill16(out, n - 16);
    }
    return out;
  }

  /** `torch.rand(shape)` float32 in [0,1): `uniform_real_distribution<float>`, 24 bits of one word each. */
  rand(shape: readonly number[]): Float32Array {
    const out = new Float32Array(numel(shape));
    for (let i = 0; i < out.length; i++) out[i] = (this.nextU32() & 0xffffff) * 2 ** -24;
    return out;
  }

  /** `torch.randint(low, high, shape)` (int64): `uniform_int_from_to_distribution` = `low + random() % range` (range < 2^32). */
  randint(low: number, high: number, shape: readonly number[]): Int32Array {
    if (!Number.isInteger(low) || !Number.isInteger(high) || low >= high || low < -(2 ** 31) || high > 2 ** 31) {
      throw usageError(`randint needs integers -2^31 <= low < high <= 2^31, got [${low}, ${high})`);
    }
    const range = high - low;
    const out = new Int32Array(numel(shape));
    if (range < 2 ** 32) for (let i = 0; i < out.length; i++) out[i] = low + (this.nextU32() % range);
    else for (let i = 0; i < out.length; i++) out[i] = (this.nextU32(), low + this.nextU32()); // int64 range 2^32: random64() % 2^32 = low word
    return out;
  }

  /** Snapshot for training resume (`Generator.get_state` equivalent, JSON-friendly, not torch's byte layout). */
  getState(): GeneratorState {
    return { seed: this.seed.toString(), mt: Array.from(this.mt), left: this.left, next: this.next, normal: this.normal };
  }

  /** Restore a `getState()` snapshot; the sequence continues exactly. */
  setState(s: GeneratorState): void {
    const ok =
      s && Array.isArray(s.mt) && s.mt.length === N && s.mt.every((w) => Number.isInteger(w) && w >= 0 && w < 2 ** 32) &&
      Number.isInteger(s.left) && s.left >= 1 && s.left <= N && Number.isInteger(s.next) && s.next >= 0 && s.next + s.left <= N + 1 &&
      (s.normal === null || typeof s.normal === 'number') && /^\d+$/.test(String(s.seed));
    if (!ok) throw usageError('invalid generator state');
    this.mt.set(s.mt);
    this.left = s.left;
    this.next = s.next;
    this.normal = s.normal;
    this.seed = BigInt.asUintN(64, BigInt(s.seed));
  }
}

function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw usageError(`invalid shape ${fmtShape(shape)}`);
    n *= d;
  }
  return n;
}

// ---- the AVX2 normal_fill_16 kernel (avx_mathfun.h log256_ps / sincos256_ps), float32, spec §5.1 ----

const fbuf = new Float32Array(1);
const ubuf = new Uint32Array(fbuf.buffer);

/**
 * fmaf(a, b, c) for float32 operands with a single rounding: a*b is exact in float64; a*b + c rounded to float64 and
 * then to float32 can double-round only when the float64 sum lands exactly on a float32 midpoint, which is detected
 * and resolved with the exact TwoSum error.
 */
export function fmaf(a: number, b: number, c: number): number {
  const p = a * b;
  const s = p + c;
  const r = f32(s);
  if (r === s) return r;
  const d = s - r;
  const other = s + d; // the neighbouring float32 iff s is a midpoint
  if (f32(other) !== other) return r;
  const bb = s - p;
  const err = p - (s - bb) + (c - bb);
  return err === 0 || err > 0 !== d > 0 ? r : other;
}

const SQRTHF = f32(0.707106781186547524);
const P = [
  7.0376836292e-2, -1.151461031e-1, 1.167699874e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
  2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
].map(f32);
const [P0, P1, P2, P3, P4, P5, P6, P7, P8] = P as [number, number, number, number, number, number, number, number, number];
const Q1 = f32(-2.12194440e-4);
const Q2 = f32(0.693359375);

/** avx_mathfun `log256_ps` for x in (0, 1], with the fusions of torch's x86 build. */
function log256(x: number): number {
  fbuf[0] = x;
  const bits = ubuf[0];
  let e = f32((bits >>> 23) - 127) + 1;
  ubuf[0] = (bits & 0x807fffff) | 0x3f000000;
  const m = fbuf[0];
  if (m < SQRTHF) {
    e -= 1;
    x = f32(f32(m - 1) + m);
  } else x = f32(m - 1);
  const z = f32(x * x);
  let y = P0;
  y = fmaf(y, x, P1); y = fmaf(y, x, P2); y = fmaf(y, x, P3); y = fmaf(y, x, P4);
  y = fmaf(y, x, P5); y = fmaf(y, x, P6); y = fmaf(y, x, P7); y = fmaf(y, x, P8);
  y = f32(y * x);
  y = fmaf(y, z, f32(e * Q1));
  y = fmaf(z, -0.5, y);
  x = f32(x + y);
  return fmaf(e, Q2, x);
}

const FOPI = f32(1.27323954473516);
const DP1 = -0.78515625, DP2 = f32(-2.4187564849853515625e-4), DP3 = f32(-3.77489497744594108e-8);
const C0 = f32(2.443315711809948e-5), C1 = f32(-1.388731625493765e-3), C2 = f32(4.166664568298827e-2);
const S0 = f32(-1.9515295891e-4), S1 = f32(8.3321608736e-3), S2 = f32(-1.6666654611e-1);
const TWO_PI_F = f32(2 * Math.PI);

/** torch `normal_fill_16_AVX2` on data[base..base+15] (8 lanes: radius from lane j, angle from lane j+8). */
function fill16(data: Float32Array, base: number): void {
  for (let j = base; j < base + 8; j++) {
    const radius = f32(Math.sqrt(f32(-2 * log256(f32(1 - data[j])))));
    let x = f32(TWO_PI_F * data[j + 8]); // theta in [0, 2π): sincos256_ps for x >= 0
    let k = Math.trunc(f32(x * FOPI));
    k = (k + 1) & ~1;
    x = fmaf(k, DP1, x); x = fmaf(k, DP2, x); x = fmaf(k, DP3, x);
    const z = f32(x * x);
    let yc = fmaf(fmaf(C0, z, C1), z, C2);
    yc = f32(yc * z);
    yc = f32(fmaf(yc, z, -f32(z * 0.5)) + 1);
    let ys = fmaf(fmaf(S0, z, S1), z, S2);
    ys = fmaf(f32(ys * z), x, x);
    let sin = k & 2 ? yc : ys;
    let cos = k & 2 ? ys : yc;
    if (k & 4) sin = -sin;
    if (((k - 2) & 4) === 0) cos = -cos;
    data[j] = radius * cos; // Float32Array store rounds once: f32(radius * cos) (·std + mean is exact for 1, 0)
    data[j + 8] = radius * sin;
  }
}

// ---- helpers ----

/** `torch.randn` of an NCHW shape (torch's draw order) returned channels-last as a tf NHWC tensor. */
export function randnNHWC(gen: TorchGenerator, nchwShape: [number, number, number, number]): tf.Tensor4D {
  const [n, c, h, w] = nchwShape;
  const src = gen.randn(nchwShape);
  const dst = new Float32Array(src.length);
  const hw = h * w;
  for (let b = 0; b < n; b++) {
    const o = b * c * hw;
    for (let ch = 0; ch < c; ch++) {
      const s = o + ch * hw;
      for (let p = 0; p < hw; p++) dst[o + p * c + ch] = src[s + p];
    }
  }
  return tf.tensor4d(dst, [n, h, w, c]);
}

/** A1111 batch convention (`modules/rng.py`): image i gets its own generator seeded seed + i. */
export function batchGenerators(seed: number, batch: number): TorchGenerator[] {
  return Array.from({ length: batch }, (_, i) => new TorchGenerator(BigInt(seed) + BigInt(i)));
}

/** A fresh uint32 seed from crypto, for `--seed -1` (as A1111 picks a random seed). */
export function randomSeed(): number {
  return globalThis.crypto.getRandomValues(new Uint32Array(1))[0];
}
