// The WebGPU guards, on the real Dawn device (the webgpu project of vitest.config.ts; a software adapter where no GPU).
import * as tf from '@tensorflow/tfjs';
import { describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { getAttentionChunkElements } from '../../src/models/layers.js';
import { currentBackend } from '../../src/runtime/backend.js';
import { assertDeviceHealthy, webgpuBindingLimit } from '../../src/runtime/webgpu.js';

// outside the webgpu project (vitest.config.ts) these are reported as skipped: they need a WebGPU adapter
const onWebgpu = tf.getBackend() === 'webgpu';

describe.skipIf(!onWebgpu)('webgpu backend guards', () => {
  it('reports the adapter and caps attention chunks at the binding limit', () => {
    const info = currentBackend()!;
    expect(info.name).toBe('webgpu');
    expect(info.adapter!.maxBindingBytes).toBe(webgpuBindingLimit());
    expect(info.message).toContain(info.adapter!.description || info.adapter!.vendor);
    expect(info.message).toMatch(info.adapter!.fallback ? /software adapter/ : /GPU/);
    expect(getAttentionChunkElements()).toBeLessThanOrEqual(webgpuBindingLimit() / 4);
  });

  it('a tensor over maxStorageBufferBindingSize is a clear error naming the kernel, shape and limit, never zeros', async () => {
    const limit = webgpuBindingLimit();
    const n = Math.floor(limit / 4) + 1024; // just over the limit
    const before = tf.memory().numTensors;
    let err: unknown;
    try {
      const y = tf.fill([n], 1.5); // the output buffer is already too large to bind
      await y.data();
      y.dispose();
    } catch (e) {
      err = e;
    }
    expect(tf.memory().numTensors).toBe(before);
    expect(err).toBeInstanceOf(SdtuneError);
    expect((err as Error).message).toContain(`Fill: output [${n}] needs ${(4 * n).toLocaleString('en-US')} bytes`);
    expect((err as Error).message).toContain(`over this WebGPU device's maxStorageBufferBindingSize of ${limit.toLocaleString('en-US')} bytes`);
    // just under the limit works and is right
    const ok = tf.fill([Math.floor(limit / 4) - 1024], 1.5);
    const y = tf.mul(ok, 2);
    const d = await y.data();
    expect(d[0]).toBe(3);
    expect(d[d.length - 1]).toBe(3);
    tf.dispose([ok, y]);
  });

  it('a device validation error surfaces as an SdtuneError at the next check', async () => {
    const device = (tf.backend() as unknown as { device: { createBuffer(d: { size: number; usage: number }): unknown } }).device;
    device.createBuffer({ size: 16, usage: 0xffffff }); // invalid usage flags: a validation error on the device queue
    await new Promise((r) => setTimeout(r, 50));
    expect(() => assertDeviceHealthy()).toThrow(/WebGPU device reported an error.*(usage|Usage)/);
    expect(() => assertDeviceHealthy()).not.toThrow(); // reported once
  });
});
