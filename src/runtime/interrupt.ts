/**
 * Stopping a long computation part-way. On wasm and cpu a training step is one synchronous run of thousands of
 * kernels: no event (a SIGINT handler, a timer firing an AbortSignal) can run until it ends. A check that runs
 * before every kernel can: every tfjs op and every gradient function reaches the backend through
 * `Engine.runKernel` (custom gradients run their forward and backward through ops too), so wrapping that one method
 * on the engine instance sees them all. The check throws `Interrupted`; tidy scopes end themselves on a throw, the
 * tensors a gradient tape saved do not: `disposeTape` (runtime/memory.ts) frees them.
 * Checks run only between top-level kernels, never inside one (see install). The check must be cheap and synchronous: a flag, `signal.aborted`, or `Atomics.load` on a SharedArrayBuffer
 * another thread writes (the CLI trains in a worker thread for that reason).
 */
import * as tf from '@tensorflow/tfjs';

type Engine = ReturnType<typeof tf.engine>;

/** Thrown from inside a computation when an interrupt check says stop. */
export class Interrupted extends Error {
  constructor(message = 'interrupted') {
    super(message);
    this.name = 'Interrupted';
  }
}

const checks = new Set<() => boolean>();
let uninstall: (() => void) | null = null;

/** Wrap engine.runKernel so that every active check runs before each kernel. */
function install(e: Engine): () => void {
  const own = Object.hasOwn(e, 'runKernel');
  const run = e.runKernel;
  e.runKernel = function (this: Engine, ...args: Parameters<Engine['runKernel']>) {
    // only between top-level kernels: inside one (kernelDepth > 0: a kernel made of kernels, the clones the tape
    // saves, a custom gradient's forward) a throw would strand what it has made so far
    if (this.state.kernelDepth === 0) for (const stop of checks) if (stop()) throw new Interrupted();
    return run.apply(this, args);
  } as Engine['runKernel'];
  return () => {
    // put back exactly what was there: the prototype method (delete the own property) or an earlier own wrapper
    if (own) e.runKernel = run;
    else delete (e as Partial<Engine>).runKernel;
  };
}

/**
 * Run `stop` before every kernel from now until the returned function is called; when it returns true the kernel
 * does not run and `Interrupted` is thrown instead. Several checks may be active at once (each install is removed
 * by its own returned function, in any order).
 */
export function checkBeforeEveryKernel(stop: () => boolean): () => void {
  if (checks.size === 0) uninstall = install(tf.engine());
  checks.add(stop);
  return () => {
    if (!checks.delete(stop) || checks.size > 0) return;
    uninstall?.();
    uninstall = null;
  };
}
