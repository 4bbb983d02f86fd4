import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cropBox } from '../../src/data/buckets.js';
import { drawFlip, loadPixels, processCaption, stackPixels } from '../../src/data/transforms.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { tempDir, writeImage } from './fixtures.js';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir()));
afterAll(() => cleanup());

describe('loadPixels', () => {
  it('maps uint8 to [-1, 1] like ToTensor + Normalize(0.5, 0.5) and mirrors on flip', async () => {
    const file = path.join(dir, 'g.png');
    await writeImage(file, 6, 4, 3); // R = x * 51, G = y * 85, B = 111
    const box = { left: 0, top: 0, width: 6, height: 4 };
    const px = await loadPixels(file, [6, 4], box, false);
    const f = (v: number) => Math.fround(Math.fround(v / 255) - 0.5) / 0.5;
    expect(px.length).toBe(6 * 4 * 3);
    expect([px[0], px[1], px[2]]).toEqual([-1, -1, f(111)]);
    expect(px[(1 * 6 + 5) * 3]).toBe(1); // x = 5: R = 255
    expect(px[(3 * 6 + 2) * 3 + 1]).toBe(1); // y = 3: G = 255
    const flipped = await loadPixels(file, [6, 4], box, true);
    for (let y = 0; y < 4; y++) for (let x = 0; x < 6; x++) for (let c = 0; c < 3; c++) {
      expect(flipped[(y * 6 + x) * 3 + c]).toBe(px[(y * 6 + 5 - x) * 3 + c]);
    }
  });

  it('crops the resized image (crop after resize)', async () => {
    const file = path.join(dir, 'c.png');
    await writeImage(file, 8, 8, 1);
    const full = await loadPixels(file, [8, 8], { left: 0, top: 0, width: 8, height: 8 }, false);
    const part = await loadPixels(file, [8, 8], { left: 3, top: 2, width: 4, height: 5 }, false);
    expect(part[0]).toBe(full[(2 * 8 + 3) * 3]);
    const up = await loadPixels(file, [16, 16], { left: 4, top: 4, width: 8, height: 8 }, false);
    expect(up.length).toBe(8 * 8 * 3);
    expect(Math.max(...up)).toBeLessThanOrEqual(1);
    expect(Math.min(...up)).toBeGreaterThanOrEqual(-1);
  });

  it('names the file when it cannot be read', async () => {
    await expect(loadPixels(path.join(dir, 'nope.png'), [4, 4], { left: 0, top: 0, width: 4, height: 4 }, false)).rejects.toThrow(/nope\.png/);
  });

  it('stacks into an NHWC tensor', () => {
    const t = stackPixels([new Float32Array(2 * 3 * 3).fill(0.5), new Float32Array(18).fill(-0.5)], 3, 2);
    expect(t.shape).toEqual([2, 2, 3, 3]);
    expect(t.dataSync()[17]).toBe(0.5);
    expect(t.dataSync()[18]).toBe(-0.5);
    t.dispose();
    expect(() => stackPixels([new Float32Array(5)], 3, 2)).toThrow(/expected 3x2x3/);
    expect(tf.memory().numTensors).toBe(0);
  });
});

describe('random augmentations are deterministic for a seed', () => {
  it('crops and flips', () => {
    const run = (seed: number) => {
      const g = new TorchGenerator(seed);
      return Array.from({ length: 50 }, () => [cropBox([80, 64], [64, 64], g).left, drawFlip(g)]);
    };
    expect(run(42)).toEqual(run(42));
    expect(run(42)).not.toEqual(run(43));
    const flips = run(42).map((x) => x[1]);
    expect(flips).toContain(true);
    expect(flips).toContain(false);
    const g = new TorchGenerator(0);
    const s = JSON.stringify(g.getState());
    expect([drawFlip(g, 0), drawFlip(g, 1)]).toEqual([false, true]);
    expect(JSON.stringify(g.getState())).toBe(s); // p of 0 or 1 draws nothing
  });
});

describe('processCaption (kohya shuffle_caption / keep_tokens / caption_dropout_rate)', () => {
  const cap = 'sks dog, sitting, grass,  sunny day ,photo, red collar';
  it('keeps the first keepTokens tags and shuffles the rest', () => {
    const g = new TorchGenerator(3);
    const outs = Array.from({ length: 20 }, () => processCaption(cap, { shuffle: true, keepTokens: 1 }, g));
    for (const o of outs) {
      const tags = o.split(', ');
      expect(tags[0]).toBe('sks dog');
      expect([...tags].sort()).toEqual(['photo', 'red collar', 'sitting', 'grass', 'sunny day', 'sks dog'].sort());
    }
    expect(new Set(outs).size).toBeGreaterThan(5);
    const h = new TorchGenerator(3);
    expect(Array.from({ length: 20 }, () => processCaption(cap, { shuffle: true, keepTokens: 1 }, h))).toEqual(outs);
  });

  it('leaves the caption alone without shuffle; dropout replaces it with the empty caption', () => {
    const g = new TorchGenerator(5);
    expect(processCaption(cap, {}, g)).toBe(cap);
    expect(processCaption(cap, { dropout: 1 }, g)).toBe('');
    const drops = Array.from({ length: 2000 }, () => processCaption('a', { dropout: 0.25 }, g) === '').filter(Boolean).length;
    expect(drops).toBeGreaterThan(400);
    expect(drops).toBeLessThan(600);
    expect(processCaption('a, b', { shuffle: true, keepTokens: 5 }, g)).toBe('a, b');
    expect(() => processCaption('a', { dropout: 2 }, g)).toThrow(/dropout/);
  });
});
