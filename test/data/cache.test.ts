import { readdir } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { LatentCache, TextCache, sampleLatents, type LatentKey } from '../../src/data/cache.js';
import { scanDataset } from '../../src/data/dataset.js';
import { DataLoader, disposeBatch } from '../../src/data/loader.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { tempDir, writeImage } from './fixtures.js';

let dir: string;
let cleanup: () => Promise<void>;
beforeEach(async () => ({ dir, cleanup } = await tempDir()));
afterEach(() => cleanup());

/** A stand-in VAE: mean = 2x2 average pool of the pixels, std = |mean| / 10 + 0.01; counts its calls. */
function fakeEncoder() {
  const calls = { n: 0 };
  const encode = (px: tf.Tensor4D) => {
    calls.n++;
    const mean = tf.avgPool(px, 2, 2, 'valid');
    return { mean, std: mean.abs().div(10).add(0.01) as tf.Tensor4D };
  };
  return { encode, calls };
}
const pixels = (v: number) => async () => tf.fill([1, 4, 4, 3], v) as tf.Tensor4D;
const key = (o: Partial<LatentKey> = {}): LatentKey => ({ hash: 'ab'.repeat(32), resized: [4, 4], crop: { left: 0, top: 0, width: 4, height: 4 }, flip: false, ...o });

describe('LatentCache', () => {
  it('hits for the same key, misses for another crop, flip or image', async () => {
    const start = tf.memory().numTensors;
    const { encode, calls } = fakeEncoder();
    const cache = new LatentCache(encode);
    const a = await cache.get(key(), pixels(0.5));
    expect(a.mean.shape).toEqual([1, 2, 2, 3]);
    expect(Array.from(a.mean.dataSync())).toEqual(new Array(12).fill(0.5));
    expect(await cache.get(key(), pixels(9))).toBe(a);
    await cache.get(key({ flip: true }), pixels(0.1));
    await cache.get(key({ crop: { left: 1, top: 0, width: 4, height: 4 }, resized: [5, 4] }), pixels(0.2));
    await cache.get(key({ hash: 'cd'.repeat(32) }), pixels(0.3));
    await Promise.all([cache.get(key({ hash: 'ef'.repeat(32) }), pixels(0.4)), cache.get(key({ hash: 'ef'.repeat(32) }), pixels(0.4))]);
    expect([cache.hits, cache.misses, calls.n, cache.size]).toEqual([1, 5, 5, 5]);
    cache.dispose();
    expect(tf.memory().numTensors).toBe(start);
  });

  it('persists one safetensors file per image and reads it back lazily', async () => {
    const cacheDir = path.join(dir, 'latents');
    const first = fakeEncoder();
    const c1 = new LatentCache(first.encode, { dir: cacheDir, encoderId: 'vae-1' });
    const m1 = Array.from((await c1.get(key(), pixels(0.25))).mean.dataSync());
    await c1.get(key({ flip: true }), pixels(-0.5));
    await c1.get(key({ hash: 'cd'.repeat(32) }), pixels(0.75));
    c1.dispose();
    expect((await readdir(cacheDir)).sort()).toEqual([`${'ab'.repeat(32)}.safetensors`, `${'cd'.repeat(32)}.safetensors`]);
    const f = await SafetensorsFile.open(path.join(cacheDir, `${'ab'.repeat(32)}.safetensors`));
    expect(f.keys().sort()).toEqual(['4x4+0,0,4x4+flip.mean', '4x4+0,0,4x4+flip.std', '4x4+0,0,4x4.mean', '4x4+0,0,4x4.std']);
    expect(f.metadata.encoder).toBe('vae-1');
    await f.close();

    const start = tf.memory().numTensors;
    const second = fakeEncoder();
    const c2 = new LatentCache(second.encode, { dir: cacheDir, encoderId: 'vae-1' });
    const back = await c2.get(key(), pixels(0));
    expect(Array.from(back.mean.dataSync())).toEqual(m1);
    expect(Array.from(back.std.dataSync())).toEqual(new Array(12).fill(Math.fround(Math.fround(0.025) + Math.fround(0.01))));
    await c2.get(key({ flip: true }), pixels(0));
    expect([second.calls.n, c2.diskHits, c2.misses]).toEqual([0, 2, 0]);
    // a new variant is added to the file, the old ones are kept
    await c2.get(key({ crop: { left: 0, top: 1, width: 4, height: 4 }, resized: [4, 5] }), pixels(0.1));
    c2.dispose();
    expect(tf.memory().numTensors).toBe(start);
    const g = await SafetensorsFile.open(path.join(cacheDir, `${'ab'.repeat(32)}.safetensors`));
    expect(g.keys().length).toBe(6);
    await g.close();

    const other = fakeEncoder();
    const c3 = new LatentCache(other.encode, { dir: cacheDir, encoderId: 'vae-2' });
    await c3.get(key(), pixels(0));
    expect(other.calls.n).toBe(1); // another encoder's file does not count
    c3.dispose();
  });

  it('rejects a malformed encoder output without leaking', async () => {
    const start = tf.memory().numTensors;
    const cache = new LatentCache((px) => ({ mean: px, std: tf.ones([1, 1, 1, 1]) as tf.Tensor4D }));
    await expect(cache.get(key(), pixels(1))).rejects.toThrow(/latent encoder returned mean \[1,4,4,3\] \/ std \[1,1,1,1\]/);
    expect(tf.memory().numTensors).toBe(start);
  });

  it('sampleLatents = (mean + std * randn) * scale, noise drawn in torch NCHW order', () => {
    const mean = tf.fill([1, 2, 2, 4], 1) as tf.Tensor4D;
    const std = tf.fill([1, 2, 2, 4], 0.5) as tf.Tensor4D;
    const start = tf.memory().numTensors;
    const z = sampleLatents({ mean, std }, new TorchGenerator(0), 0.18215);
    const noise = new TorchGenerator(0).randn([1, 4, 2, 2]); // NCHW
    const d = z.dataSync();
    for (let c = 0; c < 4; c++) for (let p = 0; p < 4; p++) {
      expect(d[p * 4 + c]).toBeCloseTo((1 + 0.5 * noise[c * 4 + p]!) * 0.18215, 6);
    }
    z.dispose();
    expect(tf.memory().numTensors).toBe(start);
    tf.dispose([mean, std]);
  });

  it('feeds the loader: batches carry latent mean/std instead of pixels, without leaks', async () => {
    for (let i = 0; i < 3; i++) await writeImage(path.join(dir, 'img', `${i}.png`), 8, 8, i, `c${i}`);
    const items = await scanDataset(path.join(dir, 'img'), { captionExtension: '.txt', repeats: 1 });
    const start = tf.memory().numTensors;
    const { encode, calls } = fakeEncoder();
    const cache = new LatentCache(encode);
    const loader = new DataLoader(items, { batchSize: 2, resolution: 8, seed: 0, latentCache: cache });
    for (let s = 0; s < 2 * loader.stepsPerEpoch; s++) {
      const b = await loader.next();
      expect(b.pixels).toBeUndefined();
      expect(b.latents!.mean.shape).toEqual([b.items.length, 4, 4, 3]);
      disposeBatch(b);
    }
    expect([calls.n, cache.hits]).toEqual([3, 3]); // center crop, no flip: one variant per image, second epoch all hits
    cache.dispose();
    expect(tf.memory().numTensors).toBe(start);
  });
});

describe('TextCache', () => {
  it('encodes each caption once and frees everything on dispose', () => {
    const start = tf.memory().numTensors;
    let n = 0;
    const cache = new TextCache((c) => (n++, tf.fill([1, 77, 8], c.length)));
    const a = cache.get('a dog');
    expect(cache.get('a dog')).toBe(a);
    cache.get('');
    expect([n, cache.hits, cache.misses, cache.size]).toEqual([2, 1, 2, 2]);
    expect(a.dataSync()[0]).toBe(5);
    cache.dispose();
    expect(tf.memory().numTensors).toBe(start);
  });
});
