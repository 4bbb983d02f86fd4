// Tensor leaks of the training loop, in a file of their own: a count taken beside other tests in the same worker
// would see their tensors too.
import * as tf from '@tensorflow/tfjs';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { train } from '../../src/train/loop.js';
import { config, quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-leak-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('training loop tensor leaks (bundled tiny model)', () => {
  it('a LoRA step leaks no tensors (latent cache off, text encoder LoRA on)', async () => {
    const counts: number[] = [];
    const before = tf.memory().numTensors;
    await train('lora', config('lora', path.join(tmp, 'lora'), { 'train.max_steps': 3, 'data.cache_latents': false, 'lora.text_encoder': true }), {
      ...quiet,
      onStep: () => counts.push(tf.memory().numTensors),
    });
    expect(counts).toHaveLength(3);
    expect(new Set(counts).size).toBe(1); // the same count after every step
    expect(tf.memory().numTensors).toBe(before); // and everything freed at the end
  });

  it('a textual-inversion step leaks no tensors once the latent cache is full (8 images, batch 4: one epoch = 2 steps)', async () => {
    const counts: number[] = [];
    const before = tf.memory().numTensors;
    await train('textual_inversion', config('textual_inversion', path.join(tmp, 'ti'), { 'train.max_steps': 4, 'train.batch_size': 4 }), {
      ...quiet,
      onStep: () => counts.push(tf.memory().numTensors),
    });
    expect(counts).toHaveLength(4);
    expect(counts[1] - counts[0]).toBeGreaterThan(0); // the second step of the first epoch still fills the cache
    expect(new Set(counts.slice(1)).size).toBe(1); // then the count stays put
    expect(tf.memory().numTensors).toBe(before); // cache and all freed at the end
  });
});
