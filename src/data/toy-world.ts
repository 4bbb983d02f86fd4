/**
 * The toy world (shared/toyworld.md): procedural 32x32 RGB images of one coloured shape on white, with captions
 * "a [small|large] <colour> <shape> [on the left|in the center|on the right]". It is small enough that a tiny SD v1
 * trained from scratch on it learns to draw what it is told, so fine-tuning can be seen (and tested) to learn.
 *
 * Rendering: each shape is an exact inside-test in continuous pixel coordinates, point-sampled on a 4x4 grid per
 * pixel (the image drawn at 4x) and box-downsampled, so a pixel's ink is its 4x4 coverage a in {0, 1/16, ..., 1} and
 * its colour a * colour + (1 - a) * white (anti-aliased; mixing with white keeps the hue). No canvas dependency.
 *
 * Randomness: one TorchGenerator (src/runtime/rng.ts, mt19937 as torch's CPU generator) per stream, seeded with the
 * stream's seed; every item consumes exactly DRAWS_PER_ITEM uniforms (torch.rand), whatever the options, so item i
 * of a seed depends only on the seed, i and the options.
 */
import { usageError } from '../errors.js';
import { TorchGenerator } from '../runtime/rng.js';

/** Image side in pixels. */
export const TOY_SIZE = 32;
/** The colours of base training, then the held-out one. */
export const TOY_BASE_COLOURS = ['red', 'green', 'blue', 'yellow'] as const;
export const TOY_HELD_OUT_COLOURS = ['purple'] as const;
/** The shapes of base training, then the held-out one. */
export const TOY_BASE_SHAPES = ['circle', 'square', 'triangle', 'star'] as const;
export const TOY_HELD_OUT_SHAPES = ['heart'] as const;
export const TOY_COLOURS = [...TOY_BASE_COLOURS, ...TOY_HELD_OUT_COLOURS] as const;
export const TOY_SHAPES = [...TOY_BASE_SHAPES, ...TOY_HELD_OUT_SHAPES] as const;
export type ToyColour = (typeof TOY_COLOURS)[number];
export type ToyShape = (typeof TOY_SHAPES)[number];
export type ToySize = 'small' | 'large';
export type ToyPosition = 'left' | 'center' | 'right';
/** The word held out for DreamBooth / textual inversion demos ("a sks"). */
export const TOY_RARE_WORD = 'sks';

/** Reference RGB of each colour (before the per-channel jitter). */
export const TOY_RGB: Readonly<Record<ToyColour, readonly [number, number, number]>> = {
  red: [220, 35, 35],
  green: [35, 170, 55],
  blue: [35, 70, 220],
  yellow: [235, 200, 25],
  purple: [145, 45, 205],
};
/** Per-channel colour jitter (uniform integer in [-J, J]). */
export const TOY_COLOUR_JITTER = 15;
/** Nominal radius of each size class in pixels (each drawn x uniform(0.9, 1.1)). */
export const TOY_RADIUS: Readonly<Record<ToySize, number>> = { small: 5.5, large: 9 };
export const TOY_RADIUS_JITTER = 0.1;
/** Centre x of each position (+- 1.5 px); the centre y is 16 +- 2.5 px. */
export const TOY_X: Readonly<Record<ToyPosition, number>> = { left: 10, center: 16, right: 22 };
export const TOY_X_JITTER = 1.5;
export const TOY_Y = 16;
export const TOY_Y_JITTER = 2.5;
export const TOY_POSITION_PHRASE: Readonly<Record<ToyPosition, string>> = { left: 'on the left', center: 'in the center', right: 'on the right' };

/** Every word a toy-world caption can contain, held-out ones included: the toy vocabulary. */
export const TOY_WORDS: readonly string[] = [
  'a', 'small', 'large', ...TOY_COLOURS, ...TOY_SHAPES, 'on', 'the', 'left', 'in', 'center', 'right', TOY_RARE_WORD,
];

/** What an image shows. */
export interface ToyLabels {
  colour: ToyColour;
  shape: ToyShape;
  size: ToySize;
  position: ToyPosition;
  /** the drawn colour (reference + jitter) */
  rgb: [number, number, number];
  /** the drawn radius and centre, in pixels (x right, y down; pixel (i, j) covers [j, j+1) x [i, i+1)) */
  radius: number;
  cx: number;
  cy: number;
}

/** One image of the world. */
export interface ToyWorldItem {
  /** RGB, row-major [32, 32, 3] */
  pixels: Uint8Array;
  width: number;
  height: number;
  caption: string;
  labels: ToyLabels;
}

export interface ToyWorldOptions {
  /** generator seed (default 0) */
  seed?: number;
  /** held-out concepts to add to the palette / shapes: "purple", "heart" */
  include?: readonly string[];
  /** draw only these colours (default: the base colours plus the included held-out ones) */
  colours?: readonly string[];
  /** draw only these shapes (default: the base shapes plus the included held-out ones) */
  shapes?: readonly string[];
  /** caption "a <word> ..." instead of "a <colour> <shape> ..." (e.g. "sks" for DreamBooth / textual inversion) */
  word?: string;
  /** probability of the size word (default 0.5) */
  sizeWordProbability?: number;
  /** probability of the position phrase (default 0.5) */
  positionPhraseProbability?: number;
}

/** Uniforms each item consumes, whatever the options (the stream stays aligned). */
const DRAWS_PER_ITEM = 12;
const SUPERSAMPLE = 4;

/** The colours and shapes a set of options draws from, validated. */
export function toyPalette(o: Pick<ToyWorldOptions, 'include' | 'colours' | 'shapes'> = {}): { colours: ToyColour[]; shapes: ToyShape[] } {
  const include = new Set(o.include ?? []);
  for (const x of include) {
    if (!(TOY_HELD_OUT_COLOURS as readonly string[]).includes(x) && !(TOY_HELD_OUT_SHAPES as readonly string[]).includes(x)) {
      throw usageError(`toy world: cannot include "${x}"; the held-out concepts are ${[...TOY_HELD_OUT_COLOURS, ...TOY_HELD_OUT_SHAPES].join(', ')}`);
    }
  }
  const pick = <T extends string>(kind: string, given: readonly string[] | undefined, all: readonly T[], base: readonly T[]): T[] => {
    if (given === undefined) return all.filter((x) => base.includes(x) || include.has(x));
    if (given.length === 0) throw usageError(`toy world: the list of ${kind} is empty`);
    for (const x of given) if (!(all as readonly string[]).includes(x)) throw usageError(`toy world: unknown ${kind.slice(0, -1)} "${x}" (known: ${all.join(', ')})`);
    return [...new Set(given)] as T[];
  };
  return {
    colours: pick('colours', o.colours, TOY_COLOURS, TOY_BASE_COLOURS),
    shapes: pick('shapes', o.shapes, TOY_SHAPES, TOY_BASE_SHAPES),
  };
}

// ---- geometry ----------------------------------------------------------------------------------------------------
// Inside tests in shape units: (u, v) = ((x - cx) / r, (cy - y) / r), v pointing up.

const TRIANGLE_R = 1.25; // circumradius of the equilateral triangle (centroid at the centre)
const STAR_OUTER = 1.25;
const STAR_INNER = 0.5;
const SQUARE_HALF = 0.85;
const polygon = (n: number, radius: (k: number) => number) =>
  Array.from({ length: n }, (_, k) => {
    const a = Math.PI / 2 + (2 * Math.PI * k) / n; // first vertex straight up
    return [radius(k) * Math.cos(a), radius(k) * Math.sin(a)] as const;
  });
const TRIANGLE = polygon(3, () => TRIANGLE_R);
const STAR = polygon(10, (k) => (k % 2 === 0 ? STAR_OUTER : STAR_INNER));

/** Crossing-number point-in-polygon test (even-odd). */
function inPolygon(pts: ReadonlyArray<readonly [number, number]>, u: number, v: number): boolean {
  let inside = false;
  for (let i = 0, j = pts.length - 1; i < pts.length; j = i++) {
    const [xi, yi] = pts[i]!;
    const [xj, yj] = pts[j]!;
    if (yi > v !== yj > v && u < ((xj - xi) * (v - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

/** Is (u, v) inside the unit shape? The heart is Taubin's (x^2 + y^2 - 1)^3 <= x^2 y^3, centred on its bounding box. */
function insideUnit(shape: ToyShape, u: number, v: number): boolean {
  switch (shape) {
    case 'circle':
      return u * u + v * v <= 1;
    case 'square':
      return Math.abs(u) <= SQUARE_HALF && Math.abs(v) <= SQUARE_HALF;
    case 'triangle':
      return inPolygon(TRIANGLE, u, v);
    case 'star':
      return inPolygon(STAR, u, v);
    case 'heart': {
      const x = u, y = v + 0.1; // the curve spans y in [-1, 1.2]: centre it
      const q = x * x + y * y - 1;
      return q * q * q <= x * x * y * y * y;
    }
  }
}

/** Half-extent of the unit shape (its bounding box lies within +- this), for the pixel range to test. */
const EXTENT = 1.3;

/**
 * Coverage of a shape in each pixel of a width x height grid, in [0, 1]: the fraction of `supersample`^2 point
 * samples per pixel that fall inside (the shape drawn at `supersample` x and box-downsampled).
 */
export function shapeCoverage(shape: ToyShape, cx: number, cy: number, radius: number, opts: { width?: number; height?: number; supersample?: number } = {}): Float32Array {
  const w = opts.width ?? TOY_SIZE, h = opts.height ?? TOY_SIZE;
  const s = opts.supersample ?? SUPERSAMPLE;
  const out = new Float32Array(w * h);
  const reach = EXTENT * radius;
  const j0 = Math.max(0, Math.floor(cx - reach)), j1 = Math.min(w - 1, Math.ceil(cx + reach));
  const i0 = Math.max(0, Math.floor(cy - reach)), i1 = Math.min(h - 1, Math.ceil(cy + reach));
  const inv = 1 / radius;
  for (let i = i0; i <= i1; i++) {
    for (let j = j0; j <= j1; j++) {
      let n = 0;
      for (let a = 0; a < s; a++) {
        const v = (cy - (i + (a + 0.5) / s)) * inv;
        for (let b = 0; b < s; b++) if (insideUnit(shape, (j + (b + 0.5) / s - cx) * inv, v)) n++;
      }
      out[i * w + j] = n / (s * s);
    }
  }
  return out;
}

/** Draw one shape on white (RGB uint8 [32, 32, 3]). */
export function renderToyImage(shape: ToyShape, rgb: readonly [number, number, number], cx: number, cy: number, radius: number): Uint8Array {
  const cov = shapeCoverage(shape, cx, cy, radius);
  const px = new Uint8Array(TOY_SIZE * TOY_SIZE * 3);
  for (let p = 0; p < cov.length; p++) {
    const a = cov[p]!;
    for (let c = 0; c < 3; c++) px[p * 3 + c] = Math.round(a * rgb[c]! + (1 - a) * 255);
  }
  return px;
}

/** The caption of an item: "a [size] <colour> <shape> [position phrase]" (or "a [size] <word> [...]"). */
export function toyCaption(l: Pick<ToyLabels, 'colour' | 'shape' | 'size' | 'position'>, parts: { size: boolean; position: boolean; word?: string }): string {
  const words = ['a'];
  if (parts.size) words.push(l.size);
  if (parts.word !== undefined) words.push(parts.word);
  else words.push(l.colour, l.shape);
  if (parts.position) words.push(TOY_POSITION_PHRASE[l.position]);
  return words.join(' ');
}

const POSITIONS: readonly ToyPosition[] = ['left', 'center', 'right'];
const SIZES: readonly ToySize[] = ['small', 'large'];

/** An endless, deterministic stream of world images (see the module comment); the options are checked on the call. */
export function toyWorldStream(opts: ToyWorldOptions = {}): Generator<ToyWorldItem, never, undefined> {
  const { colours, shapes } = toyPalette(opts);
  const pSize = opts.sizeWordProbability ?? 0.5;
  const pPos = opts.positionPhraseProbability ?? 0.5;
  for (const [k, p] of [['sizeWordProbability', pSize], ['positionPhraseProbability', pPos]] as const) {
    if (!(p >= 0 && p <= 1)) throw usageError(`toy world: ${k} must be in [0, 1], got ${p}`);
  }
  if (opts.word !== undefined && !/^\S+$/.test(opts.word)) throw usageError(`toy world: the caption word must be one word without spaces, got ${JSON.stringify(opts.word)}`);
  return items(new TorchGenerator(opts.seed ?? 0), opts, colours, shapes, pSize, pPos);
}

function* items(g: TorchGenerator, opts: ToyWorldOptions, colours: ToyColour[], shapes: ToyShape[], pSize: number, pPos: number): Generator<ToyWorldItem, never, undefined> {
  const choose = <T>(xs: readonly T[], u: number) => xs[Math.min(xs.length - 1, Math.floor(u * xs.length))]!;
  for (;;) {
    const d = g.rand([DRAWS_PER_ITEM]);
    const colour = choose(colours, d[0]!);
    const shape = choose(shapes, d[1]!);
    const size = choose(SIZES, d[2]!);
    const position = choose(POSITIONS, d[3]!);
    const radius = TOY_RADIUS[size] * (1 + TOY_RADIUS_JITTER * (2 * d[4]! - 1));
    const cx = TOY_X[position] + TOY_X_JITTER * (2 * d[5]! - 1);
    const cy = TOY_Y + TOY_Y_JITTER * (2 * d[6]! - 1);
    const ref = TOY_RGB[colour];
    const rgb = [0, 1, 2].map((c) => {
      const jitter = Math.min(TOY_COLOUR_JITTER, Math.floor(d[7 + c]! * (2 * TOY_COLOUR_JITTER + 1)) - TOY_COLOUR_JITTER);
      return Math.max(0, Math.min(255, ref[c]! + jitter));
    }) as [number, number, number];
    const labels: ToyLabels = { colour, shape, size, position, rgb, radius, cx, cy };
    const caption = toyCaption(labels, { size: d[10]! < pSize, position: d[11]! < pPos, word: opts.word });
    yield { pixels: renderToyImage(shape, rgb, cx, cy, radius), width: TOY_SIZE, height: TOY_SIZE, caption, labels };
  }
}

/** The first `count` images of a stream, as an array. */
export function toyWorldImages(count: number, opts: ToyWorldOptions = {}): ToyWorldItem[] {
  if (!Number.isInteger(count) || count < 0) throw usageError(`toy world: count must be a non-negative integer, got ${count}`);
  const out: ToyWorldItem[] = [];
  if (count === 0) return out;
  for (const item of toyWorldStream(opts)) {
    out.push(item);
    if (out.length === count) break;
  }
  return out;
}

/** Parse "a [small|large] <colour> <shape> [...]"-style text: the first known colour and shape words it names. */
export function parseToyPrompt(prompt: string): { colour?: ToyColour; shape?: ToyShape } {
  const words = prompt.toLowerCase().split(/[^a-z]+/).filter(Boolean);
  return {
    colour: words.find((w): w is ToyColour => (TOY_COLOURS as readonly string[]).includes(w)),
    shape: words.find((w): w is ToyShape => (TOY_SHAPES as readonly string[]).includes(w)),
  };
}

export interface WriteToyWorldOptions extends ToyWorldOptions {
  /** replace a non-empty folder (default: refuse) */
  overwrite?: boolean;
  /** progress output (default true) */
  quiet?: boolean;
}

/**
 * Write `count` world images as a captioned image folder (what src/data/dataset.ts reads): NNNNN.png + NNNNN.txt,
 * plus labels.jsonl (one {"file_name", "caption", ...labels} row per image, for judges and inspection). The folder is
 * built next to `dir` and renamed into place at the end, so a failure leaves no half-written dataset.
 */
export async function writeToyWorld(dir: string, count: number, opts: WriteToyWorldOptions = {}): Promise<{ dir: string; files: number }> {
  const [{ mkdir, readdir, rename, rm, writeFile }, path, { writePng }, { progress }] = await Promise.all([
    import('node:fs/promises'),
    import('node:path'),
    import('../io/png.js'),
    import('../runtime/progress.js'),
  ]);
  if (!Number.isInteger(count) || count < 1) throw usageError(`toy world: count must be a positive integer, got ${count}`);
  const out = path.resolve(dir);
  const existing = await readdir(out).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return [] as string[];
    if (e.code === 'ENOTDIR') throw usageError(`toy world: ${dir} exists and is not a folder`);
    throw e;
  });
  if (existing.length && !opts.overwrite) throw usageError(`toy world: ${dir} is not empty; choose another folder or pass --overwrite to replace it`);
  const items = toyWorldStream(opts); // validates the options before anything is written
  const stage = `${out}.tmp-${process.pid}-${Date.now().toString(36)}`;
  await mkdir(stage, { recursive: true });
  const bar = opts.quiet ? undefined : progress({ total: count, label: 'toy-world', logEvery: Math.max(1, Math.ceil(count / 10)), logSeconds: 10 });
  try {
    const rows: string[] = [];
    const digits = Math.max(5, String(count - 1).length);
    for (let i = 0; i < count; i++) {
      const it = items.next().value as ToyWorldItem;
      const stem = String(i).padStart(digits, '0');
      await writePng(path.join(stage, `${stem}.png`), it.pixels, it.width, it.height);
      await writeFile(path.join(stage, `${stem}.txt`), it.caption + '\n');
      rows.push(JSON.stringify({ file_name: `${stem}.png`, caption: it.caption, ...it.labels }));
      bar?.tick(1);
    }
    await writeFile(path.join(stage, 'labels.jsonl'), rows.join('\n') + '\n');
    await rm(out, { recursive: true, force: true });
    await rename(stage, out);
  } catch (e) {
    await rm(stage, { recursive: true, force: true }).catch(() => {});
    throw e;
  } finally {
    bar?.done();
  }
  return { dir: out, files: count };
}
