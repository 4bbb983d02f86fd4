/**
 * Run @tensorflow/tfjs-backend-wasm's threaded-SIMD build under Node, without patching node_modules.
 *
 * Upstream turns it off in Node (flags_wasm.js: WASM_HAS_MULTITHREAD_SUPPORT returns false when IS_NODE;
 * tensorflow/tfjs#3830, PR #8059 closed unmerged). Forcing the flag alone fails, because in
 * dist/tf-backend-wasm.node.js:
 *  1. locateFile() hands emscripten a `blob:nodedata:` URL for the pthread worker script, and the glue does
 *     `commonjsGlobal.Worker = worker_threads.Worker; new Worker(url)` (PThread.allocateUnusedWorker), which
 *     throws ERR_WORKER_PATH;
 *  2. the 'load' message gives each worker `mainScriptUrlOrBlob`, a Blob of the bundled factory's source,
 *     which refers to bundle-scope names (require$$0, require$$4, commonjsGlobal) a worker does not have, and
 *     the worker's importScripts() reads it with fs.readFileSync, which cannot read a blob: URL;
 *  3. backend.cc sizes the pool as emscripten_num_logical_cores() / 2 (from os.cpus()), so 2 CPUs give 1 thread;
 *  4. running pthreads ref() their worker, so the process never exits by itself.
 * Each numbered item is handled below. Call enableWasmThreads() after nothing else initialised 'wasm' and
 * BEFORE tf.setBackend('wasm'); afterwards getThreadsCount() from the wasm package reports what XNNPACK got.
 * This leans on the internals of tfjs-backend-wasm 4.22 (emscripten 3.1.x glue); recheck when upgrading.
 */
import * as tf from '@tensorflow/tfjs';
import { createRequire } from 'node:module';
import os from 'node:os';
import { Worker as NodeWorker, type TransferListItem, type WorkerOptions } from 'node:worker_threads';

export type WasmThreadsResult = { threads: number } | { threads: 1; reason: string };

/** The glue's PTHREAD pool holds 8 workers and backend.cc caps XNNPACK at 8 threads. */
const MAX_THREADS = 8;

let installedThreads = 0;

/** Whether tfjs already made (or began making) a wasm backend; tf.findBackend() would itself start one. */
export function wasmStarted(): boolean {
  const e = tf.engine() as unknown as { registry: Record<string, unknown>; pendingBackendInitId?: number; pendingBackendInit?: unknown };
  return e.registry.wasm != null || (tf.getBackend() === 'wasm' && e.pendingBackendInit != null);
}

export async function enableWasmThreads(threads?: number): Promise<WasmThreadsResult> {
  const want = Math.min(MAX_THREADS, Math.max(1, Math.floor(threads ?? os.availableParallelism())));
  if (want < 2) return { threads: 1, reason: 'one thread requested (or one CPU available)' };
  if (wasmStarted()) {
    return { threads: 1, reason: 'the wasm backend is already initialised; call enableWasmThreads() before tf.setBackend("wasm")' };
  }
  if (typeof SharedArrayBuffer === 'undefined') return { threads: 1, reason: 'SharedArrayBuffer is unavailable' };

  let wasm: typeof import('@tensorflow/tfjs-backend-wasm');
  let gluePath: string;
  let workerSource: string;
  try {
    // Importing the package registers its WASM_* flags; tf.env().set() throws on unregistered flags.
    wasm = await import('@tensorflow/tfjs-backend-wasm');
    const require = createRequire(import.meta.url);
    // The unbundled emscripten glue: same build and wasm import table as the copy inside the node bundle,
    // but self-contained, so a worker can load it by path (fixes 2).
    gluePath = require.resolve('@tensorflow/tfjs-backend-wasm/wasm-out/tfjs-backend-wasm-threaded-simd.js');
    const mod = require('@tensorflow/tfjs-backend-wasm/wasm-out/tfjs-backend-wasm-threaded-simd.worker.js') as {
      wasmWorkerContents?: unknown;
    };
    if (typeof mod.wasmWorkerContents !== 'string' || !mod.wasmWorkerContents.includes('urlOrBlob')) {
      return { threads: 1, reason: 'unrecognised tfjs-backend-wasm pthread worker script (package version changed?)' };
    }
    // That file keeps the script in a template literal, which turned the "\n" escapes inside its string
    // literals into raw newlines; escape them again (tfjs does the same before building its Blob).
    workerSource = mod.wasmWorkerContents.replace(/\n/g, '\\n');
  } catch (e) {
    return { threads: 1, reason: `cannot load the threaded wasm build: ${(e as Error).message}` };
  }

  if (installedThreads === 0) installPThreadWorker(gluePath, workerSource);
  installedThreads = want;
  tf.env().set('WASM_HAS_MULTITHREAD_SUPPORT', true);
  wasm.setThreadsCount(want);
  return { threads: want };
}

function installPThreadWorker(gluePath: string, workerSource: string): void {
  // Fix 3: backend.cc reads the core count once, in its static constructors, via os.cpus().length / 2, and
  // clamps setThreadsCount() to it. Answer that one call with 2 * threads entries; the first pthread worker
  // is created just before the module instantiates, so the patch is armed only from then and removes itself
  // after one call.
  const mutableOs = os as { cpus: typeof os.cpus };
  const realCpus = os.cpus;
  let armed = false;
  mutableOs.cpus = () => {
    const cpus = realCpus.call(os);
    if (!armed) return cpus;
    mutableOs.cpus = realCpus;
    return Array.from({ length: 2 * installedThreads }, (_, i) => cpus[i % cpus.length]!);
  };

  class PThreadWorker extends NodeWorker {
    private readonly pthread: boolean;

    constructor(url: string | URL, options?: WorkerOptions) {
      // Fix 1: only the glue asks for a blob: URL (worker_threads cannot load those anyway); run the
      // package's own worker script, which already speaks worker_threads, as eval'd code instead.
      const pthread = typeof url === 'string' && url.startsWith('blob:');
      // the script is CommonJS: drop an inherited --input-type=module (node -e with ESM), which would break it
      super(pthread ? workerSource : url, pthread ? { eval: true, execArgv: process.execArgv.filter((a) => !a.startsWith('--input-type')) } : options);
      this.pthread = pthread;
      if (pthread) {
        URL.revokeObjectURL(url); // the Blob tfjs made for this worker is never read
        armed = true;
      }
    }

    override postMessage(value: unknown, transferList?: readonly TransferListItem[]): void {
      // Fix 2: point the worker's importScripts() at the glue file instead of the unreadable Blob.
      const msg = value as { cmd?: unknown; urlOrBlob?: unknown } | null;
      if (this.pthread && msg?.cmd === 'load' && typeof msg.urlOrBlob !== 'string') {
        value = { ...msg, urlOrBlob: gluePath };
      }
      super.postMessage(value, transferList);
    }

    override ref(): void {
      // Fix 4: the glue unrefs a worker once it has loaded and refs it while a pthread runs; XNNPACK's pool
      // threads run forever, so keep them unref'd and let Node exit (it ends the workers). A worker is still
      // ref'd from construction until loaded, so the process stays alive through initialisation.
      if (!this.pthread) super.ref();
    }
  }

  // The glue assigns `global.Worker = worker_threads.Worker` when its factory runs, and later pthreads may
  // need a new worker at any time, so keep ours in place with a setter that ignores that assignment.
  Object.defineProperty(globalThis, 'Worker', {
    configurable: true,
    get: () => PThreadWorker,
    set: () => {},
  });
}
