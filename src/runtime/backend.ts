/**
 * Backend selection. Order when nothing is requested:
 *   1. webgpu on a real (hardware) adapter: Dawn + tfjs-backend-webgpu, both optional dependencies;
 *   2. tensorflow: tfjs-node-gpu, then tfjs-node, where installed (frozen upstream at CUDA 11.2);
 *   3. wasm (XNNPACK, SIMD) with the training kernels it lacks registered from our side (runtime/wasm-kernels.ts),
 *      for models that fit its safe heap (its 32-bit heap corrupts data silently near 4 GB);
 *   4. cpu (pure TypeScript, ~1 GFLOP/s).
 * A software WebGPU adapter (lavapipe, SwiftShader) is never picked by default: it is slower than wasm.
 * Every choice is reported in one line saying what runs and what to install for something faster.
 */
import * as tf from '@tensorflow/tfjs';
import os from 'node:os';
import { SdtuneError } from '../errors.js';
import { setDeviceMaxTensorElements } from '../models/layers.js';
import { type AdapterSummary, activateWebgpu, adapterName, probeAdapterIsolated } from './webgpu.js';

import { BACKENDS, type BackendName } from './backend-names.js';

export { BACKENDS, type BackendName } from './backend-names.js';

export interface BackendInfo {
  name: BackendName;
  /** npm package that provided it */
  provider: string;
  /** one line for the user: what runs, and how to get something faster when it is slow */
  message: string;
  /** chosen by the default order rather than asked for (an automatic wasm choice may step down to cpu for a big model) */
  auto: boolean;
  /** the WebGPU adapter, on webgpu */
  adapter?: AdapterSummary;
}

/** Max bytes of tensors we allow on wasm: its 32-bit heap corrupts data silently near 4 GB. */
export const WASM_SAFE_BYTES = 3.5 * 1024 ** 3;
/** wasm holds each weight twice: the tensor and the copy XNNPACK packs for its convolution/matmul operator */
export const WASM_WEIGHT_COPIES = 2;

const GPU_HINT =
  'for a GPU: a Vulkan (Linux), Metal (macOS) or D3D12 (Windows) driver for your GPU, used through the `webgpu` package (installed with sdtune unless optional packages were skipped: `npm install webgpu @tensorflow/tfjs-backend-webgpu`)';
const TF_HINT =
  '`npm install @tensorflow/tfjs-node-gpu` (CUDA 11.2 + cuDNN 8.1) or `npm install @tensorflow/tfjs-node` (CPU, libtensorflow)';

let current: BackendInfo | undefined;

async function tryImport(pkg: string): Promise<boolean> {
  try {
    await import(pkg);
    return true;
  } catch {
    return false;
  }
}

async function activate(name: string): Promise<boolean> {
  try {
    const ok = await tf.setBackend(name);
    if (ok) await tf.ready();
    return ok;
  } catch {
    return false;
  }
}

async function useTensorflow(auto: boolean): Promise<BackendInfo | undefined> {
  for (const pkg of ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node']) {
    if ((await tryImport(pkg)) && (await activate('tensorflow'))) {
      return { name: 'tensorflow', provider: pkg, auto, message: `backend: tensorflow (${pkg})` };
    }
  }
  return undefined;
}

/**
 * Threads for wasm from SDTUNE_WASM_THREADS (a number, or `auto` = every core). Opt-in: upstream disables threads
 * in Node and runtime/wasm-threads.ts re-enables them from outside the package; on a busy machine they bring nothing.
 */
function wasmThreadsWanted(): number {
  const v = (process.env.SDTUNE_WASM_THREADS ?? '').trim().toLowerCase();
  if (!v || v === '1') return 1;
  if (v === 'auto') return os.availableParallelism();
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new SdtuneError('backend', `SDTUNE_WASM_THREADS must be a positive integer or "auto", got "${v}"`);
  return n;
}

let wasmThreads = 1;

async function useWasm(auto: boolean, why: string): Promise<BackendInfo | undefined> {
  if (!(await tryImport('@tensorflow/tfjs-backend-wasm'))) return undefined;
  const want = wasmThreadsWanted();
  let threadNote = '';
  if (want > 1) {
    const r = await (await import('./wasm-threads.js')).enableWasmThreads(want);
    if ('reason' in r) threadNote = ` (threads unavailable: ${r.reason})`;
    else wasmThreads = r.threads;
  }
  if (!(await activate('wasm'))) return undefined;
  (await import('./wasm-kernels.js')).registerWasmKernels();
  const threads = wasmThreads > 1 ? `${wasmThreads} threads` : `1 thread${threadNote || '; SDTUNE_WASM_THREADS=auto for more'}`;
  return {
    name: 'wasm',
    provider: '@tensorflow/tfjs-backend-wasm',
    auto,
    message: `backend: wasm (CPU, XNNPACK SIMD, ${threads}; models over ${(WASM_SAFE_BYTES / WASM_WEIGHT_COPIES / 1024 ** 3).toFixed(2)} GB use cpu)${why ? `; ${why}` : ''}`,
  };
}

async function useCpu(auto: boolean, why: string): Promise<BackendInfo> {
  if (!(await activate('cpu'))) throw new SdtuneError('backend', 'the cpu backend failed to initialise');
  return { name: 'cpu', provider: '@tensorflow/tfjs-backend-cpu', auto, message: `backend: cpu (pure TypeScript, slow)${why ? `; ${why}` : ''}` };
}

async function useWebgpu(auto: boolean): Promise<{ info?: BackendInfo; reason: string }> {
  if (auto) {
    // probe (in a child process) before starting tfjs' backend: a software adapter is skipped without loading Dawn
    const p = await probeAdapterIsolated();
    if (!p.adapter) return { reason: p.reason ?? 'no WebGPU adapter' };
    if (p.adapter.fallback) return { reason: `only a software WebGPU adapter (${adapterName(p.adapter)}) was found, slower than wasm` };
  }
  const r = await activateWebgpu();
  if (!r.adapter) return { reason: r.reason ?? 'no WebGPU adapter' };
  if (tf.getBackend() !== 'webgpu') return { reason: 'tfjs could not start its webgpu backend' };
  const a = r.adapter;
  setDeviceMaxTensorElements(Math.floor(a.maxBindingBytes / 4));
  const kind = a.fallback ? 'software adapter: correct but slow, meant for tests' : 'GPU';
  return {
    info: {
      name: 'webgpu',
      provider: '@tensorflow/tfjs-backend-webgpu + webgpu (Dawn)',
      auto,
      adapter: a,
      message: `backend: webgpu (${adapterName(a)}; ${kind}; max tensor ${(a.maxBindingBytes / 2 ** 20).toFixed(0)} MiB)`,
    },
    reason: '',
  };
}

/**
 * Select and initialise a backend. `requested` comes from `--backend`; SDTUNE_BACKEND is the fallback.
 * Throws SdtuneError('backend') when a named backend cannot be loaded.
 */
export async function selectBackend(requested?: string): Promise<BackendInfo> {
  const want = (requested ?? process.env.SDTUNE_BACKEND ?? '').trim().toLowerCase();
  if (want && !(BACKENDS as readonly string[]).includes(want)) {
    throw new SdtuneError('backend', `unknown backend "${want}"; valid: ${BACKENDS.join(', ')}`);
  }
  setDeviceMaxTensorElements(Infinity);
  let info: BackendInfo | undefined;
  switch (want) {
    case 'tensorflow':
      info = await useTensorflow(false);
      if (!info) throw new SdtuneError('backend', `backend "tensorflow" is not installed; ${TF_HINT}`);
      break;
    case 'cpu':
      info = await useCpu(false, '');
      break;
    case 'wasm':
      info = await useWasm(false, '');
      if (!info) throw new SdtuneError('backend', 'backend "wasm" failed to load (@tensorflow/tfjs-backend-wasm)');
      break;
    case 'webgpu': {
      const r = await useWebgpu(false);
      if (!r.info) throw new SdtuneError('backend', `backend "webgpu" is not available: ${r.reason}; ${GPU_HINT}`);
      info = r.info;
      break;
    }
    default: {
      const gpu = await useWebgpu(true);
      info = gpu.info ?? (await useTensorflow(true));
      if (!info) {
        const why = `no GPU backend (${gpu.reason}); ${GPU_HINT}`;
        info = (await useWasm(true, why)) ?? (await useCpu(true, `wasm failed to load; ${why}`));
      }
    }
  }
  // production mode: skips tfjs' debug checks and its console banner (we print our own backend line)
  tf.enableProdMode();
  current = info;
  return info;
}

/** The backend chosen by selectBackend, or a description of tfjs' current one. */
export function currentBackend(): BackendInfo | undefined {
  return current;
}

/**
 * Make sure a model of `weightBytes` float32 weights can live on the backend. wasm corrupts data instead of
 * failing past ~3.9 GB: an automatic wasm choice steps down to cpu (returning the line to tell the user), a
 * requested one is refused with a clear error.
 */
export async function fitBackend(weightBytes: number, what: string): Promise<string | undefined> {
  if (tf.getBackend() !== 'wasm' || WASM_WEIGHT_COPIES * weightBytes <= WASM_SAFE_BYTES) return undefined;
  const gb = (weightBytes / 1024 ** 3).toFixed(2);
  if (current?.name === 'wasm' && current.auto) {
    current = await useCpu(true, `${what} needs ${gb} GB of float32 weights, held twice on wasm (XNNPACK packs a copy of each), over its safe ${(WASM_SAFE_BYTES / 1024 ** 3).toFixed(1)} GB; ${GPU_HINT}`);
    return current.message;
  }
  assertFitsBackend(weightBytes, what);
  return undefined;
}

/** Refuse a model whose float32 weights would not fit the wasm heap (which corrupts data instead of failing). */
export function assertFitsBackend(weightBytes: number, what: string): void {
  if (tf.getBackend() === 'wasm' && WASM_WEIGHT_COPIES * weightBytes > WASM_SAFE_BYTES) {
    throw new SdtuneError(
      'backend',
      `${what} needs ${(weightBytes / 1024 ** 3).toFixed(2)} GB of float32 weights, held twice on wasm (XNNPACK packs a copy of each); the wasm backend is limited to ` +
        `${(WASM_SAFE_BYTES / 1024 ** 3).toFixed(1)} GB (it corrupts data silently beyond ~3.9 GB). Use --backend webgpu, tensorflow or cpu.`,
    );
  }
}

/** What the active backend can hold, for the memory checks made before sampling and training (infer/budget.ts). */
export interface MemoryBudget {
  /** tensor bytes, weights included, the backend can hold (Infinity where it cannot be known) */
  bytes: number;
  /** the largest single tensor (a WebGPU device binds each tensor in one buffer) */
  maxTensorBytes: number;
  /** names the limit in messages */
  what: string;
  /**
   * Copies of the weights the backend holds: 2 on wasm, whose XNNPACK kernels keep a packed copy of every conv and
   * matmul weight they have run (heap growth measured on SD v1's VAE and on single ops), 1 elsewhere
   */
  weightCopies: number;
}

/** Share of the free host memory (cpu, tensorflow on the CPU) that tensors may take: the rest is Node, sharp, the OS. */
const HOST_MEMORY_SHARE = 0.8;

/**
 * The active backend's memory budget. wasm: its safe heap. webgpu: the device's binding size per tensor (WebGPU
 * does not tell how much memory the GPU has). cpu and tensorflow on the CPU: what is resident now (`residentBytes`,
 * the loaded weights) plus a share of the memory free to this process. tensorflow on a GPU: not known.
 */
export function memoryBudget(residentBytes = 0): MemoryBudget {
  const name = current?.name ?? (tf.getBackend() as BackendName);
  if (name === 'wasm') return { bytes: WASM_SAFE_BYTES, maxTensorBytes: Infinity, weightCopies: WASM_WEIGHT_COPIES, what: `the wasm backend (safe heap ${(WASM_SAFE_BYTES / 1024 ** 3).toFixed(1)} GB)` };
  if (name === 'webgpu') {
    const a = current?.adapter;
    return { bytes: Infinity, maxTensorBytes: a ? a.maxBindingBytes : Infinity, weightCopies: 1, what: `the WebGPU device${a ? ` (${adapterName(a)})` : ''}` };
  }
  if (name === 'tensorflow' && current?.provider.endsWith('-gpu')) return { bytes: Infinity, maxTensorBytes: Infinity, weightCopies: 1, what: 'the tensorflow backend' };
  const free = typeof process.availableMemory === 'function' ? process.availableMemory() : os.freemem();
  return { bytes: residentBytes + HOST_MEMORY_SHARE * Math.min(free, os.totalmem()), maxTensorBytes: Infinity, weightCopies: 1, what: `the ${name} backend (${(100 * HOST_MEMORY_SHARE).toFixed(0)}% of the free memory)` };
}
