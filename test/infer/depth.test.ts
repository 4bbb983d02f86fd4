// Depth maps: reading (8/16-bit grayscale, alpha, gray-as-RGB, colour refused, unreadable), torch's bicubic
// resize (hand-computed values), normalisation, inversion, any size; and `sdtune sample --depth-map` end to end.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { deflateSync } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { type DepthMap, depthAspectNote, depthCondition, readDepthMap, resizeBicubicTorch } from '../../src/infer/depth.js';
import { generate } from '../../src/infer/pipeline.js';
import { sampleToFiles } from '../../src/infer/sample.js';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { parseInfotext, readImageRgb, readPngText } from '../../src/io/png.js';
import { caseTensors, describeGolden, golden } from '../golden.js';
import { maxAbsDiff, pngChunk } from '../helpers.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-depth-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A PNG of `bits` (8/16) per sample; colorType 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA; samples row-major, channels interleaved. */
function png(file: string, w: number, h: number, bits: 8 | 16, colorType: 0 | 2 | 4 | 6, samples: ArrayLike<number>): string {
  const ch = { 0: 1, 2: 3, 4: 2, 6: 4 }[colorType];
  const row = 1 + (w * ch * bits) / 8;
  const raw = Buffer.alloc(h * row);
  for (let y = 0; y < h; y++)
    for (let x = 0; x < w * ch; x++) {
      const v = samples[y * w * ch + x];
      const off = y * row + 1 + (x * bits) / 8;
      if (bits === 16) raw.writeUInt16BE(v, off);
      else raw[off] = v;
    }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0), ihdr.writeUInt32BE(h, 4), (ihdr[8] = bits), (ihdr[9] = colorType);
  const bytes = Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), pngChunk('IHDR', ihdr), pngChunk('IDAT', deflateSync(raw)), pngChunk('IEND', Buffer.alloc(0))]);
  const p = path.join(tmp, file);
  writeFileSync(p, bytes);
  return p;
}

/** Keys' cubic kernel with a = -0.75 (what torch's bicubic uses), in float64. */
const keys = (x: number) => {
  const a = -0.75;
  const t = Math.abs(x);
  return t <= 1 ? (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 : t < 2 ? a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a : 0;
};
/** Reference 1-D bicubic (align_corners=False, border clamped) by the textbook formula. */
const bicubic1d = (src: number[], n: number) =>
  Array.from({ length: n }, (_, o) => {
    const x = (src.length / n) * (o + 0.5) - 0.5;
    const i = Math.floor(x);
    let s = 0;
    for (let k = i - 1; k <= i + 2; k++) s += keys(x - k) * src[Math.min(Math.max(k, 0), src.length - 1)];
    return s;
  });

describe('torch bicubic resize and normalisation', () => {
  it('upsamples [0, 1] to 4 as torch does (negative lobes included), by hand', () => {
    const r = resizeBicubicTorch({ data: Float32Array.of(0, 1), width: 2, height: 1 }, 4, 1);
    // o=0: source x = -0.25, taps clamped to [0,0,0,1], weight of the last = W(1.25) = -0.10546875
    expect([...r.data]).toEqual([-0.10546875, 0.2265625, 0.7734375, 1.10546875]);
  });

  it('matches the textbook formula on a random 2-D map, down- and upscaling, and is the identity at the same size', () => {
    const w = 13, h = 7;
    const data = Float32Array.from({ length: w * h }, (_, i) => Math.sin(i * 1.7) * 100);
    const src: DepthMap = { data, width: w, height: h };
    for (const [ow, oh] of [[5, 3], [26, 15], [13, 7]]) {
      const got = resizeBicubicTorch(src, ow, oh).data;
      // separable: rows first, then columns (the reference in float64)
      const rows = Array.from({ length: h }, (_, y) => bicubic1d([...data.subarray(y * w, (y + 1) * w)], ow));
      const want = new Float64Array(ow * oh);
      for (let x = 0; x < ow; x++) bicubic1d(rows.map((r) => r[x]), oh).forEach((v, y) => (want[y * ow + x] = v));
      expect(maxAbsDiff(got, want)).toBeLessThan(1e-3); // float32 sums of values up to 100
    }
    expect([...resizeBicubicTorch(src, w, h).data]).toEqual([...data]);
  });

  it('normalises to exactly [-1, 1]; invert negates; the value scale (8 vs 16 bit) does not matter; a flat map is refused', () => {
    const map: DepthMap = { data: Float32Array.from({ length: 37 * 23 }, (_, i) => (i * 7919) % 255), width: 37, height: 23 };
    const d = depthCondition(map, 8, 6);
    expect(d.length).toBe(48);
    expect([Math.min(...d), Math.max(...d)]).toEqual([-1, 1]);
    const inv = depthCondition(map, 8, 6, { invert: true });
    expect(maxAbsDiff(inv, d.map((v) => -v))).toBeLessThan(1e-6);
    const wide = depthCondition({ ...map, data: map.data.map((v) => v * 257) }, 8, 6);
    expect(maxAbsDiff(wide, d)).toBeLessThan(1e-6);
    expect(() => depthCondition({ data: new Float32Array(16).fill(3), width: 4, height: 4 }, 2, 2, { source: 'flat.png' })).toThrow(/depth map flat\.png is flat/);
    expect(() => depthCondition({ data: new Float32Array(3), width: 2, height: 2 }, 1, 1)).toThrow(/3 values for 2x2/);
  });

  it('says when the map is stretched to another aspect ratio', () => {
    expect(depthAspectNote({ data: new Float32Array(0), width: 640, height: 480 }, 512, 384, 'd.png')).toBeUndefined();
    expect(depthAspectNote({ data: new Float32Array(0), width: 640, height: 480 }, 512, 512, 'd.png')).toMatch(/d\.png is 640x480 but the image is 512x512: it is stretched/);
  });
});

describe('reading depth maps', () => {
  it('8-bit and 16-bit grayscale keep their values; alpha is ignored; gray saved as RGB is accepted', async () => {
    const g16 = await readDepthMap(png('g16.png', 4, 2, 16, 0, [7, 8000, 16000, 24000, 32000, 40000, 48000, 65535]));
    expect([g16.width, g16.height, ...g16.data]).toEqual([4, 2, 7, 8000, 16000, 24000, 32000, 40000, 48000, 65535]);
    const g8 = await readDepthMap(png('g8.png', 3, 1, 8, 0, [0, 128, 255]));
    expect([...g8.data]).toEqual([0, 128, 255]);
    const ga = await readDepthMap(png('ga.png', 2, 1, 8, 4, [9, 255, 10, 0]));
    expect([...ga.data]).toEqual([9, 10]);
    const rgb = await readDepthMap(png('rgb16.png', 2, 1, 16, 6, [500, 500, 500, 65535, 60000, 60000, 60000, 0]));
    expect([...rgb.data]).toEqual([500, 60000]);
  });

  it('refuses a colour-mapped image and unreadable files, naming them', async () => {
    const colour = png('inferno.png', 2, 1, 8, 2, [10, 10, 10, 200, 40, 90]);
    await expect(readDepthMap(colour)).rejects.toThrow(/inferno\.png is a colour image \(pixel 1,0 has RGB 200,40,90\).*grayscale/);
    const junk = path.join(tmp, 'junk.png');
    writeFileSync(junk, 'not an image');
    const e = await readDepthMap(junk).catch((x) => x);
    expect(e).toBeInstanceOf(SdtuneError);
    expect([e.kind, e.message]).toEqual(['file', expect.stringMatching(/cannot read depth map .*junk\.png/)]);
    await expect(readDepthMap(path.join(tmp, 'missing.png'))).rejects.toThrow(/cannot read depth map .*missing\.png/);
  });
});

describeGolden('sdtune sample --depth-map (tiny-sd2-depth single file)', () => {
  const MODEL = golden('tiny-sd2-depth.safetensors');
  const load = { configDir: golden('tiny-sd2-depth') };
  /** The golden case's init image and depth map as files: an 8-bit RGB PNG and a 16-bit grayscale PNG. */
  const inputs = async () => {
    const ref = await caseTensors('pipe_depth2img');
    const img = ref.get('init_image_nhwc01')!.data as Float32Array;
    const init = png('init.png', 64, 64, 8, 2, Array.from(img, (v) => Math.round(v * 255)));
    const d = ref.get('depth_map')!.data as Float32Array;
    const [lo, hi] = [Math.min(...d), Math.max(...d)];
    const depth16 = Array.from(d, (v) => Math.round(((v - lo) / (hi - lo)) * 65535));
    return { init, depth: png('depth.png', 64, 64, 16, 0, depth16), depth16 };
  };

  it('writes the image generate() makes from the same inputs, with A1111 parameters and the depth map named', async () => {
    const { init, depth, depth16 } = await inputs();
    const out = path.join(tmp, 'd2i.png');
    const opts = { model: MODEL, load, prompt: 'a photo of an astronaut riding a horse', negativePrompt: 'blurry', seed: 0, steps: 10, sampler: 'pndm', strength: 0.7, quiet: true };
    const logs: string[] = [];
    await sampleToFiles({ ...opts, initImage: init, depthMap: depth, out, log: (l) => logs.push(l) });
    expect(logs).toEqual([]); // the model's own tokenizer pads with "!": no warning; same aspect ratio: no note
    const p = parseInfotext((await readPngText(out)).parameters);
    expect(p.raw['Denoising strength']).toBe('0.7');
    expect(p.raw['Depth map']).toBe('depth.png');
    expect(p.raw['Depth map hash']).toMatch(/^[0-9a-f]{10}$/);
    expect(p.raw['Depth invert']).toBeUndefined();
    expect(p.raw.Model).toBe('tiny-sd2-depth');
    const m = await loadModel(MODEL, load);
    try {
      const initPx = await readImageRgb(init);
      const r = await generate(m, {
        prompt: opts.prompt, negativePrompt: opts.negativePrompt, sampler: 'pndm', steps: 10, strength: 0.7, seed: 0,
        initImage: { data: Float32Array.from(initPx.data, (v) => v / 255), width: 64, height: 64 },
        depthMap: { data: Float32Array.from(depth16), width: 64, height: 64 },
      });
      const ours = await readImageRgb(out);
      expect(maxAbsDiff(ours.data, Uint8Array.from(r.images[0].data, (v) => Math.round(v * 255)))).toBeLessThanOrEqual(1);
      // inverting the map changes the result
      const inv = path.join(tmp, 'd2i-inv.png');
      await sampleToFiles({ ...opts, initImage: init, depthMap: depth, depthInvert: true, out: inv });
      expect(parseInfotext((await readPngText(inv)).parameters).raw['Depth invert']).toBe('True');
      expect(maxAbsDiff((await readImageRgb(inv)).data, ours.data)).toBeGreaterThan(2);
    } finally {
      disposeModel(m);
    }
  });

  it('a batch: the depth channel goes with every image and both CFG halves (image i of seed s = a single run of seed s+i)', async () => {
    const { depth16 } = await inputs();
    const m = await loadModel(MODEL, load);
    try {
      const ref = await caseTensors('pipe_depth2img');
      const base = {
        prompt: 'a house', negativePrompt: 'blurry', sampler: 'euler' as const, steps: 3, strength: 0.8,
        initImage: { data: ref.get('init_image_nhwc01')!.data as Float32Array, width: 64, height: 64 },
        depthMap: { data: Float32Array.from(depth16), width: 64, height: 64 },
      };
      const two = await generate(m, { ...base, seed: 5, batchSize: 2 });
      const one = await generate(m, { ...base, seed: 6 });
      expect(two.seeds).toEqual([5, 6]);
      expect(maxAbsDiff(two.images[1].data, one.images[0].data)).toBeLessThan(1e-5);
      expect(maxAbsDiff(two.images[0].data, one.images[0].data)).toBeGreaterThan(1e-2);
    } finally {
      disposeModel(m);
    }
  });

  it('clear errors: a depth model without a map, a map for a model that is not a depth model, a map without an init image', async () => {
    const { init, depth } = await inputs();
    const base = { prompt: 'x', steps: 1, quiet: true, out: path.join(tmp, 'e.png') };
    await expect(sampleToFiles({ ...base, model: MODEL, load, initImage: init })).rejects.toThrow(/is a depth-to-image model .*--depth-map FILE/);
    await expect(sampleToFiles({ ...base, model: golden('tiny-sd'), initImage: init, depthMap: depth })).rejects.toThrow(/is not a depth-to-image model \(its UNet has 4 input channels/);
    await expect(sampleToFiles({ ...base, model: MODEL, load, depthMap: depth })).rejects.toThrow(/a depthMap needs an initImage/);
    await expect(sampleToFiles({ ...base, model: MODEL, load, initImage: init, depthInvert: true })).rejects.toThrow(/depthInvert needs a depthMap/);
    // an SD 2 text encoder with a tokenizer that pads like SD v1's: a warning (the run goes on)
    const lines: string[] = [];
    await sampleToFiles({ ...base, model: MODEL, load: { ...load, tokenizerDir: golden('clip-tokenizer') }, initImage: init, depthMap: depth, steps: 2, strength: 0.5, cfg: 1, log: (l) => lines.push(l) });
    expect(lines.join('\n')).toMatch(/warning: .*SD 2 \(OpenCLIP\) text encoder but its tokenizer pads with <\|endoftext\|>.*--tokenizer DIR/);
  });

  it('the command line: --depth-map and --depth-invert; an unreadable map is one line with exit code != 0', async () => {
    const { init, depth } = await inputs();
    const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/sdtune.js');
    const run = (...args: string[]) =>
      spawnSync(process.execPath, [BIN, 'sample', '--model', MODEL, '--config', golden('tiny-sd2-depth'), '--prompt', 'a house', '--steps', '2', '--seed', '1', '--init-image', init, ...args], { encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
    const out = path.join(tmp, 'cli-d2i.png');
    const r = run('--depth-map', depth, '--depth-invert', '--out', out);
    expect(r.status, r.stderr).toBe(0);
    expect(parseInfotext((await readPngText(out)).parameters).raw['Depth invert']).toBe('True');
    const bad = run('--depth-map', path.join(tmp, 'nope.png'), '--out', path.join(tmp, 'x.png'));
    expect(bad.status).not.toBe(0);
    expect(bad.stderr.trim().split('\n').pop()).toMatch(/^error: cannot read depth map .*nope\.png/);
  });
});
