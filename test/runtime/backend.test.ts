import * as tf from '@tensorflow/tfjs';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { WASM_SAFE_BYTES, assertFitsBackend, currentBackend, fitBackend, selectBackend } from '../../src/runtime/backend.js';
import { probeAdapter, probeAdapterIsolated } from '../../src/runtime/webgpu.js';

describe('backend selection', () => {
  const saved = process.env.SDTUNE_BACKEND;
  afterEach(async () => {
    if (saved === undefined) delete process.env.SDTUNE_BACKEND;
    else process.env.SDTUNE_BACKEND = saved;
    await selectBackend(process.env.SDTUNE_TEST_BACKEND ?? 'cpu');
  });

  it('defaults to a hardware WebGPU adapter, then tensorflow, then wasm; never a software adapter', async () => {
    delete process.env.SDTUNE_BACKEND;
    const probe = await probeAdapter();
    const info = await selectBackend();
    expect(tf.getBackend()).toBe(info.name);
    expect(info.auto).toBe(true);
    if (probe.adapter && !probe.adapter.fallback) expect(info.name).toBe('webgpu');
    else expect(['tensorflow', 'wasm']).toContain(info.name);
    if (info.name === 'wasm') {
      // says why there is no GPU backend and what to install
      expect(info.message).toMatch(/^backend: wasm \(CPU, XNNPACK SIMD/);
      expect(info.message).toMatch(/no GPU backend \(/);
      expect(info.message).toMatch(/Vulkan .*`npm install webgpu @tensorflow\/tfjs-backend-webgpu`/);
      if (probe.adapter?.fallback) expect(info.message).toMatch(/only a software WebGPU adapter .* was found/);
    }
  });

  it('the default choice probes Dawn in a child process: the same adapter as in-process, and a hung probe is a reason, not a hang', async () => {
    const [inProc, child] = [await probeAdapter(), await probeAdapterIsolated()];
    expect(child).toEqual(inProc);
    const hung = await probeAdapterIsolated(1);
    expect(hung.adapter).toBeUndefined();
    expect(hung.reason).toMatch(/WebGPU probe .*(timed out after 0.001 s|exited)/);
  });

  it('an automatic wasm choice steps down to cpu for a model over its safe heap; a requested one refuses it', async () => {
    delete process.env.SDTUNE_BACKEND;
    const auto = await selectBackend();
    if (auto.name === 'wasm') {
      expect(await fitBackend(1e9, 'small.safetensors')).toBeUndefined();
      expect(tf.getBackend()).toBe('wasm');
      const line = await fitBackend(WASM_SAFE_BYTES / 2 + 1, 'big.safetensors');
      expect(line).toMatch(/^backend: cpu .*big\.safetensors needs 1\.75 GB of float32 weights, held twice on wasm \(XNNPACK packs a copy of each\), over its safe 3\.5 GB/);
      expect(tf.getBackend()).toBe('cpu');
      expect(currentBackend()!.name).toBe('cpu');
    }
    await selectBackend('wasm');
    await expect(fitBackend(WASM_SAFE_BYTES / 2 + 1, 'big.safetensors')).rejects.toThrow(/big\.safetensors needs .* GB .* wasm backend is limited/);
  });

  it('honours --backend and SDTUNE_BACKEND, and rejects unknown names', async () => {
    process.env.SDTUNE_BACKEND = 'cpu';
    expect((await selectBackend()).name).toBe('cpu');
    await expect(selectBackend('tpu')).rejects.toThrow(/unknown backend "tpu"; valid: webgpu, tensorflow, wasm, cpu/);
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
    expect(() => assertFitsBackend(WASM_SAFE_BYTES / 2 + 1, 'sd.safetensors')).toThrow(/sd\.safetensors needs .* GB .* wasm backend is limited/);
    expect(() => assertFitsBackend(1e9, 'small')).not.toThrow();
  });

  it('SDTUNE_WASM_THREADS=2 runs the threaded build with results identical to one thread, and the process exits', () => {
    const script = [
      "import * as tf from '@tensorflow/tfjs';",
      "import { selectBackend } from './src/runtime/backend.ts';",
      'const b = await selectBackend("wasm");',
      'const a = tf.randomNormal([96, 130], 0, 1, "float32", 1); const w = tf.randomNormal([130, 70], 0, 1, "float32", 2);',
      'const x = tf.randomNormal([2, 12, 12, 24], 0, 1, "float32", 3); const f = tf.randomNormal([3, 3, 24, 40], 0, 1, "float32", 4);',
      'const out = [...tf.matMul(a, w).dataSync(), ...tf.conv2d(x, f, 1, "same").dataSync()];',
      'console.log(JSON.stringify({ line: b.message, sum: Buffer.from(new Float32Array(out).buffer).toString("base64") }));',
    ].join('\n');
    const runWith = (threads: string) => {
      const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        cwd: path.resolve(import.meta.dirname, '../..'),
        env: { ...process.env, SDTUNE_WASM_THREADS: threads },
        encoding: 'utf8',
        timeout: 300_000,
      });
      expect(r.status, r.stderr).toBe(0); // exits by itself: the pool's workers do not keep it alive
      return JSON.parse(r.stdout.trim().split('\n').pop()!) as { line: string; sum: string };
    };
    const one = runWith('1');
    const two = runWith('2');
    expect(one.line).toMatch(/XNNPACK SIMD, 1 thread/);
    expect(two.line).toMatch(/XNNPACK SIMD, 2 threads/);
    expect(two.sum).toBe(one.sum); // bit-identical
  });
});
