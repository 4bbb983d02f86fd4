/**
 * Memory helpers (design principle 10): an honest peak-memory probe that counts data buffers, not Tensor objects,
 * gradient checkpointing for the training forward, and freeing a gradient tape that a throw left behind.
 *
 * Why not tf.memory() / tf.profile(): both sum the bytes of every live Tensor, and tensors often share one buffer
 * (reshape, clone, and above all the clone of every input the tape saves for the backward pass, which on the cpu
 * and tensorflow backends shares the dataId), so a taped forward counts each frozen weight twice although nothing
 * was allocated. measurePeak counts a buffer once, from the moment its dataId enters the engine's tensorInfo until
 * it leaves it. Scratch memory a kernel allocates and frees inside one call is invisible to the engine and not
 * counted.
 */
import * as tf from '@tensorflow/tfjs';
import { type ParamTree, flattenParams } from '../models/params.js';

type Engine = ReturnType<typeof tf.engine>;

interface Tracker {
  live: number;
  peak: number;
}

const trackers = new Set<Tracker>();
/** Bytes counted for each buffer first seen while tracking (a string tensor's bytes change after trackTensor). */
let counted = new WeakMap<object, number>();
let uninstall: (() => void) | null = null;

/** Apply a change of live unique bytes to every active tracker. */
function addBytes(bytes: number): void {
  for (const t of trackers) {
    t.live += bytes;
    if (t.live > t.peak) t.peak = t.live;
  }
}

/** Wrap the engine's trackTensor / disposeTensor so that buffers entering and leaving tensorInfo are counted. */
function install(e: Engine): () => void {
  const own = { track: Object.hasOwn(e, 'trackTensor'), dispose: Object.hasOwn(e, 'disposeTensor') };
  const track = e.trackTensor;
  const dispose = e.disposeTensor;
  e.trackTensor = function (this: Engine, a, backend) {
    const had = this.state.tensorInfo.has(a.dataId);
    track.call(this, a, backend);
    const info = had ? undefined : this.state.tensorInfo.get(a.dataId);
    if (info) {
      counted.set(a.dataId, info.bytes);
      addBytes(info.bytes);
    }
  };
  e.disposeTensor = function (this: Engine, a) {
    const info = this.state.tensorInfo.get(a.dataId);
    dispose.call(this, a);
    if (info && !this.state.tensorInfo.has(a.dataId)) {
      addBytes(-(counted.get(a.dataId) ?? info.bytes));
      counted.delete(a.dataId);
    }
  };
  return () => {
    // put back exactly what was there: the prototype method (delete the own property) or an earlier own wrapper
    if (own.track) e.trackTensor = track;
    else delete (e as Partial<Engine>).trackTensor;
    if (own.dispose) e.disposeTensor = dispose;
    else delete (e as Partial<Engine>).disposeTensor;
  };
}

export interface PeakMeasurement<T> {
  result: T;
  /** max over the run of the unique data-buffer bytes live above those live at the start */
  peakBytes: number;
  /** unique bytes live at the end minus at the start (what the run kept, or leaked; negative if it freed) */
  netBytes: number;
}

/**
 * Run `fn` (sync or async) and report its peak of unique data-buffer bytes above the start. Nested and overlapping
 * measurements each see every allocation made while they are active. The engine is restored even when fn throws.
 * (The bytes live at the start cannot be known exactly: tensorInfo is a WeakMap; compare runs by peakBytes.)
 */
export async function measurePeak<T>(fn: () => Promise<T> | T): Promise<PeakMeasurement<T>> {
  const t: Tracker = { live: 0, peak: 0 };
  if (trackers.size === 0) uninstall = install(tf.engine());
  trackers.add(t);
  try {
    const result = await fn();
    return { result, peakBytes: t.peak, netBytes: t.live };
  } finally {
    trackers.delete(t);
    if (trackers.size === 0) {
      uninstall?.();
      uninstall = null;
      counted = new WeakMap();
    }
  }
}

/** The trainable variables of a params sub-tree (LoRA factors, or every weight in full fine-tuning), in tree order. */
export function trainableIn(tree: ParamTree): tf.Variable[] {
  const out: tf.Variable[] = [];
  for (const t of flattenParams(tree).values()) if (t instanceof tf.Variable && t.trainable) out.push(t);
  return out;
}

/**
 * Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; torch.utils.checkpoint
 * as diffusers' enable_gradient_checkpointing uses it): y = fn(...inputs) keeps only `inputs` for the backward pass,
 * which runs fn again on them under a tape and backpropagates the upstream gradient through that recomputation.
 * `inputs` are the activations fn reads (gradients flow to each); `params` must list every trainable tensor fn
 * reads from its closure (tfjs only differentiates a custom op with respect to its explicit inputs; anything
 * trainable left out gets no gradient). fn must be deterministic and return one tensor. With no gradient tape
 * recording (inference, or inside another kernel) it is just fn(...inputs).
 */
export function checkpoint<A extends tf.Tensor[], T extends tf.Tensor>(fn: (...inputs: A) => T, inputs: [...A], params: tf.Tensor[] = []): T {
  const e = tf.engine();
  if (!e.isTapeOn()) return fn(...inputs);
  const n = inputs.length;
  const ids = new Set(inputs.map((x) => x.id));
  const ps = [...new Set(params)].filter((p) => !ids.has(p.id)); // a tensor listed twice would get its gradient twice
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const xs = args.slice(0, n) as A;
    save(xs);
    // the tape is off in here (kernelDepth > 0), so fn's intermediates are freed when its tidies end
    const value = fn(...xs);
    return { value, gradFunc: (dy: T, saved: tf.Tensor[]) => recompute(() => fn(...(saved as A)), saved, ps, dy) };
  });
  return op(...inputs, ...ps) as T;
}

/** The backward of checkpoint(): fn again on the saved inputs, then d(fn)/d[saved, params] . dy, in input order. */
function recompute(again: () => tf.Tensor, saved: tf.Tensor[], params: tf.Tensor[], dy: tf.Tensor): tf.Tensor[] {
  const e = tf.engine();
  // engine.gradients() at depth 0 replaces the active tape and clears it afterwards, but the outer backward pass
  // (which is running us) still has to dispose the tensors its tape saved: keep it and put it back
  const outerTape = e.state.activeTape;
  const outerDepth = e.state.gradientDepth;
  try {
    // the saved clones have their own tensor ids: `again` reads them, not the original inputs, so the ids match
    const xs = [...saved, ...params];
    const { value, grads } = e.gradients(again, xs, dy, true);
    value.dispose();
    return xs.map((x, i) => grads[i] ?? tf.zerosLike(x));
  } finally {
    if (outerDepth === 0) {
      // a throw (an interrupt) left the recomputation's own tape behind: free what it saved before putting ours back
      if (e.state.activeTape && e.state.activeTape !== outerTape) disposeTape();
      e.state.activeTape = outerTape;
    }
  }
}

/**
 * After a throw out of tf.grad / variableGrads (an interrupt): free the tensors the gradient tape saved for the
 * backward pass (kept, so no tidy frees them; normally the end of the backward pass does) and drop the tape. The
 * forward's and backward's tidy scopes have already freed everything else. Does nothing while a tape is recording.
 */
export function disposeTape(): void {
  const s = tf.engine().state;
  if (s.gradientDepth !== 0 || !s.activeTape) return;
  for (const node of s.activeTape) for (const t of node.saved ?? []) t.dispose();
  s.activeTape = null as unknown as typeof s.activeTape;
}
