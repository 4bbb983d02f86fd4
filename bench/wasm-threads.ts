/**
 * Benchmark / correctness check for src/runtime/wasm-threads.ts (one backend per process, so run it per mode):
 *   npx tsx bench/wasm-threads.ts 0   # stock single-thread SIMD build
 *   npx tsx bench/wasm-threads.ts 2   # threaded SIMD build, 2 threads
 * Writes the matMul + conv2d outputs to $OUT_DIR (default /tmp) as wasm-out-<mode>.bin for byte comparison.
 */
import * as tf from '@tensorflow/tfjs';
import { writeFileSync } from 'node:fs';
import { enableWasmThreads } from '../src/runtime/wasm-threads.js';

const mode = Number(process.argv[2] ?? '2');
const iters = Number(process.argv[3] ?? '10');
const wasm = await import('@tensorflow/tfjs-backend-wasm');
const res = mode > 0 ? await enableWasmThreads(mode) : { threads: 1, reason: 'not requested' };
const t0 = performance.now();
if (!(await tf.setBackend('wasm'))) throw new Error('wasm backend failed to initialise');
await tf.ready();
const mb = () => (process.memoryUsage().rss / 2 ** 20).toFixed(0);
console.log(`mode=${mode} enable=${JSON.stringify(res)} init=${(performance.now() - t0).toFixed(0)}ms xnnpackThreads=${wasm.getThreadsCount()} rss=${mb()}MB`);

function bench(name: string, flops: number, fn: () => tf.Tensor): void {
  fn().dispose();
  const times: number[] = [];
  for (let i = 0; i < iters; i++) {
    const t = performance.now();
    const r = fn();
    r.dataSync();
    times.push(performance.now() - t);
    r.dispose();
  }
  times.sort((a, b) => a - b);
  const gf = (ms: number) => (flops / ms / 1e6).toFixed(1);
  console.log(`${name}: best ${times[0]!.toFixed(1)}ms (${gf(times[0]!)} GFLOP/s), median ${times[iters >> 1]!.toFixed(1)}ms (${gf(times[iters >> 1]!)} GFLOP/s)`);
}
const a = tf.randomUniform([1024, 1024], -1, 1, 'float32', 1);
const b = tf.randomUniform([1024, 1024], -1, 1, 'float32', 2);
const x = tf.randomUniform([2, 32, 32, 320], -1, 1, 'float32', 3) as tf.Tensor4D;
const w = tf.randomUniform([3, 3, 320, 320], -1, 1, 'float32', 4) as tf.Tensor4D;
bench('matMul 1024^3', 2 * 1024 ** 3, () => tf.matMul(a, b));
bench('conv2d [2,32,32,320]x[3,3,320,320]', 2 * 2 * 32 * 32 * 320 * 9 * 320, () => tf.conv2d(x, w, 1, 'same'));
const mm = tf.matMul(a, b).dataSync() as Float32Array;
const cv = tf.conv2d(x, w, 1, 'same').dataSync() as Float32Array;
writeFileSync(`${process.env.OUT_DIR ?? '/tmp'}/wasm-out-${mode}.bin`, Buffer.concat([Buffer.from(mm.buffer), Buffer.from(cv.buffer)]));
console.log(`rss after=${mb()}MB; leaving the event loop empty to check for a clean exit`);
const tEnd = performance.now();
process.on('exit', () => console.log(`exited ${(performance.now() - tEnd).toFixed(0)}ms after the last statement`));
