import * as tf from '@tensorflow/tfjs';
import { afterEach, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { WASM_SAFE_BYTES, assertFitsBackend, selectBackend } from '../../src/runtime/backend.js';

describe('backend selection', () => {
  const saved = process.env.SDTUNE_BACKEND;
  afterEach(async () => {
    if (saved === undefined) delete process.env.SDTUNE_BACKEND;
    else process.env.SDTUNE_BACKEND = saved;
    await tf.setBackend('cpu');
  });

  it('defaults to tensorflow when installed, else cpu with an install hint', async () => {
    delete process.env.SDTUNE_BACKEND;
    const info = await selectBackend();
    expect(['tensorflow', 'cpu']).toContain(info.name);
    expect(tf.getBackend()).toBe(info.name);
    if (info.name === 'cpu') expect(info.message).toMatch(/tfjs-node-gpu/);
  });

  it('honours --backend and SDTUNE_BACKEND, and rejects unknown names', async () => {
    process.env.SDTUNE_BACKEND = 'cpu';
    expect((await selectBackend()).name).toBe('cpu');
    await expect(selectBackend('tpu')).rejects.toThrow(/unknown backend "tpu"; valid: tensorflow, cpu, wasm, webgpu/);
    await expect(selectBackend('tpu')).rejects.toBeInstanceOf(SdtuneError);
  });

  it('a missing fast backend is a clear error, not a crash', async () => {
    let hasNode = true;
    try {
      // @ts-ignore optional dependency, absent here
      await import('@tensorflow/tfjs-node');
    } catch {
      hasNode = false;
    }
    if (!hasNode) await expect(selectBackend('tensorflow')).rejects.toThrow(/not installed.*npm install @tensorflow\/tfjs-node-gpu/);
  });

  it('wasm runs and refuses models beyond its safe heap', async () => {
    const info = await selectBackend('wasm');
    expect(info.name).toBe('wasm');
    const y = tf.tidy(() => tf.add(tf.tensor1d([1, 2]), 1).arraySync());
    expect(y).toEqual([2, 3]);
    expect(() => assertFitsBackend(WASM_SAFE_BYTES + 1, 'sd.safetensors')).toThrow(/sd\.safetensors needs .* GB .* wasm backend is limited/);
    expect(() => assertFitsBackend(1e9, 'small')).not.toThrow();
  });
});
