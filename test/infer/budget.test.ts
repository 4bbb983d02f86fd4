// The sampling memory estimate against measured peaks (unique tensor bytes) on the bundled tiny model, the refusal
// of sizes that cannot fit with the sizes that do, and generate() with nothing but a prompt.
import * as tf from '@tensorflow/tfjs';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { MAX_IMAGE_SIDE, assertSamplingFits, estimateSampling, trainingFloorBytes, unetPeakBytes, vaeDecodePeakBytes, weightsBytes } from '../../src/infer/budget.js';
import { generate, resolveGenerateOptions } from '../../src/infer/pipeline.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { getAttentionChunkElements, setAttentionChunkElements } from '../../src/models/layers.js';
import { unet } from '../../src/models/unet.js';
import { vaeDecode } from '../../src/models/vae.js';
import { measurePeak } from '../../src/runtime/memory.js';
import { planSampler, samplerFromConfig } from '../../src/schedulers/index.js';
import { resolveConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';

let m: LoadedModel;
beforeAll(async () => {
  m = await loadModel('checkpoints/tiny-sd-v1');
});
afterAll(() => disposeModel(m));

/** The estimate must be an upper bound of the measurement, and not a loose one. */
const expectBound = (estimate: number, measured: number) => {
  expect(measured).toBeGreaterThan(0);
  expect(estimate).toBeGreaterThanOrEqual(measured);
  expect(estimate).toBeLessThanOrEqual(2 * measured);
};

describe('sampling memory estimate vs measurePeak (tiny-sd-v1)', () => {
  // 64x64 (latent 8: the VAE decode is the peak) and 128x128 with a batch of 4 (the UNet on 8 latents of 16x16 is)
  for (const [size, batch] of [[64, 1], [128, 4]] as const) {
    it(`generate() at ${size}x${size}, batch ${batch}, guidance on: estimate within [1, 2] x the measured peak`, async () => {
      const e = estimateSampling(m, { width: size, height: size, batchSize: batch, cfg: true });
      const r = await measurePeak(() => generate(m, { prompt: 'a red circle', steps: 2, width: size, height: size, batchSize: batch, seed: 0 }));
      expectBound(e.peakBytes - e.weightsBytes, r.peakBytes);
      expect(r.netBytes).toBe(0);
    });
  }

  it('each network on its own: UNet (attention-score regime and, with small chunks, the feed-forward regime) and VAE decode', async () => {
    const chunk = getAttentionChunkElements();
    try {
      for (const [lat, bu, ch] of [[16, 2, chunk], [16, 2, 1 << 18]] as const) {
        setAttentionChunkElements(ch);
        const u = await measurePeak(() =>
          tf.tidy(() => void unet(m.unet!.params, m.unet!.config, tf.zeros([bu, lat, lat, 4]) as tf.Tensor4D, 500, tf.zeros([bu, 77, 32]) as tf.Tensor3D)),
        );
        // the factors themselves are tight (within 5%); the 1.25 margin is applied to the whole sampling estimate
        const est = unetPeakBytes(m.unet!.config, bu, lat, lat, ch).peak;
        expect(est / u.peakBytes).toBeGreaterThan(0.9);
        expect(est / u.peakBytes).toBeLessThan(1.1);
      }
    } finally {
      setAttentionChunkElements(chunk);
    }
    const v = await measurePeak(() => tf.tidy(() => void vaeDecode(m.vae!.params, m.vae!.config, tf.zeros([1, 16, 16, 4]) as tf.Tensor4D)));
    const est = vaeDecodePeakBytes(m.vae!.config, 1, 16, 16).peak;
    expect(est / v.peakBytes).toBeGreaterThan(0.9);
    expect(est / v.peakBytes).toBeLessThan(1.1);
  });

  it('the estimate grows with size and batch, and guidance doubles the UNet part', () => {
    const at = (w: number, b: number, cfg: boolean) => estimateSampling(m, { width: w, height: w, batchSize: b, cfg });
    expect(at(128, 1, true).peakBytes).toBeGreaterThan(at(64, 1, true).peakBytes);
    expect(at(256, 2, true).unetBytes).toBeGreaterThan(at(256, 1, true).unetBytes);
    expect(at(256, 1, true).unetBytes).toBe(at(256, 2, false).unetBytes);
    expect(at(64, 1, true).weightsBytes).toBe(weightsBytes(m));
  });
});

describe('refusing what cannot fit', () => {
  const err = (f: () => unknown): SdtuneError => {
    try {
      f();
    } catch (e) {
      expect(e).toBeInstanceOf(SdtuneError);
      return e as SdtuneError;
    }
    throw new Error('expected an error');
  };

  it('names the size, the estimate, the budget, the largest square that fits and the batch that fits', () => {
    const w = weightsBytes(m);
    const s = { width: 256, height: 256, batchSize: 4, cfg: true };
    // a budget between the 2-image and the 3-image estimates at 256x256
    const e2 = estimateSampling(m, { ...s, batchSize: 2 }).peakBytes;
    const e3 = estimateSampling(m, { ...s, batchSize: 3 }).peakBytes;
    const budget = { bytes: (e2 + e3) / 2, maxTensorBytes: Infinity, weightCopies: 1, what: 'the test budget' };
    const e = err(() => assertSamplingFits(m, s, budget));
    expect(e.kind).toBe('usage');
    expect(e.exitCode).toBe(2);
    expect(e.message).toMatch(/^256x256, batch 4 with guidance needs an estimated [\d.]+ MB \(weights [\d.]+ MB, activations [\d.]+ MB\) but the test budget allows [\d.]+ MB; /);
    expect(e.message).toMatch(/at 256x256 a batch of 2 fits$/);
    const side = Number(/largest square size that fits at batch 4 is (\d+)x\1/.exec(e.message)![1]);
    expect(side % 8).toBe(0);
    expect(estimateSampling(m, { ...s, width: side, height: side }).peakBytes).toBeLessThanOrEqual(budget.bytes);
    expect(estimateSampling(m, { ...s, width: side + 8, height: side + 8 }).peakBytes).toBeGreaterThan(budget.bytes);
    expect(e.message).not.toMatch(/--/);
    // a size that fits passes and returns its estimate
    expect(assertSamplingFits(m, { ...s, batchSize: 2 }, budget).estimate.peakBytes).toBe(e2);
    // nothing fits when the weights alone exceed the budget
    const none = err(() => assertSamplingFits(m, s, { bytes: w, maxTensorBytes: Infinity, weightCopies: 1, what: 'x' }));
    expect(none.message).toMatch(/no size fits at batch 4; no batch size fits at 256x256$/);
    // a backend that keeps a second copy of the weights (wasm's packed ones) needs that much more
    const tight = { bytes: e2 + w / 2, maxTensorBytes: Infinity, weightCopies: 1, what: 'y' };
    expect(assertSamplingFits(m, { ...s, batchSize: 2 }, tight).onBackend).toBe(e2);
    const twice = err(() => assertSamplingFits(m, { ...s, batchSize: 2 }, { ...tight, weightCopies: 2 }));
    expect(twice.message).toMatch(/needs an estimated [\d.]+ MB \(weights [\d.]+ MB x 2 with the backend's packed copy, activations/);
  });

  it("a device's per-tensor limit (WebGPU binding size) is checked too", () => {
    const e = err(() => assertSamplingFits(m, { width: 512, height: 512, cfg: true }, { bytes: Infinity, maxTensorBytes: 1 << 20, weightCopies: 1, what: 'the WebGPU device' }));
    expect(e.message).toMatch(/needs a [\d.]+ MB tensor but the WebGPU device binds at most 1\.0 MB per tensor/);
  });

  it('absurd and malformed sizes are refused before anything is allocated, naming the option without CLI flags', async () => {
    const before = tf.memory().numTensors;
    for (const [opts, re] of [
      [{ width: 1_000_000 }, new RegExp(`^width must be a multiple of 8 from 8 to ${MAX_IMAGE_SIDE}, got 1000000$`)],
      [{ width: 100 }, /^width must be a multiple of 8 from 8 to \d+, got 100$/],
      [{ height: 0 }, /^height must be a multiple of 8 .* got 0$/],
      [{ batchSize: 0 }, /^batchSize must be a positive integer, got 0$/],
      [{ cfg: -1 }, /^cfg must be a number >= 0, got -1$/],
      [{ strength: 2 }, /^strength must be in \(0, 1\], got 2$/],
    ] as const) {
      const e = await generate(m, { prompt: 'x', ...opts }).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(SdtuneError);
      expect((e as SdtuneError).message).toMatch(re);
      expect((e as SdtuneError).message).not.toContain('--');
    }
    // 16384x16384 passes the bound but not the memory check: refused by the estimate before the UNet or the VAE allocate anything
    const big = await generate(m, { prompt: 'x', width: MAX_IMAGE_SIDE, height: MAX_IMAGE_SIDE }).catch((x: unknown) => x);
    expect((big as SdtuneError).message).toMatch(/^16384x16384, batch 1 with guidance needs an estimated [\d.]+ [GT]B .*; the largest square size that fits at batch 1 is \d+x\d+; no batch size fits at 16384x16384$/);
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('generate() as a library call', () => {
  it('works with only a prompt: the UNet sample size x 8, 30 steps, the scheduler config, a random seed, one image', async () => {
    const before = tf.memory().numTensors;
    const r = await generate(m, { prompt: 'a red circle' });
    expect(tf.memory().numTensors).toBe(before);
    expect(r.images).toHaveLength(1);
    expect([r.images[0].width, r.images[0].height]).toEqual([64, 64]); // sample_size 8
    expect(r.images[0].data).toHaveLength(64 * 64 * 3);
    expect(r.images[0].data.every((v) => v >= 0 && v <= 1)).toBe(true);
    // the scheduler config's sampler (PNDM here: 30 steps are 31 model calls) at 30 steps
    expect(r.timesteps).toEqual(Array.from(planSampler(samplerFromConfig(m.schedulerConfig), m.schedulerConfig, 30).timesteps));
    expect(r.seeds).toHaveLength(1);
    expect(Number.isInteger(r.seeds[0]) && r.seeds[0] >= 0).toBe(true);
    expect(r.memory?.peakBytes).toBeGreaterThan(weightsBytes(m));
  });

  it('resolveGenerateOptions: the defaults generate() and sampleToFiles() share; an init image sets the size', () => {
    const d = resolveGenerateOptions(m, { prompt: 'x', seed: 3 });
    expect(d).toMatchObject({ sampler: samplerFromConfig(m.schedulerConfig), steps: 30, cfg: 7.5, width: 64, height: 64, seed: 3, batchSize: 1 });
    const img = { data: new Float32Array(48 * 32 * 3), width: 48, height: 32 };
    expect(resolveGenerateOptions(m, { prompt: 'x', initImage: img })).toMatchObject({ width: 48, height: 32 });
    expect(resolveGenerateOptions(m, { prompt: 'x', seed: -1 }).seed).toBeGreaterThanOrEqual(0); // -1: random, as the CLI
  });
});

describe('training: a floor on the memory of a step', () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-budget-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));
  const config = (extra: Record<string, unknown>) =>
    resolveConfig('lora', null, {
      'model.path': 'checkpoints/tiny-sd-v1',
      'data.dir': 'datasets/shapes',
      'data.resolution': 64,
      'train.batch_size': 2,
      'train.max_steps': 1,
      'lora.rank': 4,
      'lora.alpha': 4,
      'output.dir': mkdtempSync(path.join(tmp, 'run-')),
      'output.name': 'run',
      ...extra,
    });
  const quiet = { quiet: true, log: () => {} };

  it('is below the measured peak of a LoRA step, with and without gradient checkpointing, and not far below', async () => {
    for (const gc of [false, true]) {
      const r = await measurePeak(() => train('lora', config({ 'train.gradient_checkpointing': gc }), quiet));
      const floor = trainingFloorBytes(m, [64, 64], 2, gc); // the run loads its own copy of the weights: both count them
      expect(floor).toBeLessThanOrEqual(r.peakBytes);
      expect(floor).toBeGreaterThan(r.peakBytes / 8);
    }
  });

  it('a resolution that cannot fit is refused before any data is read', async () => {
    const e = await train('lora', config({ 'data.resolution': 4096, 'data.dir': path.join(tmp, 'no-such-folder') }), quiet).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(SdtuneError);
    expect((e as SdtuneError).message).toMatch(
      /^training at 4096x4096, batch 2 needs at least [\d.]+ [GT]B \(.*\) but the wasm backend \(safe heap 3\.5 GB\) allows 3\.50 GB; lower data\.resolution or train\.batch_size, or set train\.gradient_checkpointing$/,
    );
  });
});
