/**
 * Latent and text-embedding caches. `LatentCache` stores the VAE's latent distribution (mean, std; NHWC float32) per
 * (image content hash, resized size, crop box, flip), so every crop/flip variant has its own entry, in memory and
 * optionally as one safetensors file per image (`<hash>.safetensors`, tensors `<variant>.mean|std`, atomic writes,
 * read lazily). Caching the distribution rather than one sample keeps diffusers' statistics (it encodes and samples
 * `latent_dist.sample()` every step) without re-encoding: `sampleLatents` draws a fresh sample per step. kohya's
 * `cache_latents` instead stores a single sample for the whole run. The encoder is the caller's callback (the VAE),
 * so this module does not depend on the models.
 */
import * as tf from '@tensorflow/tfjs';
import path from 'node:path';
import { fmtShape, formatError } from '../errors.js';
import { SafetensorsFile, writeSafetensors, type WritableTensor } from '../io/safetensors.js';
import { randnNHWC, type TorchGenerator } from '../runtime/rng.js';
import type { CropBox, Size } from './buckets.js';

/** A diagonal Gaussian over latents (diffusers DiagonalGaussianDistribution's mean and std), NHWC. */
export interface LatentDist {
  mean: tf.Tensor4D;
  std: tf.Tensor4D;
}
/** The VAE encoder: pixels [1,H,W,3] in [-1,1] -> latent mean and std [1,h,w,c]. Synchronous tf ops (run in a tidy). */
export type LatentEncoder = (pixels: tf.Tensor4D) => LatentDist;
/** What identifies one cached latent: the image content and exactly how it was resized, cropped and flipped. */
export interface LatentKey {
  hash: string;
  resized: Size;
  crop: CropBox;
  flip: boolean;
}
export interface LatentCacheOptions {
  /** persist entries under this folder (one safetensors file per image); memory only when absent */
  dir?: string;
  /** names the encoder (e.g. the VAE's hash); files written with another id are ignored and rewritten */
  encoderId?: string;
}

const FORMAT = 'sdtune-latent-cache/1';

/** The variant part of a key, also its tensor-name prefix in the per-image file. */
export const variantName = (k: LatentKey) =>
  `${k.resized[0]}x${k.resized[1]}+${k.crop.left},${k.crop.top},${k.crop.width}x${k.crop.height}${k.flip ? '+flip' : ''}`;

/** latents = (mean + std * randn) * scalingFactor (diffusers `latent_dist.sample() * scaling_factor`), noise drawn NCHW like torch. */
export function sampleLatents(dist: LatentDist, gen: TorchGenerator, scalingFactor: number): tf.Tensor4D {
  const [n, h, w, c] = dist.mean.shape;
  return tf.tidy(() => dist.mean.add(dist.std.mul(randnNHWC(gen, [n, c, h, w]))).mul(scalingFactor) as tf.Tensor4D);
}

/** Memory (+ optional disk) cache of latent distributions; `get` returns cache-owned tensors, freed by `dispose()`. */
export class LatentCache {
  private readonly mem = new Map<string, LatentDist>(); // `${hash}/${variant}` -> kept tensors
  private readonly onDisk = new Map<string, Promise<Set<string>>>(); // hash -> variants in its file (read lazily)
  private readonly pending = new Map<string, Promise<LatentDist>>();
  private readonly writes = new Map<string, Promise<void>>(); // per-hash write chain
  hits = 0;
  diskHits = 0;
  misses = 0;

  constructor(private readonly encode: LatentEncoder, private readonly opts: LatentCacheOptions = {}) {}

  /** Number of entries held in memory. */
  get size(): number {
    return this.mem.size;
  }

  /** The cached distribution for `key`, else read from disk, else `load()` the pixels and encode them (and persist). */
  async get(key: LatentKey, load: () => Promise<tf.Tensor4D>): Promise<LatentDist> {
    const id = `${key.hash}/${variantName(key)}`;
    const have = this.mem.get(id);
    if (have) {
      this.hits++;
      return have;
    }
    let p = this.pending.get(id);
    if (!p) {
      p = this.fill(key, load).finally(() => this.pending.delete(id));
      this.pending.set(id, p);
    }
    return p;
  }

  private async fill(key: LatentKey, load: () => Promise<tf.Tensor4D>): Promise<LatentDist> {
    const variant = variantName(key);
    const id = `${key.hash}/${variant}`;
    if (this.opts.dir && (await this.diskVariants(key.hash)).has(variant)) {
      const dist = await this.readVariant(key.hash, variant);
      this.diskHits++;
      this.mem.set(id, dist);
      return dist;
    }
    const pixels = await load();
    let dist: LatentDist;
    try {
      dist = tf.tidy(() => {
        const out = this.encode(pixels);
        checkDist(out, key);
        return { mean: out.mean.clone(), std: out.std.clone() }; // clones: the encoder may hand back its own long-lived tensors
      });
    } finally {
      pixels.dispose();
    }
    tf.keep(dist.mean);
    tf.keep(dist.std);
    this.misses++;
    this.mem.set(id, dist);
    if (this.opts.dir) await this.persist(key.hash);
    return dist;
  }

  private file(hash: string): string {
    return path.join(this.opts.dir!, `${hash}.safetensors`);
  }

  /** Variants stored in the image's file (empty when absent, unreadable or from another encoder). */
  private diskVariants(hash: string): Promise<Set<string>> {
    let p = this.onDisk.get(hash);
    if (!p) {
      p = SafetensorsFile.open(this.file(hash)).then(
        async (f) => {
          await f.close();
          const ok = f.metadata.format === FORMAT && f.metadata.encoder === (this.opts.encoderId ?? '');
          return new Set(ok ? f.keys().filter((k) => k.endsWith('.mean')).map((k) => k.slice(0, -5)) : []);
        },
        () => new Set<string>(),
      );
      this.onDisk.set(hash, p);
    }
    return p;
  }

  private async readVariant(hash: string, variant: string): Promise<LatentDist> {
    const f = await SafetensorsFile.open(this.file(hash));
    try {
      const [m, s] = [await f.read(`${variant}.mean`), await f.read(`${variant}.std`)];
      const t = (r: typeof m) => tf.keep(tf.tensor4d(r.data as Float32Array, r.shape as [number, number, number, number]));
      return { mean: t(m), std: t(s) };
    } finally {
      await f.close();
    }
  }

  /** Rewrite the image's file with every variant known for it (memory + disk), one write at a time per image. */
  private persist(hash: string): Promise<void> {
    const run = async () => {
      const disk = await this.diskVariants(hash);
      const tensors = new Map<string, WritableTensor>();
      const old = [...disk].filter((v) => !this.mem.has(`${hash}/${v}`));
      if (old.length > 0) {
        const f = await SafetensorsFile.open(this.file(hash));
        try {
          for (const v of old) for (const part of ['mean', 'std']) tensors.set(`${v}.${part}`, await f.read(`${v}.${part}`) as WritableTensor);
        } finally {
          await f.close();
        }
      }
      for (const [id, d] of this.mem) {
        if (!id.startsWith(`${hash}/`)) continue;
        const v = id.slice(hash.length + 1);
        tensors.set(`${v}.mean`, { shape: d.mean.shape, data: (await d.mean.data()) as Float32Array });
        tensors.set(`${v}.std`, { shape: d.std.shape, data: (await d.std.data()) as Float32Array });
      }
      await writeSafetensors(this.file(hash), tensors, { metadata: { format: FORMAT, encoder: this.opts.encoderId ?? '', hash } });
      this.onDisk.set(hash, Promise.resolve(new Set([...tensors.keys()].filter((k) => k.endsWith('.mean')).map((k) => k.slice(0, -5)))));
    };
    const next = (this.writes.get(hash) ?? Promise.resolve()).then(run);
    this.writes.set(hash, next.catch(() => {}));
    return next;
  }

  /** Free every cached tensor (files on disk stay). */
  dispose(): void {
    for (const d of this.mem.values()) {
      d.mean.dispose();
      d.std.dispose();
    }
    this.mem.clear();
    this.onDisk.clear();
  }
}

function checkDist(d: LatentDist, key: LatentKey): void {
  const ok = d && d.mean?.rank === 4 && d.std?.rank === 4 && d.mean.shape[0] === 1 && d.mean.shape.every((s, i) => s === d.std.shape[i]);
  if (!ok) throw formatError(`latent encoder returned mean ${fmtShape(d?.mean?.shape ?? [])} / std ${fmtShape(d?.std?.shape ?? [])} for ${key.hash.slice(0, 12)}; expected equal [1,h,w,c]`);
}

/** Caption -> text-encoder output, encoded once per distinct caption; tensors are cache-owned until `dispose()`. */
export class TextCache {
  private readonly mem = new Map<string, tf.Tensor>();
  hits = 0;
  misses = 0;

  constructor(private readonly encode: (caption: string) => tf.Tensor) {}

  /** Number of cached captions. */
  get size(): number {
    return this.mem.size;
  }

  /** The embedding of `caption` (encoded in a tidy on first use). */
  get(caption: string): tf.Tensor {
    const have = this.mem.get(caption);
    if (have) {
      this.hits++;
      return have;
    }
    const t = tf.keep(tf.tidy(() => this.encode(caption).clone()));
    this.misses++;
    this.mem.set(caption, t);
    return t;
  }

  /** Free every cached tensor. */
  dispose(): void {
    for (const t of this.mem.values()) t.dispose();
    this.mem.clear();
  }
}
