import { describe, expect, it } from 'vitest';
import { assignBucket, cropBox, makeBuckets, squareAssignment } from '../../src/data/buckets.js';
import { TorchGenerator } from '../../src/runtime/rng.js';

describe('makeBuckets (kohya make_bucket_resolutions)', () => {
  it('512 / 256..1024 / 64: the hand-computed list', () => {
    // w = 256..1024 step 64, h = min(1024, floor(512² / w / 64) * 64), both orientations, plus 512x512
    expect(makeBuckets(512, 256, 1024, 64)).toEqual([
      [256, 832], [256, 896], [256, 960], [256, 1024], [320, 704], [320, 768], [384, 640], [448, 576], [512, 512],
      [576, 448], [640, 384], [704, 320], [768, 320], [832, 256], [896, 256], [960, 256], [1024, 256],
    ]);
  });

  it('keeps every side a multiple of the step, within bounds and under the area budget', () => {
    for (const [res, min, max, step] of [[768, 320, 1536, 64], [64, 32, 128, 16], [512, 384, 768, 32]] as const) {
      for (const [w, h] of makeBuckets(res, min, max, step)) {
        expect(w % step === 0 && h % step === 0).toBe(true);
        expect(w * h).toBeLessThanOrEqual(res * res);
        if (w !== h) expect(Math.min(w, h) >= min && Math.max(w, h) <= max).toBe(true);
      }
    }
  });

  it('a [width, height] resolution budgets its area (kohya max_reso)', () => {
    const b = makeBuckets([512, 768], 256, 1024, 64);
    expect(b).toContainEqual([576, 576]); // the square: floor(sqrt(512 * 768) / 64) * 64
    expect(b).toContainEqual([576, 640]); // w = 576 -> h = floor(393216 / 576 / 64) * 64
    expect(b).toContainEqual([512, 768]);
    expect(b.every(([w, h]) => w * h <= 512 * 768)).toBe(true);
  });

  it('rejects unusable settings', () => {
    expect(() => makeBuckets(512, 1024, 256, 64)).toThrow(/larger than max/);
    expect(() => makeBuckets(512, 250, 1024, 64)).toThrow(/multiples of the step/);
    expect(() => makeBuckets(0, 256, 1024, 64)).toThrow(/positive integers/);
  });
});

describe('assignBucket (kohya select_bucket)', () => {
  const buckets = makeBuckets(512, 256, 1024, 64);
  it('sends an image to the closest aspect ratio and resizes it to cover', () => {
    expect(assignBucket(1000, 600, buckets)).toMatchObject({ bucket: [640, 384], resized: [640, 384] });
    // 1000/700 = 1.4286: 576/448 = 1.2857 (|e| .143) beats 640/384 = 1.667 (.238); wider -> match heights: 448/700
    expect(assignBucket(1000, 700, buckets)).toMatchObject({ bucket: [576, 448], resized: [640, 448] });
    // tall: 600/1000 = 0.6 vs 384/640 = 0.6 exactly
    expect(assignBucket(600, 1000, buckets)).toMatchObject({ bucket: [384, 640], resized: [384, 640], error: 0 });
    // 512x500 (ar 1.024 > 1): match heights, width int(512 * 512/500 + 0.5) = 524
    expect(assignBucket(512, 500, buckets)).toMatchObject({ bucket: [512, 512], resized: [524, 512] });
  });

  it('prefers a bucket of exactly the image size', () => {
    expect(assignBucket(576, 448, buckets).bucket).toEqual([576, 448]);
  });

  it('square path: torchvision Resize(shorter side), truncating the longer', () => {
    expect(squareAssignment(1000, 600, 512)).toMatchObject({ bucket: [512, 512], resized: [853, 512] });
    expect(squareAssignment(600, 1000, 512)).toMatchObject({ resized: [512, 853] });
    expect(squareAssignment(64, 64, 64)).toMatchObject({ resized: [64, 64] });
  });
});

describe('cropBox', () => {
  it('center: kohya floor or torchvision round-half-even', () => {
    expect(cropBox([853, 512], [512, 512])).toEqual({ left: 170, top: 0, width: 512, height: 512 }); // 341 // 2
    expect(cropBox([855, 512], [512, 512])).toEqual({ left: 171, top: 0, width: 512, height: 512 }); // 343 // 2
    expect(cropBox([855, 512], [512, 512], undefined, 'half-even').left).toBe(172); // round(171.5) = 172
    expect(cropBox([853, 512], [512, 512], undefined, 'half-even').left).toBe(170); // round(170.5) = 170
    expect(cropBox([512, 600], [512, 512], undefined, 'half-even').top).toBe(44);
  });

  it('random: inclusive range, deterministic for a seed, no draw without slack', () => {
    const a = new TorchGenerator(7);
    const b = new TorchGenerator(7);
    const boxes = Array.from({ length: 200 }, () => cropBox([70, 64], [64, 64], a));
    expect(boxes).toEqual(Array.from({ length: 200 }, () => cropBox([70, 64], [64, 64], b)));
    const lefts = new Set(boxes.map((x) => x.left));
    expect([...lefts].sort((x, y) => x - y)).toEqual([0, 1, 2, 3, 4, 5, 6]);
    expect(boxes.every((x) => x.top === 0)).toBe(true);
    const g = new TorchGenerator(1);
    const before = JSON.stringify(g.getState());
    cropBox([64, 64], [64, 64], g);
    expect(JSON.stringify(g.getState())).toBe(before);
  });

  it('refuses a target larger than the image', () => {
    expect(() => cropBox([60, 64], [64, 64])).toThrow(/cannot crop/);
  });
});
