// Golden parity of A1111 hypernetworks (cases/hypernetwork): the tiny UNet with hypernetwork/tiny_hypernet.safetensors
// applied before to_k / to_v of every attention whose context width is 32 (tiny-sd's outer blocks' self-attention
// as well as all cross-attention), at strengths 1 and 0.5; the "cross-attention only" variant; the modules alone.
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type Hypernetwork, disposeHypernetwork, hypernetworkAdapter, hypernetworkEntries, hypernetworkModule, readHypernetwork } from '../../src/adapters/hypernetwork.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import type { ContextAdapter } from '../../src/models/layers.js';
import { unet } from '../../src/models/unet.js';
import { atolOf, caseTensors, describeGolden, golden, goldenCase } from '../golden.js';
import { maxAbsDiff, nhwc, toNchw } from '../helpers.js';

describeGolden('hypernetwork vs the A1111 reference (cases/hypernetwork)', () => {
  let m: LoadedModel;
  let net: Hypernetwork;
  let c: Awaited<ReturnType<typeof caseTensors>>;
  const tol = () => atolOf('hypernetwork');
  beforeAll(async () => {
    m = await loadModel(golden('tiny-sd'));
    net = await readHypernetwork(golden(goldenCase('hypernetwork').hypernetwork_file as string));
    c = await caseTensors('hypernetwork');
  });
  afterAll(() => {
    disposeModel(m);
    disposeHypernetwork(net);
  });
  const ehs = () => tf.tensor3d(c.get('encoder_hidden_states')!.data as Float32Array, c.get('encoder_hidden_states')!.shape as [number, number, number]);

  it('reads the golden file: meta, one width, the [1, 2, 1] relu structure', () => {
    expect(net.meta).toMatchObject({ layer_structure: [1, 2, 1], activation_func: 'relu', is_layer_norm: false, activate_output: false, use_dropout: false, dropout_structure: [0, 0, 0], name: 'tiny_hypernet', step: 0 });
    expect([...net.layers.keys()]).toEqual([32]);
    expect(hypernetworkEntries(net.meta, 32).map((e) => e.kind)).toEqual(['linear', 'activation', 'linear']);
  });

  it('H_k(ehs), H_v(ehs) at strengths 1 and 0.5', async () => {
    const x = ehs();
    const e = hypernetworkEntries(net.meta, 32);
    for (const [s, tag] of [[1, '1p0'], [0.5, '0p5']] as const) {
      const [k, v] = net.layers.get(32)!;
      const hk = hypernetworkModule(k, e, x, s);
      const hv = hypernetworkModule(v, e, x, s);
      const ek = maxAbsDiff(await hk.data(), c.get(`hk_of_ehs_mult${tag}`)!.data);
      const ev = maxAbsDiff(await hv.data(), c.get(`hv_of_ehs_mult${tag}`)!.data);
      console.log(`hypernetwork H_k / H_v strength ${s}: max abs err ${ek.toExponential(2)} / ${ev.toExponential(2)} (tol ${tol()})`);
      expect(ek).toBeLessThanOrEqual(tol());
      expect(ev).toBeLessThanOrEqual(tol());
      tf.dispose([hk, hv]);
    }
    x.dispose();
  });

  it('UNet noise prediction: every matching attention, cross-attention only, and none', async () => {
    const { params, config } = m.unet!;
    const x = nhwc(c.get('sample')!);
    const ts = tf.tensor1d(c.get('timesteps')!.data as Int32Array, 'int32');
    const ctx = ehs();
    const before = tf.memory().numTensors;
    const run = async (context?: ContextAdapter) => {
      const y = unet(params, config, x, ts, ctx, { context });
      const d = await toNchw(y);
      y.dispose();
      return d;
    };
    const none = await run();
    const eNone = maxAbsDiff(none, c.get('noise_pred_no_hypernet')!.data);
    console.log(`hypernetwork: no hypernetwork max abs err ${eNone.toExponential(2)} (tol ${tol()})`);
    expect(eNone).toBeLessThanOrEqual(tol());
    for (const [s, tag] of [[1, '1p0'], [0.5, '0p5']] as const) {
      const all = hypernetworkAdapter([{ net, strength: s }]);
      const crossOnly: ContextAdapter = { params: all.params, kv: (cc, site, f) => (site.kind === 'cross' ? all.kv(cc, site, f) : undefined) };
      const yAll = await run(all);
      const yCross = await run(crossOnly);
      const ref = c.get(`noise_pred_mult${tag}`)!.data;
      const eAll = maxAbsDiff(yAll, ref);
      const eCross = maxAbsDiff(yCross, c.get(`noise_pred_attn2_only_mult${tag}`)!.data);
      console.log(`hypernetwork strength ${s}: all matching attentions max abs err ${eAll.toExponential(2)}, cross-attention only ${eCross.toExponential(2)} (tol ${tol()})`);
      if (s === 0.5) {
        // at strength 0.5 this case is ill-conditioned in float32: a 1e-7 relative change of the sample (float32
        // rounding) moves the output by ~1.2e-4 (measured on wasm), above the case's atol 1e-4, so another summation
        // order can miss the tolerance by chance (software WebGPU: 2.9e-4). That is why this file is not in PARITY (cpu,
        // webgpu); on wasm it is held to the case's tolerance, and the sensitivity is printed next to the error.
        const x1 = tf.mul(x, 1 + 1e-7) as tf.Tensor4D;
        const y1 = unet(params, config, x1, ts, ctx, { context: all });
        const y0 = unet(params, config, x, ts, ctx, { context: all });
        const moved = maxAbsDiff(await toNchw(y1), await toNchw(y0));
        tf.dispose([x1, y1, y0]);
        console.log(`hypernetwork strength 0.5: a 1e-7 relative change of the sample moves the output by ${moved.toExponential(2)}`);
      }
      expect(eAll).toBeLessThanOrEqual(tol());
      // The "attn2 only" outputs are the case's diagnostic of what a cross-attention-only rule would give (not
      // A1111's rule, and the case's checks give no f32 noise figure for them). This network amplifies float
      // rounding (the reference's own f32-vs-f64 gap is 1.2e-5 at strength 0.5; our cpu and wasm backends differ
      // from each other by up to ~1e-4 on these outputs): ours are 1.5e-4 (wasm) / 6e-5 (cpu) from them at strength
      // 1. So the variant is only identified here: 1000x closer to its own reference than to the all-attention one.
      expect(eCross).toBeLessThan(maxAbsDiff(yCross, ref) / 1000);
      // the effect is far above the tolerance, so a hypernetwork that did nothing (or only cross-attention) fails
      expect(maxAbsDiff(yAll, none)).toBeGreaterThan(100 * tol());
      expect(maxAbsDiff(yAll, yCross)).toBeGreaterThan(100 * tol());
    }
    expect(tf.memory().numTensors).toBe(before); // no leaks
    tf.dispose([x, ts, ctx]);
  });
});
