/**
 * Generates the bundled toy datasets (npx tsx scripts/make-datasets.ts), deterministically from a seeded
 * TorchGenerator, with a tiny signed-distance rasterizer (4x4 supersampled) and our own PNG writer; no downloads.
 *   datasets/shapes/  16 images (12 at 64x64, 2 at 64x96, 2 at 96x64) of coloured shapes in one "style" (thick black
 *                     outlines, pastel backgrounds), captions "<shape description>, outlined style" in .txt files
 *   datasets/logo/    8 images of one synthetic logo (a yellow star in a blue ring) at different positions, scales
 *                     and backgrounds, no captions (textual inversion uses prompt templates)
 * and, from the toy world (src/data/toy-world.ts, 32x32) for the toy base checkpoints/toy-sd:
 *   datasets/hearts/  8 hearts, 2 in each base colour, captioned "a red heart ..." (the LoRA demo: the base never saw one)
 *   datasets/toy-logo/ 8 blue triangles, captioned "a <my-logo> ..." (textual inversion of configs/logo.yaml)
 *   datasets/sks-star/ 8 purple stars, captioned "a sks star ..." (DreamBooth of configs/dreambooth.yaml: purple is held out)
 */
import { mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { writePng } from '../src/io/png.js';
import { type ToyWorldOptions, toyWorldStream } from '../src/data/toy-world.js';
import { TorchGenerator } from '../src/runtime/rng.js';

type RGB = [number, number, number];
type Vec = [number, number];
/** A picture: colour at a point (x, y in pixels). */
type Paint = (x: number, y: number) => RGB;

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'datasets');
const SS = 4; // supersampling per axis
const OUTLINE = 4; // px, the "outlined style"
const BLACK: RGB = [20, 20, 20];

const COLOURS: Record<string, RGB> = {
  red: [226, 59, 59], blue: [47, 111, 222], green: [47, 168, 79], yellow: [242, 194, 48], purple: [142, 68, 201], orange: [240, 138, 36],
};
const PASTELS: RGB[] = [[253, 226, 228], [216, 243, 220], [228, 220, 247], [255, 241, 193], [214, 236, 250], [250, 225, 205]];

// ---- signed distances (negative inside), after Inigo Quilez's 2D distance functions ----

const len = (x: number, y: number) => Math.hypot(x, y);
const sdCircle = (p: Vec, r: number) => len(p[0], p[1]) - r;
function sdBox(p: Vec, hw: number, hh: number): number {
  const dx = Math.abs(p[0]) - hw, dy = Math.abs(p[1]) - hh;
  return len(Math.max(dx, 0), Math.max(dy, 0)) + Math.min(Math.max(dx, dy), 0);
}
/** Exact distance to a closed polygon with a crossing-number sign. */
function sdPolygon(p: Vec, v: readonly Vec[]): number {
  let d = Infinity, s = 1;
  for (let i = 0, j = v.length - 1; i < v.length; j = i++) {
    const ex = v[j]![0] - v[i]![0], ey = v[j]![1] - v[i]![1];
    const wx = p[0] - v[i]![0], wy = p[1] - v[i]![1];
    const t = Math.min(1, Math.max(0, (wx * ex + wy * ey) / (ex * ex + ey * ey)));
    d = Math.min(d, len(wx - ex * t, wy - ey * t));
    const c1 = p[1] >= v[i]![1], c2 = p[1] < v[j]![1], c3 = ex * wy > ey * wx;
    if ((c1 && c2 && c3) || (!c1 && !c2 && !c3)) s = -s;
  }
  return s * d;
}
const regular = (n: number, r: number, rot: number, inner?: number): Vec[] =>
  Array.from({ length: inner ? 2 * n : n }, (_, i) => {
    const a = rot - Math.PI / 2 + (i * Math.PI * 2) / (inner ? 2 * n : n);
    const rr = inner && i % 2 ? inner : r;
    return [rr * Math.cos(a), rr * Math.sin(a)];
  });
/** Point relative to (cx, cy), rotated by -angle. */
const local = (x: number, y: number, cx: number, cy: number, angle: number): Vec => {
  const dx = x - cx, dy = y - cy, c = Math.cos(angle), s = Math.sin(angle);
  return [c * dx + s * dy, -s * dx + c * dy];
};

/** Fill inside, black outline band across the edge, background outside. */
const outlined = (sd: (x: number, y: number) => number, fill: RGB, bg: Paint): Paint => (x, y) => {
  const d = sd(x, y);
  return d < -OUTLINE / 2 ? fill : d < OUTLINE / 2 ? BLACK : bg(x, y);
};

/** Rasterize with SS x SS samples per pixel; RGB bytes. */
function render(w: number, h: number, paint: Paint): Uint8Array {
  const out = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const acc = [0, 0, 0];
      for (let sy = 0; sy < SS; sy++) for (let sx = 0; sx < SS; sx++) {
        const c = paint(x + (sx + 0.5) / SS, y + (sy + 0.5) / SS);
        acc[0]! += c[0]; acc[1]! += c[1]; acc[2]! += c[2];
      }
      for (let k = 0; k < 3; k++) out[(y * w + x) * 3 + k] = Math.round(acc[k]! / (SS * SS));
    }
  }
  return out;
}

/** Uniform float in [lo, hi) and a pick from a list, both from the generator. */
const uni = (g: TorchGenerator, lo: number, hi: number) => lo + (hi - lo) * g.rand([1])[0]!;
const pick = <T>(g: TorchGenerator, xs: readonly T[]): T => xs[g.randint(0, xs.length, [1])[0]!]!;

const SHAPES = ['circle', 'square', 'triangle', 'stripes'] as const;
type Shape = (typeof SHAPES)[number];

/** One shape picture: jittered centre, size and rotation; returns its paint and caption. */
function shapeImage(g: TorchGenerator, w: number, h: number, shape: Shape, colour: string): { paint: Paint; caption: string } {
  const bgc = pick(g, PASTELS);
  const bg: Paint = () => bgc;
  const cx = w / 2 + uni(g, -5, 5), cy = h / 2 + uni(g, -5, 5);
  const r = (Math.min(w, h) / 2) * uni(g, 0.55, 0.75);
  const rot = uni(g, -0.4, 0.4);
  const fill = COLOURS[colour]!;
  let sd: (x: number, y: number) => number;
  if (shape === 'circle') sd = (x, y) => sdCircle([x - cx, y - cy], r);
  else if (shape === 'square') sd = (x, y) => sdBox(local(x, y, cx, cy, rot), r * 0.8, r * 0.8);
  else if (shape === 'triangle') {
    const tri = regular(3, r * 1.05, rot);
    sd = (x, y) => sdPolygon([x - cx, y - cy], tri);
  } else {
    const gap = r * 0.7; // three parallel bars
    sd = (x, y) => {
      const p = local(x, y, cx, cy, rot);
      return Math.min(...[-1, 0, 1].map((k) => sdBox([p[0], p[1] - k * gap], r, r * 0.2)));
    };
  }
  const caption = shape === 'stripes' ? `${colour} stripes, outlined style` : `${/^[aeiou]/.test(colour) ? 'an' : 'a'} ${colour} ${shape}, outlined style`;
  return { paint: outlined(sd, fill, bg), caption };
}

/** The logo: a yellow star (thin dark edge) inside a blue ring, at (cx, cy) with ring radius r, over `bg`. */
function logo(cx: number, cy: number, r: number, rot: number, bg: Paint): Paint {
  const star = regular(5, r * 0.72, rot, r * 0.3);
  return (x, y) => {
    const p: Vec = [x - cx, y - cy];
    const ring = Math.abs(sdCircle(p, r * 0.9)) - r * 0.12;
    if (ring < 0) return [36, 84, 196];
    const s = sdPolygon(p, star);
    return s < -0.6 ? [250, 204, 21] : s < 0.6 ? [60, 40, 10] : bg(x, y);
  };
}

const LOGO_BACKGROUNDS: ((g: TorchGenerator) => Paint)[] = [
  () => () => [255, 255, 255],
  () => () => [200, 200, 200],
  () => () => [34, 90, 60],
  () => () => [250, 218, 221],
  (g) => { const a = uni(g, 0, Math.PI); return (x, y) => { const t = (Math.cos(a) * x + Math.sin(a) * y) / 90; return [Math.round(120 + 100 * t), 160, Math.round(220 - 80 * t)]; }; },
  () => (x, y) => ((Math.floor(x / 8) + Math.floor(y / 8)) % 2 ? [235, 235, 235] : [180, 180, 180]),
  () => (x, y) => (Math.floor((x + y) / 6) % 2 ? [255, 236, 179] : [255, 224, 130]),
  () => () => [40, 40, 48],
];

async function main(): Promise<void> {
  const g = new TorchGenerator(20240601);
  for (const sub of ['shapes', 'logo']) {
    await rm(path.join(ROOT, sub), { recursive: true, force: true });
    await mkdir(path.join(ROOT, sub), { recursive: true });
  }
  // shapes: 12 square, 2 tall, 2 wide; every shape and colour appears
  const sizes: [number, number][] = [...Array<[number, number]>(12).fill([64, 64]), [64, 96], [64, 96], [96, 64], [96, 64]];
  const colours = Object.keys(COLOURS);
  for (const [i, [w, h]] of sizes.entries()) {
    const shape = SHAPES[i % SHAPES.length]!;
    const colour = colours[(i + Math.floor(i / 4)) % colours.length]!; // 16 distinct (shape, colour) pairs
    const { paint, caption } = shapeImage(g, w, h, shape, colour);
    const name = `${String(i).padStart(2, '0')}_${colour}_${shape}`;
    await writePng(path.join(ROOT, 'shapes', `${name}.png`), render(w, h, paint), w, h);
    await writeFile(path.join(ROOT, 'shapes', `${name}.txt`), `${caption}\n`);
  }
  // logo: 8 placements
  for (const [i, bgf] of LOGO_BACKGROUNDS.entries()) {
    const r = uni(g, 14, 28);
    const cx = uni(g, r, 64 - r), cy = uni(g, r, 64 - r);
    const paint = logo(cx, cy, r, uni(g, -0.3, 0.3), bgf(g));
    await writePng(path.join(ROOT, 'logo', `logo_${String(i).padStart(2, '0')}.png`), render(64, 64, paint), 64, 64);
  }
  // toy world folders: `parts` draws of `per` images each (one colour per part)
  const toy = async (sub: string, parts: ToyWorldOptions[], per: number, caption = (c: string) => c) => {
    await rm(path.join(ROOT, sub), { recursive: true, force: true });
    await mkdir(path.join(ROOT, sub), { recursive: true });
    let i = 0;
    for (const [k, opts] of parts.entries()) {
      const items = toyWorldStream({ seed: 100 + k, ...opts });
      for (let j = 0; j < per; j++, i++) {
        const it = items.next().value;
        const name = String(i).padStart(2, '0');
        await writePng(path.join(ROOT, sub, `${name}.png`), it.pixels, it.width, it.height);
        await writeFile(path.join(ROOT, sub, `${name}.txt`), `${caption(it.caption)}\n`);
      }
    }
  };
  await toy('hearts', ['red', 'green', 'blue', 'yellow'].map((c) => ({ shapes: ['heart'], colours: [c] })), 2);
  await toy('toy-logo', [{ shapes: ['triangle'], colours: ['blue'], word: '<my-logo>' }], 8);
  await toy('sks-star', [{ shapes: ['star'], colours: ['purple'], word: 'sks' }], 8, (c) => c.replace(/\bsks\b/, 'sks star'));
  let total = 0, files = 0;
  for (const sub of ['shapes', 'logo', 'hearts', 'toy-logo', 'sks-star']) {
    for (const f of await readdir(path.join(ROOT, sub))) {
      total += (await stat(path.join(ROOT, sub, f))).size;
      files++;
    }
  }
  console.log(`wrote ${files} files, ${(total / 1024).toFixed(1)} KB, under ${ROOT}`);
}

await main();
