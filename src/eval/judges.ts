/**
 * Judges of the toy world (shared/toyworld.md): what colour and what shape a 32x32 image shows, deterministic and
 * training-free, so they can score a model's samples (src/eval/evaluate.ts) and be checked on procedural images.
 * They live in src/eval rather than src/data because they are the evaluation's measuring instrument: they read the
 * world's geometry (src/data/toy-world.ts renders their templates) but nothing in data or training depends on them.
 *
 * Both look only at the "ink": pixels with HSV saturation > 0.45 (and value > 0.25, so that near-black noise,
 * whose hue is meaningless, is not ink; every world colour has value >= 0.78). Fewer than 8 ink pixels: no verdict
 * (null), which scores as wrong. Neither ever throws on pixel content.
 *  - Colour: the circular mean of the ink's hues, snapped to the nearest reference hue (TOY_RGB, purple included).
 *  - Shape: the best soft IoU (sum min / sum max) between the image's ink coverage (estimated from chroma around the
 *    ink mask, see softInk: anti-aliased and blurred rims count partly) and templates rendered by the world's own
 *    rasteriser, per shape (heart included) over radius and centre: starting from the ink's area and centroid, a
 *    coarse grid then two finer ones, radii within SHAPE_RADIUS_RANGE. A best IoU below MIN_SHAPE_IOU (0.6; world
 *    images score >= 0.89, ink scattered at random about 0.43) is no verdict: a blob, not a shape.
 */
import { usageError } from '../errors.js';
import { TOY_COLOURS, TOY_RGB, TOY_SHAPES, TOY_SIZE, type ToyColour, type ToyShape, shapeCoverage } from '../data/toy-world.js';

/** Ink thresholds (see the module comment). */
export const INK_SATURATION = 0.45;
export const INK_VALUE = 0.25;
/** Fewer ink pixels than this: no verdict. */
export const MIN_INK_PIXELS = 8;
/** A best template IoU below this: no shape verdict. */
export const MIN_SHAPE_IOU = 0.6;
/** Template radii searched, in pixels: the world draws 4.95 to 9.9; a model may draw a little smaller or larger. */
export const SHAPE_RADIUS_RANGE: readonly [number, number] = [2.5, 12.5];

/** An RGB image, uint8 row-major [height, width, 3]. */
export interface JudgeImage {
  data: Uint8Array;
  width: number;
  height: number;
}

export interface ColourVerdict {
  /** the nearest reference colour, or null when there is too little ink */
  colour: ToyColour | null;
  /** circular mean hue of the ink in degrees [0, 360), NaN without ink */
  hue: number;
  /** ink pixels */
  pixels: number;
}

export interface ShapeVerdict {
  /** the best-matching shape, or null (too little ink, or no template matches well) */
  shape: ToyShape | null;
  /** best IoU of each shape's templates (0 without ink) */
  iou: Record<ToyShape, number>;
  /** the best template's radius and centre (NaN without ink) */
  radius: number;
  cx: number;
  cy: number;
  pixels: number;
}

/** HSV hue (degrees) of an RGB triple in [0, 255]; saturation and value in [0, 1]. */
export function rgbToHsv(r: number, g: number, b: number): { h: number; s: number; v: number } {
  const max = Math.max(r, g, b), min = Math.min(r, g, b), d = max - min;
  let h = 0;
  if (d > 0) {
    if (max === r) h = 60 * (((g - b) / d + 6) % 6);
    else if (max === g) h = 60 * ((b - r) / d + 2);
    else h = 60 * ((r - g) / d + 4);
  }
  return { h, s: max > 0 ? d / max : 0, v: max / 255 };
}

/** Reference hue of each colour. */
export const REFERENCE_HUES: Readonly<Record<ToyColour, number>> = Object.fromEntries(
  TOY_COLOURS.map((c) => [c, rgbToHsv(...TOY_RGB[c]).h]),
) as Record<ToyColour, number>;

function checkImage(img: JudgeImage): void {
  if (!(img.data instanceof Uint8Array) || img.data.length !== img.width * img.height * 3) {
    throw usageError(`judge: expected ${img.width}x${img.height}x3 bytes of RGB, got ${img.data?.length}`);
  }
}

/** The ink mask (1 = ink) of an image. */
export function inkMask(img: JudgeImage): Uint8Array {
  checkImage(img);
  const n = img.width * img.height;
  const m = new Uint8Array(n);
  for (let p = 0; p < n; p++) {
    const { s, v } = rgbToHsv(img.data[3 * p]!, img.data[3 * p + 1]!, img.data[3 * p + 2]!);
    if (s > INK_SATURATION && v > INK_VALUE) m[p] = 1;
  }
  return m;
}

const angleDist = (a: number, b: number) => {
  const d = Math.abs(a - b) % 360;
  return d > 180 ? 360 - d : d;
};

/** The colour an image shows (see the module comment). */
export function judgeColour(img: JudgeImage): ColourVerdict {
  const m = inkMask(img);
  let sx = 0, sy = 0, n = 0;
  for (let p = 0; p < m.length; p++) {
    if (!m[p]) continue;
    const h = (rgbToHsv(img.data[3 * p]!, img.data[3 * p + 1]!, img.data[3 * p + 2]!).h * Math.PI) / 180;
    sx += Math.cos(h);
    sy += Math.sin(h);
    n++;
  }
  if (n < MIN_INK_PIXELS) return { colour: null, hue: NaN, pixels: n };
  const hue = ((Math.atan2(sy, sx) * 180) / Math.PI + 360) % 360;
  let best: ToyColour = TOY_COLOURS[0];
  for (const c of TOY_COLOURS) if (angleDist(hue, REFERENCE_HUES[c]) < angleDist(hue, REFERENCE_HUES[best])) best = c;
  return { colour: best, hue, pixels: n };
}

/** Area of each unit-radius shape in pixels^2 per radius^2 (measured once with the world's rasteriser). */
const UNIT_AREA: Record<ToyShape, number> = Object.fromEntries(
  TOY_SHAPES.map((s) => {
    const R = 40;
    const cov = shapeCoverage(s, 64, 64, R, { width: 128, height: 128, supersample: 2 });
    let a = 0;
    for (const v of cov) a += v;
    return [s, a / (R * R)];
  }),
) as Record<ToyShape, number>;

/** Templates are sampled 2x2 per pixel from a 256x256 bitmap of each unit shape (the world's exact inside test). */
const TEMPLATE_SUPERSAMPLE = 2;
const BITMAP = 256;
const BITMAP_EXTENT = 1.3; // the bitmap spans +- this many radii (every shape fits)
const BITMAP_SCALE = BITMAP / (2 * BITMAP_EXTENT);
const BITMAPS: Record<ToyShape, Uint8Array> = Object.fromEntries(
  TOY_SHAPES.map((s) => [s, Uint8Array.from(shapeCoverage(s, BITMAP / 2, BITMAP / 2, BITMAP_SCALE, { width: BITMAP, height: BITMAP, supersample: 1 }))]),
) as Record<ToyShape, Uint8Array>;

/**
 * Soft IoU (sum min / sum max) of a binary mask holding `n` ones and a shape's template at (cx, cy, r), summed over
 * the template's bounding box only: union = n + the template's coverage outside the mask.
 */
function templateIoU(ink: Float32Array, total: number, w: number, h: number, shape: ToyShape, cx: number, cy: number, r: number): number {
  const bm = BITMAPS[shape];
  const reach = BITMAP_EXTENT * r;
  const j0 = Math.max(0, Math.floor(cx - reach)), j1 = Math.min(w - 1, Math.ceil(cx + reach));
  const i0 = Math.max(0, Math.floor(cy - reach)), i1 = Math.min(h - 1, Math.ceil(cy + reach));
  const k = BITMAP_SCALE / r;
  const ss = TEMPLATE_SUPERSAMPLE;
  let inter = 0, tsum = 0;
  for (let i = i0; i <= i1; i++) {
    for (let j = j0; j <= j1; j++) {
      let t = 0;
      for (let a = 0; a < ss; a++) {
        const bi = Math.floor(BITMAP / 2 + (i + (a + 0.5) / ss - cy) * k);
        if (bi < 0 || bi >= BITMAP) continue;
        for (let b = 0; b < ss; b++) {
          const bj = Math.floor(BITMAP / 2 + (j + (b + 0.5) / ss - cx) * k);
          if (bj >= 0 && bj < BITMAP) t += bm[bi * BITMAP + bj]!;
        }
      }
      t /= ss * ss;
      tsum += t;
      inter += Math.min(t, ink[i * w + j]!);
    }
  }
  return inter / (total + tsum - inter); // sum max(a, t) = sum a + sum t - sum min(a, t)
}

/**
 * How much of each pixel the shape covers, estimated from its chroma (max - min channel): on white, a pixel covered
 * a of the way by colour c has chroma a * chroma(c), so ink = chroma / the shape's own chroma (the 90th percentile
 * over the ink mask), clipped to [0, 1], on the mask and its 8-neighbours only (elsewhere 0: chroma noise on the
 * background is not the shape). Dark pixels (value <= INK_VALUE) are no ink.
 */
function softInk(img: JudgeImage, mask: Uint8Array): Float32Array {
  const n = img.width * img.height;
  const chroma = new Float32Array(n);
  const inMask: number[] = [];
  for (let p = 0; p < n; p++) {
    const r = img.data[3 * p]!, g = img.data[3 * p + 1]!, b = img.data[3 * p + 2]!;
    const max = Math.max(r, g, b);
    chroma[p] = max / 255 > INK_VALUE ? max - Math.min(r, g, b) : 0;
    if (mask[p]) inMask.push(chroma[p]!);
  }
  inMask.sort((x, y) => x - y);
  const ref = Math.max(1, inMask[Math.min(inMask.length - 1, Math.floor(0.9 * inMask.length))]!);
  // only the mask and its 8-neighbours: the anti-aliased or blurred rim, not chroma noise over the white background
  const w = img.width, h = img.height;
  const ink = new Float32Array(n);
  for (let i = 0; i < h; i++) {
    for (let j = 0; j < w; j++) {
      let near = false;
      for (let a = Math.max(0, i - 1); a <= Math.min(h - 1, i + 1) && !near; a++) for (let b = Math.max(0, j - 1); b <= Math.min(w - 1, j + 1); b++) if (mask[a * w + b]) near = true;
      if (near) ink[i * w + j] = Math.min(1, chroma[i * w + j]! / ref);
    }
  }
  return ink;
}

/** The shape an image shows (see the module comment). */
export function judgeShape(img: JudgeImage): ShapeVerdict {
  const mask = inkMask(img);
  const { width: w, height: h } = img;
  let n = 0;
  for (const v of mask) n += v;
  const none = Object.fromEntries(TOY_SHAPES.map((s) => [s, 0])) as Record<ToyShape, number>;
  if (n < MIN_INK_PIXELS) return { shape: null, iou: none, radius: NaN, cx: NaN, cy: NaN, pixels: n };
  const ink = softInk(img, mask);
  let total = 0, mx = 0, my = 0;
  for (let i = 0; i < h; i++) {
    for (let j = 0; j < w; j++) {
      const a = ink[i * w + j]!;
      total += a;
      mx += a * (j + 0.5);
      my += a * (i + 0.5);
    }
  }
  mx /= total;
  my /= total;
  const scores = { ...none };
  let best = { shape: TOY_SHAPES[0] as ToyShape, score: -1, r: NaN, cx: NaN, cy: NaN };
  for (const shape of TOY_SHAPES) {
    const [rMin, rMax] = SHAPE_RADIUS_RANGE;
    let cur = { score: -1, r: Math.min(rMax, Math.max(rMin, Math.sqrt(total / UNIT_AREA[shape]))), cx: mx, cy: my };
    // coarse to fine: (centre step px, centre steps each side, radius factors)
    for (const [step, k, rf] of [[1.5, 1, [0.85, 1, 1.15]], [0.75, 1, [0.93, 1, 1.07]], [0.375, 1, [0.965, 1, 1.035]]] as const) {
      const base = cur;
      for (const f of rf) {
        for (let a = -k; a <= k; a++) {
          for (let b = -k; b <= k; b++) {
            const r = Math.min(rMax, Math.max(rMin, base.r * f)), cx = base.cx + b * step, cy = base.cy + a * step;
            const s = templateIoU(ink, total, w, h, shape, cx, cy, r);
            if (s > cur.score) cur = { score: s, r, cx, cy };
          }
        }
      }
    }
    scores[shape] = cur.score;
    if (cur.score > best.score) best = { shape, ...cur };
  }
  return { shape: best.score >= MIN_SHAPE_IOU ? best.shape : null, iou: scores, radius: best.r, cx: best.cx, cy: best.cy, pixels: n };
}

/** Both verdicts of a 32x32 world image. */
export function judgeToyImage(img: JudgeImage): { colour: ColourVerdict; shape: ShapeVerdict } {
  if (img.width !== TOY_SIZE || img.height !== TOY_SIZE) throw usageError(`judge: the toy world's images are ${TOY_SIZE}x${TOY_SIZE}, got ${img.width}x${img.height}`);
  return { colour: judgeColour(img), shape: judgeShape(img) };
}
