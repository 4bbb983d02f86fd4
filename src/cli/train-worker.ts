/**
 * The training worker thread (started by commands/train.ts). On wasm and cpu a training step is one long synchronous
 * computation, so the thread that runs it cannot see Ctrl-C until the step ends; the CLI's main thread stays idle
 * instead, owns SIGINT and raises a flag in shared memory that this thread reads before every kernel
 * (TrainOptions.interrupt). Everything this thread writes to stdout/stderr goes to the main thread as messages on
 * the one port that also carries the result, so output arrives while a step runs (Node's own worker stdio waits for
 * this thread's event loop) and in order.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { SdtuneError } from '../errors.js';
import { selectBackend } from '../runtime/backend.js';
import type { Method, TrainConfig } from '../train/config.js';
import { train } from '../train/loop.js';

export interface TrainWorkerData {
  method: Method;
  config: TrainConfig;
  resume: string | null;
  /** replace an earlier run in the output folder */
  overwrite: boolean;
  /** Int32Array(1) over a SharedArrayBuffer: non-zero = stop (set by the main thread on Ctrl-C) */
  interrupt: SharedArrayBuffer;
  /** the main thread's stderr, so the progress bar draws in place on a terminal */
  tty: { isTTY: boolean; columns?: number };
  /** report a backend that fails to start as 'backend-failed' (the main thread then trains itself) */
  backendFallback: boolean;
}

export type TrainWorkerMessage =
  | { type: 'out'; stream: 'stdout' | 'stderr'; text: string }
  | { type: 'result'; files: string[]; stopped: 'done' | 'interrupted' }
  | { type: 'error'; kind: SdtuneError['kind']; message: string }
  | { type: 'backend-failed'; message: string };

const port = parentPort!;
const d = workerData as TrainWorkerData;
const post = (m: TrainWorkerMessage) => port.postMessage(m);

for (const name of ['stdout', 'stderr'] as const) {
  const stream = process[name];
  stream.write = ((chunk: string | Uint8Array, enc?: unknown, cb?: unknown) => {
    post({ type: 'out', stream: name, text: typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString() });
    const done = typeof enc === 'function' ? enc : cb;
    if (typeof done === 'function') queueMicrotask(() => (done as () => void)());
    return true;
  }) as typeof stream.write;
}
Object.defineProperty(process.stderr, 'isTTY', { value: d.tty.isTTY, configurable: true });
Object.defineProperty(process.stderr, 'columns', { value: d.tty.columns, configurable: true });

const flag = new Int32Array(d.interrupt);
try {
  let backend;
  try {
    backend = await selectBackend(d.config.model.backend ?? undefined);
  } catch (e) {
    if (!(d.backendFallback && e instanceof SdtuneError && e.kind === 'backend')) throw e;
    post({ type: 'backend-failed', message: e.message });
  }
  if (backend) {
    process.stderr.write(backend.message + '\n');
    const r = await train(d.method, d.config, { resume: d.resume, overwrite: d.overwrite, interrupt: () => Atomics.load(flag, 0) !== 0 });
    post({ type: 'result', files: r.files, stopped: r.stopped });
  }
} catch (e) {
  // anything else is a bug: rethrown, it reaches the main thread's 'error' handler with its stack
  if (!(e instanceof SdtuneError)) throw e;
  post({ type: 'error', kind: e.kind, message: e.message });
}
