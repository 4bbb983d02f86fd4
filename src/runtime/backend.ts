/**
 * Backend selection. Order when nothing is requested: tfjs-node-gpu, tfjs-node (both register "tensorflow"),
 * then the pure-TS "cpu" backend. "wasm" is never picked by default: it lacks Conv2DBackpropFilter (no training
 * of convolutions) and silently corrupts data past ~3.9 GB of heap.
 */
import * as tf from '@tensorflow/tfjs';
import { SdtuneError } from '../errors.js';

export type BackendName = 'tensorflow' | 'cpu' | 'wasm' | 'webgpu';
export const BACKENDS: readonly BackendName[] = ['tensorflow', 'cpu', 'wasm', 'webgpu'];

export interface BackendInfo {
  name: BackendName;
  /** npm package that provided it */
  provider: string;
  /** one line for the user: what runs, and how to get something faster when it is slow */
  message: string;
}

/** Max bytes of tensors we allow on wasm: its 32-bit heap corrupts data silently near 4 GB. */
export const WASM_SAFE_BYTES = 3.5 * 1024 ** 3;

const INSTALL_HINT =
  'for a fast backend install one of: `npm install @tensorflow/tfjs-node-gpu` (CUDA) or `npm install @tensorflow/tfjs-node` (CPU, libtensorflow)';

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

async function useTensorflow(): Promise<BackendInfo | undefined> {
  for (const pkg of ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node']) {
    if ((await tryImport(pkg)) && (await activate('tensorflow'))) {
      return { name: 'tensorflow', provider: pkg, message: `backend: tensorflow (${pkg})` };
    }
  }
  return undefined;
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
  let info: BackendInfo | undefined;
  switch (want) {
    case 'tensorflow':
      info = await useTensorflow();
      if (!info) throw new SdtuneError('backend', `backend "tensorflow" is not installed; ${INSTALL_HINT}`);
      break;
    case 'cpu':
      if (!(await activate('cpu'))) throw new SdtuneError('backend', 'the cpu backend failed to initialise');
      info = { name: 'cpu', provider: '@tensorflow/tfjs-backend-cpu', message: `backend: cpu (pure TypeScript, slow; ${INSTALL_HINT})` };
      break;
    case 'wasm':
      if (!(await tryImport('@tensorflow/tfjs-backend-wasm')) || !(await activate('wasm'))) {
        throw new SdtuneError('backend', 'backend "wasm" failed to load (@tensorflow/tfjs-backend-wasm)');
      }
      info = {
        name: 'wasm',
        provider: '@tensorflow/tfjs-backend-wasm',
        message: 'backend: wasm (inference only: no conv weight gradients; models over 3.5 GB refused)',
      };
      break;
    case 'webgpu':
      if (!(await tryImport('@tensorflow/tfjs-backend-webgpu')) || !(await activate('webgpu'))) {
        throw new SdtuneError('backend', 'backend "webgpu" is not available (install @tensorflow/tfjs-backend-webgpu; needs a WebGPU runtime)');
      }
      info = { name: 'webgpu', provider: '@tensorflow/tfjs-backend-webgpu', message: 'backend: webgpu' };
      break;
    default:
      info = await useTensorflow();
      if (!info) {
        await activate('cpu');
        info = { name: 'cpu', provider: '@tensorflow/tfjs-backend-cpu', message: `backend: cpu (pure TypeScript, slow; ${INSTALL_HINT})` };
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

/** Refuse a model whose float32 weights would not fit the wasm heap (which corrupts data instead of failing). */
export function assertFitsBackend(weightBytes: number, what: string): void {
  if (tf.getBackend() === 'wasm' && weightBytes > WASM_SAFE_BYTES) {
    throw new SdtuneError(
      'backend',
      `${what} needs ${(weightBytes / 1024 ** 3).toFixed(2)} GB of float32 weights; the wasm backend is limited to ` +
        `${(WASM_SAFE_BYTES / 1024 ** 3).toFixed(1)} GB (it corrupts data silently beyond ~3.9 GB). Use --backend tensorflow or cpu.`,
    );
  }
}
