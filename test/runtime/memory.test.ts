import * as tf from '@tensorflow/tfjs';
import { describe, expect, it } from 'vitest';
import { checkpoint, measurePeak, trainableIn } from '../../src/runtime/memory.js';

const F32 = 4;
/** Does this backend's Identity (tf.clone, and the tape's saved inputs) share the buffer rather than copy it? */
const clonesShare = () => tf.tidy(() => { const a = tf.zeros([1]); return a.clone().dataId === a.dataId; });

describe('measurePeak: unique data-buffer bytes', () => {
  it('a buffer shared by several tensors counts once; a new tensor adds its bytes; a clone counts iff the backend copies', async () => {
    const a = tf.zeros([1000]);
    const shared = await measurePeak(() => tf.tidy(() => void [a.reshape([10, 100]), a.expandDims(0)]));
    expect(shared.peakBytes).toBe(0);
    const fresh = await measurePeak(() => tf.tidy(() => void tf.neg(a)));
    expect(fresh.peakBytes).toBe(1000 * F32);
    expect(fresh.netBytes).toBe(0);
    // cpu, tensorflow and webgl share the buffer (Identity increments a refcount); wasm copies it
    const clone = await measurePeak(() => tf.tidy(() => a.clone().dataId === a.dataId));
    expect(clone.peakBytes).toBe(clone.result ? 0 : 1000 * F32);
    a.dispose();
  });

  it('the peak of a sequence of allocations and disposals is exact, and a freed pre-existing buffer counts down', async () => {
    const old = tf.zeros([250]);
    const m = await measurePeak(() => {
      const a = tf.zeros([1000]); // 4000
      const b = tf.zeros([500]); // 6000
      const bView = b.reshape([5, 100]); // shares b's buffer
      a.dispose(); // 2000
      const c = tf.zeros([2000]); // 10000: the peak
      b.dispose(); // b's buffer is still held by the view
      c.dispose(); // 2000
      bView.dispose(); // 0
      old.dispose(); // -1000
      return 'done';
    });
    expect(m).toEqual({ result: 'done', peakBytes: 10000, netBytes: -1000 });
  });

  it('counts what tf.memory() double-counts: the tape keeps clones of the weights, not copies', async () => {
    const w = tf.randomNormal([256, 256]); // 256 KiB, frozen
    const x = tf.variable(tf.randomNormal([1, 256]));
    let tfjsPeak = 0;
    const m = await measurePeak(() => {
      const before = tf.memory().numBytes;
      const { value, grads } = tf.variableGrads(() => {
        const y = tf.sum(tf.matMul(x, w));
        tfjsPeak = Math.max(tfjsPeak, tf.memory().numBytes - before);
        return y as tf.Scalar;
      }, [x]);
      tf.dispose([value, grads[x.name]]);
    });
    expect(tfjsPeak).toBeGreaterThanOrEqual(256 * 256 * F32); // the saved clone of w, counted again
    if (clonesShare()) expect(m.peakBytes).toBeLessThan(256 * F32 * 8); // only activations and gradients of size 256 were allocated
    else expect(m.peakBytes).toBeGreaterThanOrEqual(256 * 256 * F32); // wasm: the saved clone of w is a real copy
    expect(m.netBytes).toBe(0);
    tf.dispose([w, x]);
  });

  it('nests, and restores the engine even when the function throws', async () => {
    const e = tf.engine();
    const inner = { peak: -1 };
    const outer = await measurePeak(async () => {
      const a = tf.zeros([100]);
      inner.peak = (await measurePeak(() => tf.tidy(() => void tf.zeros([10])))).peakBytes;
      a.dispose();
    });
    expect(inner.peak).toBe(10 * F32);
    expect(outer.peakBytes).toBe(110 * F32);
    await expect(measurePeak(() => { throw new Error('boom'); })).rejects.toThrow('boom');
    expect(Object.hasOwn(e, 'trackTensor') || Object.hasOwn(e, 'disposeTensor')).toBe(false);
  });
});

describe('checkpoint', () => {
  // a two-layer block whose weights come from its closure, as the UNet's blocks read their params tree
  const setup = () => {
    const w1 = tf.variable(tf.randomNormal([8, 16], 0, 0.3, 'float32', 1));
    const w2 = tf.variable(tf.randomNormal([16, 8], 0, 0.3, 'float32', 2));
    const frozen = tf.variable(tf.randomNormal([8], 0, 1, 'float32', 3), false);
    const block = (x: tf.Tensor, c: tf.Tensor) => tf.tidy(() => tf.add(tf.matMul(tf.tanh(tf.matMul(tf.mul(x, frozen), w1)), w2), tf.mul(x, c)));
    const x = tf.randomNormal([4, 8], 0, 1, 'float32', 4);
    const c = tf.randomNormal([4, 8], 0, 1, 'float32', 5);
    return { w1, w2, frozen, block, x, c };
  };

  it('the same gradients as without it, for the closure weights and for every activation input', () => {
    const { w1, w2, frozen, block, x, c } = setup();
    const run = (ck: boolean) =>
      tf.tidy(() => {
        const loss = (xx: tf.Tensor, cc: tf.Tensor) => {
          const f = (a: tf.Tensor, b: tf.Tensor) => block(a, b);
          // two blocks in a row: the second one's upstream gradient comes from the first's output
          const h = ck ? checkpoint(f, [xx, cc], [w1, w2]) : f(xx, cc);
          const y = ck ? checkpoint(f, [h, cc], [w1, w2]) : f(h, cc);
          return tf.sum(tf.square(y)) as tf.Scalar;
        };
        const e = tf.engine();
        const { value, grads } = e.gradients(() => loss(x, c), [x, c, w1, w2]);
        return [value, ...grads].map((t) => Array.from(t.dataSync()));
      });
    const plain = run(false);
    const ck = run(true);
    for (let i = 0; i < plain.length; i++) for (let j = 0; j < plain[i].length; j++) expect(ck[i][j]).toBeCloseTo(plain[i][j], 6);
    tf.dispose([w1, w2, frozen, x, c]);
  });

  it('leaks nothing, keeps only its inputs on the tape, and is a plain call without a tape', () => {
    const { w1, w2, frozen, block, x, c } = setup();
    const before = tf.memory().numTensors;
    const { value, grads } = tf.variableGrads(() => tf.sum(checkpoint(block, [x, c], trainableIn({ w1, w2, frozen }))) as tf.Scalar, [w1, w2]);
    tf.dispose([value, ...Object.values(grads)]);
    expect(tf.memory().numTensors).toBe(before);
    const y = checkpoint(block, [x, c], [w1, w2]);
    const ref = block(x, c);
    expect(Array.from(y.dataSync())).toEqual(Array.from(ref.dataSync()));
    tf.dispose([y, ref]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([w1, w2, frozen, x, c]);
  });

  it('zeros for an input without a path to the output; nested checkpoints work', () => {
    const w = tf.variable(tf.randomNormal([3, 3], 0, 1, 'float32', 7));
    const x = tf.randomNormal([2, 3], 0, 1, 'float32', 8);
    const unused = tf.ones([5]);
    const e = tf.engine();
    const inner = (a: tf.Tensor) => tf.tanh(tf.matMul(a, w));
    const outer = (a: tf.Tensor) => tf.matMul(checkpoint(inner, [a], [w]), w);
    const { grads } = e.gradients(() => tf.sum(checkpoint((a: tf.Tensor, _unused: tf.Tensor) => outer(a), [x, unused], [w])), [x, unused, w]);
    const ref = e.gradients(() => tf.sum(tf.matMul(tf.tanh(tf.matMul(x, w)), w)), [x, w]);
    expect(Array.from(grads[1].dataSync())).toEqual([0, 0, 0, 0, 0]);
    const close = (a: tf.Tensor, b: tf.Tensor) => Array.from(a.dataSync()).forEach((v, i) => expect(v).toBeCloseTo(b.dataSync()[i], 6));
    close(grads[0], ref.grads[0]);
    close(grads[2], ref.grads[1]);
    tf.dispose([w, x, unused, ...grads, ref.value, ...ref.grads]);
  });
});
