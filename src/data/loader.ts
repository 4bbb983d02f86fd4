/**
 * The epoch iterator, grouped by bucket as kohya's BucketManager: each epoch every item appears `repeats` times,
 * each bucket's samples are shuffled and cut into batches (the last one of a bucket may be short), and the batch
 * order is shuffled. steps per epoch = Σ over buckets ceil(samples / batchSize). Randomness comes from the loader's
 * own TorchGenerator: at each epoch start it draws a seed for that epoch's order; crops, flips and caption ops draw
 * from it per sample, synchronously and in batch order, so a run is reproducible from the seed and resumable from
 * `getState()` (epoch, position, the epoch's order seed, generator state) regardless of image-loading timing.
 */
import { createHash } from 'node:crypto';
import * as tf from '@tensorflow/tfjs';
import { usageError } from '../errors.js';
import { TorchGenerator, type GeneratorState } from '../runtime/rng.js';
import { assignBucket, cropBox, squareAssignment, type Assignment, type Size } from './buckets.js';
import type { LatentCache, LatentDist } from './cache.js';
import type { DataItem } from './dataset.js';
import { drawFlip, loadPixels, processCaption, shuffleInPlace as shuffle, stackPixels, type CaptionOptions } from './transforms.js';

export interface LoaderOptions {
  batchSize: number;
  /** training size without buckets: a square side (torchvision Resize + crop) or [width, height] (kohya cover + crop) */
  resolution: number | Size;
  /** aspect buckets from makeBuckets; absent: every image is resized and cropped to resolution x resolution */
  buckets?: readonly Size[];
  /** random instead of center crop */
  randomCrop?: boolean;
  /** random horizontal flip with p = 0.5 (kohya flip_aug, diffusers --random_flip) */
  flip?: boolean;
  caption?: CaptionOptions;
  seed: number | bigint;
  /** when given, batches carry latent distributions from this cache instead of pixels */
  latentCache?: LatentCache;
}
/** One batch; its tensors belong to the caller (dispose them after the step). */
export interface Batch {
  items: DataItem[];
  captions: string[];
  /** [B,H,W,3] in [-1,1], when no latent cache is used */
  pixels?: tf.Tensor4D;
  /** [B,h,w,c] latent mean and std from the cache (sample with cache.sampleLatents each step) */
  latents?: LatentDist;
  /** [width, height] of every image in the batch */
  bucket: Size;
  epoch: number;
  /** batch index within the epoch */
  position: number;
}
/** JSON-friendly loader state for checkpoints. */
export interface LoaderState {
  epoch: number;
  /** batches already yielded in `epoch` */
  position: number;
  /** seed of this epoch's order (drawn from the generator at the epoch start) */
  epochSeed: number;
  generator: GeneratorState;
  /** identifies the dataset, bucket assignment and batch size the state belongs to */
  fingerprint: string;
}
export interface BucketSummary {
  bucket: Size;
  images: number;
  samples: number;
  batches: number;
}

/** Deterministic bucket-grouped batches over a scanned dataset, epoch after epoch. */
export class DataLoader {
  readonly stepsPerEpoch: number;
  readonly fingerprint: string;
  private readonly assignments: Assignment[];
  private readonly torchvision: boolean;
  private readonly groups: { bucket: Size; samples: number[] }[]; // item indices, repeats applied, in bucket order
  private readonly gen: TorchGenerator;
  private epochSeed = 0;
  private order: number[][] = [];
  private _epoch = 0;
  private _position = 0;

  constructor(private readonly items: readonly DataItem[], private readonly opts: LoaderOptions) {
    if (!Number.isInteger(opts.batchSize) || opts.batchSize < 1) throw usageError(`batch size must be a positive integer, got ${opts.batchSize}`);
    if (items.length === 0) throw usageError('the data loader needs at least one image');
    const [rw, rh] = typeof opts.resolution === 'number' ? [opts.resolution, opts.resolution] : opts.resolution;
    this.torchvision = !opts.buckets && rw === rh; // diffusers' square path; otherwise kohya's resize-to-cover
    this.assignments = items.map((it) =>
      this.torchvision ? squareAssignment(it.width, it.height, rw) : assignBucket(it.width, it.height, opts.buckets ?? [[rw, rh]]));
    const byBucket = new Map<string, { bucket: Size; samples: number[] }>();
    items.forEach((it, i) => {
      const b = this.assignments[i]!.bucket;
      const key = `${b[0]}x${b[1]}`;
      if (!byBucket.has(key)) byBucket.set(key, { bucket: b, samples: [] });
      for (let r = 0; r < it.repeats; r++) byBucket.get(key)!.samples.push(i);
    });
    this.groups = [...byBucket.values()].sort((a, b) => a.bucket[0] - b.bucket[0] || a.bucket[1] - b.bucket[1]);
    this.stepsPerEpoch = this.groups.reduce((n, g) => n + Math.ceil(g.samples.length / opts.batchSize), 0);
    const id = JSON.stringify([opts.batchSize, items.map((it, i) => [it.hash, it.repeats, this.assignments[i]!.bucket])]);
    this.fingerprint = createHash('sha256').update(id).digest('hex').slice(0, 16);
    this.gen = new TorchGenerator(opts.seed);
    this.startEpoch(0);
  }

  /** Continue a run from `getState()`: the remaining batches are exactly those the original loader would have yielded. */
  static fromState(items: readonly DataItem[], opts: LoaderOptions, state: LoaderState): DataLoader {
    const l = new DataLoader(items, opts);
    if (state.fingerprint !== l.fingerprint) {
      throw usageError(`cannot resume the data loader: the dataset, its buckets or the batch size changed since the checkpoint (${state.fingerprint} vs ${l.fingerprint})`);
    }
    const int = (v: number, hi: number) => Number.isInteger(v) && v >= 0 && v < hi;
    if (!int(state.position, l.stepsPerEpoch) || !int(state.epoch, 2 ** 53) || !int(state.epochSeed, 2 ** 32)) {
      throw usageError(`invalid data loader state (epoch ${state.epoch}, position ${state.position} of ${l.stepsPerEpoch})`);
    }
    l.gen.setState(state.generator);
    l._epoch = state.epoch;
    l._position = state.position;
    l.epochSeed = state.epochSeed;
    l.order = l.planEpoch(state.epochSeed);
    return l;
  }

  /** Current epoch (0-based). */
  get epoch(): number {
    return this._epoch;
  }
  /** Batches already yielded in the current epoch. */
  get position(): number {
    return this._position;
  }

  /** Snapshot for a checkpoint, valid between `next()` calls. */
  getState(): LoaderState {
    return { epoch: this._epoch, position: this._position, epochSeed: this.epochSeed, generator: this.gen.getState(), fingerprint: this.fingerprint };
  }

  /** Per bucket: distinct images, samples with repeats, batches per epoch (their sum is stepsPerEpoch). */
  bucketSummary(): BucketSummary[] {
    return this.groups.map((g) => ({
      bucket: g.bucket,
      images: new Set(g.samples).size,
      samples: g.samples.length,
      batches: Math.ceil(g.samples.length / this.opts.batchSize),
    }));
  }

  /** One line: how the steps per epoch are computed. */
  describe(): string {
    const parts = this.bucketSummary().map((s) => `${s.bucket[0]}x${s.bucket[1]}: ${s.images} images, ${s.samples} with repeats -> ${s.batches} batches`);
    return `${this.stepsPerEpoch} steps per epoch = Σ ceil(samples / batch ${this.opts.batchSize}) over ${parts.length} bucket(s) [${parts.join('; ')}]`;
  }

  /** The next batch (rolling into the next epoch after the last one). */
  async next(): Promise<Batch> {
    const epoch = this._epoch, position = this._position;
    const indices = this.order[position]!;
    const bucket = this.assignments[indices[0]!]!.bucket;
    // every random draw happens here, synchronously, before any I/O
    const plans = indices.map((i) => {
      const a = this.assignments[i]!;
      const crop = cropBox(a.resized, a.bucket, this.opts.randomCrop ? this.gen : undefined, this.torchvision ? 'half-even' : 'floor');
      const flip = this.opts.flip ? drawFlip(this.gen) : false;
      const caption = processCaption(this.items[i]!.caption, this.opts.caption ?? {}, this.gen);
      return { item: this.items[i]!, resized: a.resized, crop, flip, caption };
    });
    if (++this._position === this.stepsPerEpoch) this.startEpoch(epoch + 1);

    const batch: Batch = { items: plans.map((p) => p.item), captions: plans.map((p) => p.caption), bucket, epoch, position };
    const cache = this.opts.latentCache;
    if (cache) {
      const dists = await Promise.all(plans.map((p) =>
        cache.get({ hash: p.item.hash, resized: p.resized, crop: p.crop, flip: p.flip },
          async () => stackPixels([await loadPixels(p.item.path, p.resized, p.crop, p.flip)], bucket[0], bucket[1])),
      ));
      batch.latents = tf.tidy(() => ({ mean: tf.concat(dists.map((d) => d.mean)) as tf.Tensor4D, std: tf.concat(dists.map((d) => d.std)) as tf.Tensor4D }));
    } else {
      const images = await Promise.all(plans.map((p) => loadPixels(p.item.path, p.resized, p.crop, p.flip)));
      batch.pixels = stackPixels(images, bucket[0], bucket[1]);
    }
    return batch;
  }

  /** Draw the epoch's order seed and lay out its batches. */
  private startEpoch(epoch: number): void {
    this._epoch = epoch;
    this._position = 0;
    this.epochSeed = this.gen.nextU32();
    this.order = this.planEpoch(this.epochSeed);
  }

  /** kohya BucketManager.shuffle + shuffled bucket batch indices: shuffle each bucket, cut into batches, shuffle the batches. */
  private planEpoch(seed: number): number[][] {
    const g = new TorchGenerator(seed);
    const batches: number[][] = [];
    for (const { samples } of this.groups) {
      const s = shuffle([...samples], g);
      for (let i = 0; i < s.length; i += this.opts.batchSize) batches.push(s.slice(i, i + this.opts.batchSize));
    }
    return shuffle(batches, g);
  }
}

/** Free a batch's tensors. */
export function disposeBatch(b: Batch): void {
  b.pixels?.dispose();
  b.latents?.mean.dispose();
  b.latents?.std.dispose();
}
