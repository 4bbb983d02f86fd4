/**
 * Aspect-ratio buckets (kohya sd-scripts `model_util.make_bucket_resolutions` + `BucketManager.select_bucket` +
 * `trim_and_resize_if_required`) and the square no-bucket path (torchvision `Resize(size)` + `CenterCrop` /
 * `RandomCrop`, as diffusers' training scripts). Pure integer arithmetic; the only randomness is the crop offset,
 * drawn from the caller's generator.
 */
import { usageError } from '../errors.js';
import type { TorchGenerator } from '../runtime/rng.js';

export type Size = [width: number, height: number];
export interface CropBox {
  left: number;
  top: number;
  width: number;
  height: number;
}
/** Where an image goes: the training size (`bucket`) and the size it is resized to before cropping to it. */
export interface Assignment {
  bucket: Size;
  resized: Size;
  /** bucket aspect ratio minus image aspect ratio (kohya's `ar_error`) */
  error: number;
}

const isPosInt = (v: number) => Number.isInteger(v) && v > 0;

/** kohya make_bucket_resolutions(max_reso, min, max, step): sides multiples of step in [min,max], area <= w*h of max_reso, sorted. */
export function makeBuckets(resolution: number | Size, minSide = 256, maxSide = 1024, step = 64): Size[] {
  const [rw, rh] = typeof resolution === 'number' ? [resolution, resolution] : resolution;
  if (![rw, rh, minSide, maxSide, step].every(isPosInt)) {
    throw usageError(`bucket settings must be positive integers (resolution ${rw}x${rh}, min ${minSide}, max ${maxSide}, step ${step})`);
  }
  if (minSide > maxSide) throw usageError(`bucket min side ${minSide} is larger than max side ${maxSide}`);
  if (minSide % step || maxSide % step) throw usageError(`bucket min/max sides (${minSide}, ${maxSide}) must be multiples of the step ${step}`);
  const area = rw * rh;
  const seen = new Map<string, Size>();
  const add = (w: number, h: number) => seen.set(`${w}x${h}`, [w, h]);
  const side = Math.floor(Math.sqrt(area) / step) * step; // the square bucket, even when outside [min,max] (as kohya)
  if (side < step) throw usageError(`resolution ${rw}x${rh} is smaller than the bucket step ${step}`);
  add(side, side);
  for (let w = minSide; w <= maxSide; w += step) {
    const h = Math.min(maxSide, Math.floor(Math.floor(area / w) / step) * step);
    if (h >= minSide) {
      add(w, h);
      add(h, w);
    }
  }
  return [...seen.values()].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
}

/** kohya select_bucket: an exact-size bucket, else the first with the smallest |w/h - W/H|; resized to cover it (rounded). */
export function assignBucket(width: number, height: number, buckets: readonly Size[]): Assignment {
  if (!isPosInt(width) || !isPosInt(height)) throw usageError(`image size must be positive integers, got ${width}x${height}`);
  if (buckets.length === 0) throw usageError('no buckets to choose from');
  const ar = width / height;
  let bucket = buckets.find(([w, h]) => w === width && h === height);
  if (!bucket) {
    let best = Infinity;
    for (const b of buckets) {
      const e = Math.abs(b[0] / b[1] - ar);
      if (e < best) [best, bucket] = [e, b];
    }
  }
  const [bw, bh] = bucket!;
  // wider than the bucket: match heights, else match widths; kohya rounds with int(x + 0.5)
  const scale = ar > bw / bh ? bh / height : bw / width;
  const resized: Size = [Math.floor(width * scale + 0.5), Math.floor(height * scale + 0.5)];
  return { bucket: [bw, bh], resized, error: bw / bh - ar };
}

/** torchvision Resize(resolution): shorter side -> resolution, longer side int(resolution * long / short); target is square. */
export function squareAssignment(width: number, height: number, resolution: number): Assignment {
  if (!isPosInt(width) || !isPosInt(height)) throw usageError(`image size must be positive integers, got ${width}x${height}`);
  if (!isPosInt(resolution)) throw usageError(`resolution must be a positive integer, got ${resolution}`);
  const resized: Size = width <= height
    ? [resolution, Math.trunc((resolution * height) / width)]
    : [Math.trunc((resolution * width) / height), resolution];
  return { bucket: [resolution, resolution], resized, error: 1 - width / height };
}

/** Python round() of n/2 (half to even), torchvision CenterCrop's offset rounding. */
const halfEven = (n: number) => (n % 2 === 0 ? n / 2 : ((n - 1) / 2) % 2 === 0 ? (n - 1) / 2 : (n + 1) / 2);

/**
 * The target-size box inside the resized image. Center: kohya `trim // 2` (`rounding: 'floor'`) or torchvision's
 * `round(trim / 2)` (`'half-even'`). Random (a generator given): top then left, each `randint(0, trim + 1)`, drawn only
 * when that side has slack (kohya `random.randint(0, trim)`, torchvision RandomCrop's inclusive range).
 */
export function cropBox(resized: Size, target: Size, gen?: TorchGenerator, rounding: 'floor' | 'half-even' = 'floor'): CropBox {
  const [rw, rh] = resized;
  const [tw, th] = target;
  if (rw < tw || rh < th) throw usageError(`cannot crop ${tw}x${th} out of a ${rw}x${rh} image`);
  const offset = (slack: number) =>
    slack === 0 ? 0 : gen ? gen.randint(0, slack + 1, [1])[0]! : rounding === 'floor' ? Math.floor(slack / 2) : halfEven(slack);
  const top = offset(rh - th);
  const left = offset(rw - tw);
  return { left, top, width: tw, height: th };
}
