import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeBuckets } from '../../src/data/buckets.js';
import { scanDataset, type DataItem } from '../../src/data/dataset.js';
import { DataLoader, disposeBatch, type Batch, type LoaderOptions } from '../../src/data/loader.js';
import { tempDir, writeImage } from './fixtures.js';

let dir: string;
let cleanup: () => Promise<void>;
let items: DataItem[];
// res 64, step 16: buckets include 64x64, 48x80 and 80x48
const buckets = makeBuckets(64, 32, 128, 16);

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir());
  const specs: [string, number, number][] = [
    ['sq1.png', 64, 64], ['sq2.png', 64, 64], ['sq3.png', 70, 64], ['sq4.png', 64, 64], ['sq5.png', 64, 64],
    ['3_wide/w1.png', 96, 64], ['3_wide/w2.png', 96, 60],
    ['tall.png', 64, 96],
  ];
  for (const [i, [name, w, h]] of specs.entries()) await writeImage(path.join(dir, name), w, h, i, `image ${i}, tag a, tag b, tag c`);
  items = await scanDataset(dir, { captionExtension: '.txt', repeats: 2 });
});
afterAll(() => cleanup());

const opts = (o: Partial<LoaderOptions> = {}): LoaderOptions => ({ batchSize: 3, resolution: 64, buckets, seed: 1234, randomCrop: true, flip: true, caption: { shuffle: true, keepTokens: 1 }, ...o });

/** What a batch amounts to, for comparing runs (tensors disposed). */
async function take(l: DataLoader, n: number): Promise<string[]> {
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const b: Batch = await l.next();
    const px = b.pixels!.dataSync();
    let sum = 0;
    for (let k = 0; k < px.length; k++) sum += px[k]! * ((k % 97) + 1);
    out.push(`${b.epoch}/${b.position} ${b.bucket.join('x')} ${b.items.map((it) => path.basename(it.path)).join(',')} | ${b.captions.join(' | ')} | ${sum.toFixed(3)}`);
    disposeBatch(b);
  }
  return out;
}

describe('DataLoader', () => {
  it('computes steps per epoch from the buckets and repeats', () => {
    const l = new DataLoader(items, opts());
    // 64x64: 5 images x2 = 10 -> 4 batches; 80x48: w1, w2 x3 = 6 -> 2; 48x80: tall x2 = 2 -> 1
    expect(l.bucketSummary()).toEqual([
      { bucket: [48, 80], images: 1, samples: 2, batches: 1 },
      { bucket: [64, 64], images: 5, samples: 10, batches: 4 },
      { bucket: [80, 48], images: 2, samples: 6, batches: 2 },
    ]);
    expect(l.stepsPerEpoch).toBe(7);
    expect(l.describe()).toMatch(/^7 steps per epoch = .*batch 3.*3 bucket/);
    expect(new DataLoader(items, opts({ buckets: undefined, batchSize: 4 })).stepsPerEpoch).toBe(Math.ceil(18 / 4));
  });

  it('yields every item repeats times per epoch, in single-bucket batches', async () => {
    const l = new DataLoader(items, opts());
    for (let epoch = 0; epoch < 2; epoch++) {
      const seen = new Map<string, number>();
      const order: string[] = [];
      for (let s = 0; s < l.stepsPerEpoch; s++) {
        const b = await l.next();
        expect([b.epoch, b.position]).toEqual([epoch, s]);
        expect(b.pixels!.shape).toEqual([b.items.length, b.bucket[1], b.bucket[0], 3]);
        expect(b.items.length).toBeLessThanOrEqual(3);
        for (const it of b.items) seen.set(it.path, (seen.get(it.path) ?? 0) + 1);
        order.push(b.items.map((it) => it.path).join());
        disposeBatch(b);
      }
      expect(new Map(items.map((it) => [it.path, it.repeats]))).toEqual(seen);
      expect(l.epoch).toBe(epoch + 1);
    }
    expect(tf.memory().numTensors).toBe(0);
  });

  it('is deterministic for a seed and differs across seeds and epochs', async () => {
    const a = await take(new DataLoader(items, opts()), 14);
    const b = await take(new DataLoader(items, opts()), 14);
    const c = await take(new DataLoader(items, opts({ seed: 99 })), 14);
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    expect(a.slice(0, 7).map((s) => s.slice(4))).not.toEqual(a.slice(7).map((s) => s.slice(4)));
  });

  it('resumes from a JSON state with exactly the remaining sequence (mid-epoch and at an epoch boundary)', async () => {
    for (const cut of [4, 7]) {
      const ref = new DataLoader(items, opts());
      const all = await take(ref, cut + 9);
      const first = new DataLoader(items, opts());
      await take(first, cut);
      const state = JSON.parse(JSON.stringify(first.getState()));
      const resumed = DataLoader.fromState(items, opts({ seed: 5 }), state); // the state's generator wins over the seed
      expect(await take(resumed, 9)).toEqual(all.slice(cut));
    }
  });

  it('refuses a state from another dataset or batch size', async () => {
    const state = new DataLoader(items, opts()).getState();
    expect(() => DataLoader.fromState(items.slice(1), opts(), state)).toThrow(/dataset, its buckets or the batch size changed/);
    expect(() => DataLoader.fromState(items, opts({ batchSize: 2 }), state)).toThrow(/changed/);
    expect(() => DataLoader.fromState(items, opts(), { ...state, position: 99 })).toThrow(/invalid data loader state/);
  });

  it('without buckets, a [width, height] resolution: every image covers and is cropped to it (kohya)', async () => {
    const l = new DataLoader(items, opts({ buckets: undefined, resolution: [48, 80], batchSize: 8 }));
    expect(l.bucketSummary()).toEqual([{ bucket: [48, 80], images: 8, samples: 18, batches: 3 }]);
    const b = await l.next();
    expect(b.pixels!.shape.slice(1)).toEqual([80, 48, 3]);
    disposeBatch(b);
  });

  it('without buckets: every batch is resolution x resolution', async () => {
    const l = new DataLoader(items, opts({ buckets: undefined, batchSize: 4, randomCrop: false, flip: false }));
    for (let s = 0; s < l.stepsPerEpoch; s++) {
      const b = await l.next();
      expect(b.pixels!.shape.slice(1)).toEqual([64, 64, 3]);
      disposeBatch(b);
    }
  });
});
