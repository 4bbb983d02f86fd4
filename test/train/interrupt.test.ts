// Interrupting inside a computation: the kernel hook (runtime/interrupt.ts), the tape cleanup after it
// (runtime/memory.ts disposeTape), and the training loop stopping part-way through a step (train/loop.ts).
import * as tf from '@tensorflow/tfjs';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { Interrupted, checkBeforeEveryKernel } from '../../src/runtime/interrupt.js';
import { checkpoint, disposeTape } from '../../src/runtime/memory.js';
import { type Method, resolveConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MODEL = path.join(ROOT, 'checkpoints/tiny-sd-v1');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-interrupt-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const quiet = { quiet: true, log: () => {} };

/** Run fn with a check that counts kernels and stops at kernel number `at` (never when at is Infinity). */
function runUntil<T>(at: number, fn: () => T): { kernels: number; result?: T; error?: unknown } {
  let kernels = 0;
  const off = checkBeforeEveryKernel(() => ++kernels >= at);
  try {
    return { kernels, result: fn() };
  } catch (error) {
    return { kernels, error };
  } finally {
    off();
  }
}

describe('checkBeforeEveryKernel', () => {
  it('runs before every op and every gradient kernel, throws Interrupted instead of the kernel, and uninstalls', () => {
    const w = tf.variable(tf.randomNormal([8, 8], 0, 1, 'float32', 1));
    const x = tf.randomNormal([4, 8], 0, 1, 'float32', 2);
    const loss = () => tf.sum(tf.relu(tf.matMul(x, w))) as tf.Scalar;
    const fwd = runUntil(Infinity, () => tf.tidy(() => loss().dataSync()[0]));
    let kernels = 0;
    const off = checkBeforeEveryKernel(() => (kernels++, false));
    const { value, grads } = tf.variableGrads(loss, [w]);
    off();
    // forward kernels plus the backward's (MatMul and Relu gradients, the sum's broadcast, the seed ones)
    expect(kernels).toBeGreaterThan(fwd.kernels + 3);
    expect(value.dataSync()[0]).toBeCloseTo(fwd.result!, 4);
    tf.dispose([value, ...Object.values(grads)]);
    const stopped = runUntil(1, () => tf.add(x, 1));
    expect(stopped.error).toBeInstanceOf(Interrupted);
    expect(Object.hasOwn(tf.engine(), 'runKernel')).toBe(false); // the prototype method is back
    // two checks at once, removed in any order
    const a = checkBeforeEveryKernel(() => false);
    const b = checkBeforeEveryKernel(() => false);
    a();
    expect(Object.hasOwn(tf.engine(), 'runKernel')).toBe(true);
    b();
    expect(Object.hasOwn(tf.engine(), 'runKernel')).toBe(false);
    tf.dispose([w, x]);
  });

  it('an interrupt anywhere in a taped forward or backward leaves no tensor once disposeTape has run (gradient checkpointing included)', () => {
    const w1 = tf.variable(tf.randomNormal([6, 6], 0, 0.5, 'float32', 3));
    const w2 = tf.variable(tf.randomNormal([6, 6], 0, 0.5, 'float32', 4));
    const x = tf.randomNormal([3, 6], 0, 1, 'float32', 5);
    const block = (h: tf.Tensor) => tf.tanh(tf.matMul(tf.relu(tf.matMul(h, w1)), w2));
    for (const ck of [false, true]) {
      // the loss is the caller's to free when the backward pass throws (engine.gradients holds it only in a local)
      let y: tf.Scalar | undefined;
      const loss = () => {
        const h = ck ? checkpoint(block, [x], [w1, w2]) : block(x);
        return (y = tf.sum(tf.square(ck ? checkpoint(block, [h], [w1, w2]) : block(h))) as tf.Scalar);
      };
      const before = tf.memory().numTensors;
      let total = 0;
      const off = checkBeforeEveryKernel(() => (total++, false));
      const ref = tf.variableGrads(loss, [w1, w2]);
      off();
      tf.dispose([ref.value, ...Object.values(ref.grads)]);
      expect(tf.memory().numTensors).toBe(before);
      for (let at = 1; at <= total; at++) {
        const r = runUntil(at, () => tf.variableGrads(loss, [w1, w2]));
        expect(r.error, `kernel ${at} of ${total}${ck ? ', checkpointed' : ''}`).toBeInstanceOf(Interrupted);
        disposeTape();
        y?.dispose();
        expect(tf.memory().numTensors, `kernel ${at} of ${total}${ck ? ', checkpointed' : ''}`).toBe(before);
        expect(tf.engine().state.activeTape).toBeNull();
      }
    }
    tf.dispose([w1, w2, x]);
  });
});

function config(method: Method, out: string, extra: Record<string, unknown> = {}) {
  return resolveConfig(method, null, {
    'model.path': MODEL,
    'data.dir': path.join(ROOT, method === 'lora' ? 'datasets/shapes' : 'datasets/logo'),
    'data.resolution': 64,
    'train.batch_size': 2,
    'train.gradient_accumulation': 2,
    'train.seed': 11,
    'output.dir': out,
    'output.name': 'run',
    ...(method === 'lora' ? { 'lora.rank': 4, 'lora.alpha': 4, 'train.lr': 1e-3 } : { 'textual_inversion.token': '<my-logo>', 'textual_inversion.init_word': 'star' }),
    ...extra,
  });
}

describe('the training loop stopped inside a step', () => {
  it('discards the partial step, saves the last completed one, leaks nothing, and resumes onto the same curve', async () => {
    const straight = path.join(tmp, 'straight');
    // kernels per step (every one passes the interrupt check), from an uninterrupted run
    let calls = 0;
    const perStep: number[] = [];
    const start = tf.memory().numTensors;
    const full = await train('lora', config('lora', straight, { 'train.max_steps': 4, 'data.cache_latents': false }), {
      ...quiet,
      interrupt: () => (calls++, false),
      onStep: () => perStep.push(calls),
    });
    expect(full.stopped).toBe('done');
    expect(tf.memory().numTensors).toBe(start); // accumulated micro-batch gradients are freed
    const step3 = perStep[2] - perStep[1];
    expect(step3).toBeGreaterThan(100);

    // stop about 3/4 into step 3: its second micro-batch (gradient accumulation 2), one partial gradient accumulated
    const out = path.join(tmp, 'stopped');
    const before = tf.memory().numTensors;
    let n = 0;
    let stopAt = Infinity;
    const logs: string[] = [];
    const r = await train('lora', config('lora', out, { 'train.max_steps': 4, 'data.cache_latents': false }), {
      quiet: true,
      log: (l) => logs.push(l),
      interrupt: () => ++n >= stopAt,
      onStep: (s) => {
        if (s === 2) stopAt = n + Math.round(step3 * 0.75);
      },
    });
    expect(tf.memory().numTensors).toBe(before);
    expect(tf.engine().state.activeTape).toBeNull();
    expect(r).toMatchObject({ steps: 2, stopped: 'interrupted', checkpoint: path.join(out, 'checkpoints', 'step-000002') });
    expect(r.losses).toEqual(full.losses.slice(0, 2));
    expect(logs.at(-1)).toBe(`interrupted at step 2: checkpoint ${r.checkpoint}; continue with --resume ${out} (step 3 was stopped part-way and discarded)`);
    expect(readdirSync(path.join(out, 'checkpoints'))).toEqual(['step-000002']);
    expect(r.files).toEqual([path.join(out, 'run-step-000002.safetensors')]);
    // the checkpoint holds the state before step 3 (its generator and loader draws are not in it): same curve
    const rest = await train('lora', config('lora', out, { 'train.max_steps': 4, 'data.cache_latents': false }), { ...quiet, resume: out });
    expect([...r.losses, ...rest.losses]).toEqual(full.losses);
  });

  it('an AbortSignal fired during a step stops it at the next kernel; a stop before any step completes saves nothing', async () => {
    const out = path.join(tmp, 'signal');
    const ac = new AbortController();
    let n = 0;
    let abortAt = Infinity;
    const before = tf.memory().numTensors;
    const logs: string[] = [];
    const r = await train('textual_inversion', config('textual_inversion', out, { 'train.max_steps': 5 }), {
      quiet: true,
      log: (l) => logs.push(l),
      signal: ac.signal,
      // stands in for a timer firing during an await of an async backend: the abort happens inside step 2
      interrupt: () => {
        if (++n === abortAt) ac.abort();
        return false;
      },
      onStep: (s) => {
        if (s === 1) abortAt = n + 50;
      },
    });
    expect(r).toMatchObject({ steps: 1, stopped: 'interrupted' });
    expect(logs.at(-1)).toMatch(/^interrupted at step 1: checkpoint .*step-000001; .*\(step 2 was stopped part-way and discarded\)$/);
    expect(tf.memory().numTensors).toBe(before);

    const none = path.join(tmp, 'none');
    const logs2: string[] = [];
    const r2 = await train('textual_inversion', config('textual_inversion', none, { 'train.max_steps': 5 }), { quiet: true, log: (l) => logs2.push(l), interrupt: () => true });
    expect(r2).toMatchObject({ steps: 0, stopped: 'interrupted', checkpoint: '', files: [] });
    expect(logs2.at(-1)).toBe('interrupted before the first step finished: nothing to save');
    expect(existsSync(path.join(none, 'checkpoints'))).toBe(false);
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('data.resolution follows the model and is warned about when far above the images', () => {
  it('unset: the UNet sample_size x 8 (64 for the tiny model), saved in config.resolved.yaml; 256 on 64 px images warns', async () => {
    const out = path.join(tmp, 'default-res');
    const c = config('textual_inversion', out, { 'train.max_steps': 1, 'train.gradient_accumulation': 1, 'train.batch_size': 1, 'data.resolution': null });
    expect(c.data.resolution).toBeNull();
    const logs: string[] = [];
    await train('textual_inversion', c, { quiet: true, log: (l) => logs.push(l) });
    expect(readFileSync(path.join(out, 'config.resolved.yaml'), 'utf8')).toMatch(/^ {2}resolution: \[ 64, 64 \]$/m);
    expect(logs.some((l) => l.includes('data.resolution'))).toBe(false);

    const big = path.join(tmp, 'big-res');
    const logs2: string[] = [];
    // the warning comes before the first step: stop there
    await train('textual_inversion', config('textual_inversion', big, { 'data.resolution': 256 }), { quiet: true, log: (l) => logs2.push(l), interrupt: () => true });
    expect(logs2).toContain(
      "warning: data.resolution 256x256 is 4.0x the images' size (8 images, 64x64): every image is upscaled and each step costs as much as at 256x256; to train at the images' size use --resolution 64",
    );
  });
});
