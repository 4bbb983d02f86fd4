/**
 * Image and caption transforms of the training scripts. Images: resize -> crop -> horizontal flip -> float in [-1, 1]
 * NHWC, the order of diffusers' `Resize, CenterCrop|RandomCrop, RandomHorizontalFlip, ToTensor, Normalize([0.5],[0.5])`
 * and of kohya's `trim_and_resize_if_required` + `flip_aug`. Resizing is bilinear (libvips `linear`, antialiased when
 * shrinking like PIL's BILINEAR), the default of diffusers' training scripts; kohya uses cv2 INTER_AREA / PIL LANCZOS,
 * so pixels can differ from kohya's by a few levels. Captions: kohya `caption_dropout_rate`, `shuffle_caption` +
 * `keep_tokens`. Every random choice comes from the caller's TorchGenerator.
 */
import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { SdtuneError, usageError } from '../errors.js';
import type { TorchGenerator } from '../runtime/rng.js';
import type { CropBox, Size } from './buckets.js';

/** uint8 -> float32 exactly as torchvision ToTensor (x / 255) then Normalize(0.5, 0.5) ((x - 0.5) / 0.5). */
const TO_FLOAT = Float32Array.from({ length: 256 }, (_, v) => (Math.fround(Math.fround(v / 255) - 0.5) / 0.5));

/** Load an image (EXIF orientation applied, alpha dropped), resize to `resized`, crop `box`, optionally mirror: HWC in [-1, 1]. */
export async function loadPixels(file: string, resized: Size, box: CropBox, flip: boolean): Promise<Float32Array> {
  let rgb: Buffer;
  try {
    rgb = await sharp(file)
      .autoOrient()
      .toColourspace('srgb')
      .removeAlpha()
      .resize(resized[0], resized[1], { fit: 'fill', kernel: 'linear' })
      .extract(box) // after resize: sharp crops the resized image
      .raw({ depth: 'uchar' })
      .toBuffer();
  } catch (e) {
    throw new SdtuneError('file', `cannot read image ${file}: ${(e as Error).message}`);
  }
  const { width: w, height: h } = box;
  if (rgb.length !== w * h * 3) throw new SdtuneError('file', `image ${file}: decoded ${rgb.length} bytes, expected ${w}x${h}x3`);
  const out = new Float32Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const src = (y * w + (flip ? w - 1 - x : x)) * 3;
      const dst = (y * w + x) * 3;
      out[dst] = TO_FLOAT[rgb[src]!]!;
      out[dst + 1] = TO_FLOAT[rgb[src + 1]!]!;
      out[dst + 2] = TO_FLOAT[rgb[src + 2]!]!;
    }
  }
  return out;
}

/** Stack equally sized HWC images into one NHWC tensor (the caller owns it). */
export function stackPixels(images: readonly Float32Array[], width: number, height: number): tf.Tensor4D {
  const n = width * height * 3;
  const data = new Float32Array(images.length * n);
  images.forEach((img, i) => {
    if (img.length !== n) throw usageError(`image ${i} has ${img.length} values, expected ${width}x${height}x3`);
    data.set(img, i * n);
  });
  return tf.tensor4d(data, [images.length, height, width, 3]);
}

/** torchvision RandomHorizontalFlip: flip when `rand() < p` (one draw; none when p is 0 or 1). */
export function drawFlip(gen: TorchGenerator, p = 0.5): boolean {
  if (p <= 0) return false;
  if (p >= 1) return true;
  return gen.rand([1])[0]! < p;
}

export interface CaptionOptions {
  /** kohya caption_dropout_rate: probability of training on the empty caption */
  dropout?: number;
  /** kohya shuffle_caption: shuffle the comma-separated tags */
  shuffle?: boolean;
  /** kohya keep_tokens: how many leading tags stay in place when shuffling */
  keepTokens?: number;
}

/** kohya process_caption: dropout (-> ''), else shuffle the ", "-joined tags after the first `keepTokens`. */
export function processCaption(caption: string, opts: CaptionOptions, gen: TorchGenerator): string {
  const { dropout = 0, shuffle = false, keepTokens = 0 } = opts;
  if (!(dropout >= 0 && dropout <= 1)) throw usageError(`caption dropout must be in [0, 1], got ${dropout}`);
  if (!Number.isInteger(keepTokens) || keepTokens < 0) throw usageError(`keep_tokens must be a non-negative integer, got ${keepTokens}`);
  if (dropout > 0 && gen.rand([1])[0]! < dropout) return '';
  if (!shuffle) return caption;
  const tags = caption.trim().split(',').map((t) => t.trim());
  return [...tags.slice(0, keepTokens), ...shuffleInPlace(tags.slice(keepTokens), gen)].join(', ');
}

/** Python random.shuffle (Fisher-Yates from the end) with the generator's randint; returns `xs`. */
export function shuffleInPlace<T>(xs: T[], gen: TorchGenerator): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = gen.randint(0, i + 1, [1])[0]!;
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}
