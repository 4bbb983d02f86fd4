// Parity of the three networks against the reference (diffusers + transformers on PyTorch), loading the tiny
// golden model from each layout users have: the diffusers folder, the single-file fp32 checkpoint and the
// single-file fp16 checkpoint. Goldens are NCHW; the transposes happen here, not in the models.
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type LoadedModel, type OpenModelOptions, disposeModel, loadModel } from '../../src/io/model.js';
import { clipText } from '../../src/models/clip-text.js';
import { type ParamTree, flattenParams } from '../../src/models/params.js';
import { unet } from '../../src/models/unet.js';
import { vaeDecode, vaeEncode } from '../../src/models/vae.js';
import { atolOf, caseTensors, describeGolden, golden } from '../golden.js';
import { maxAbsDiff, nhwc, toNchw } from '../helpers.js';

/**
 * Tolerance for fp16 weights against the fp32 reference, derived from the rounding: every weight is rounded to
 * binary16, a relative error of at most u = 2^-11. The errors of N independently rounded weight tensors add up
 * like a random walk through the network, so an output moves by about sqrt(N) * u relative to its scale:
 * tol = sqrt(N weight tensors of the component) * 2^-11 * max|reference output|.
 */
function fp16Tolerance(params: ParamTree, reference: ArrayLike<number>): number {
  let n = 0;
  for (const t of flattenParams(params).values()) if (t.rank >= 2) n++;
  let absmax = 0;
  for (let i = 0; i < reference.length; i++) absmax = Math.max(absmax, Math.abs(reference[i]));
  return Math.sqrt(n) * 2 ** -11 * absmax;
}

const SOURCES: [string, string, OpenModelOptions, boolean][] = [
  ['diffusers folder', 'tiny-sd', {}, false],
  ['single file fp32', 'tiny-sd.safetensors', { configDir: 'tiny-sd' }, false],
  ['single file fp16', 'tiny-sd-fp16.safetensors', { configDir: 'tiny-sd' }, true],
];

const ids2d = (t: { data: Float32Array | Int32Array; shape: number[] }) => tf.tensor2d(t.data as Int32Array, t.shape as [number, number], 'int32');

for (const [label, file, opts, half] of SOURCES) {
  describeGolden(`networks vs diffusers: ${label}`, () => {
    let m: LoadedModel;
    beforeAll(async () => {
      m = await loadModel(golden(file), opts.configDir ? { ...opts, configDir: golden(opts.configDir) } : opts);
    });
    afterAll(() => disposeModel(m));
    /** Compare; fp32 sources use the case's atol, fp16 the derived tolerance. */
    const check = (what: string, params: ParamTree, got: ArrayLike<number>, ref: ArrayLike<number>, caseName: string) => {
      const err = maxAbsDiff(got, ref);
      const tol = half ? fp16Tolerance(params, ref) : atolOf(caseName);
      console.log(`${label} ${what}: max abs err ${err.toExponential(2)} (tol ${tol.toExponential(2)})`);
      expect(err).toBeLessThanOrEqual(tol);
    };

    it('loads with the expected layout and dtype', () => {
      expect(m.layout).toBe(file.endsWith('.safetensors') ? 'single-file' : 'diffusers');
      expect(m.variant).toBe('v1');
      expect(m.tokenizer?.vocabSize).toBe(49408);
    });

    it('text encoder: last hidden state, clip skip 2, raw penultimate, pooled', async () => {
      const c = await caseTensors('text_encoder');
      const ids = ids2d(c.get('input_ids')!);
      const { params, config } = m.textEncoder!;
      const before = tf.memory().numTensors;
      const o1 = clipText(params, config, ids);
      const o2 = clipText(params, config, ids, { clipSkip: 2 });
      check('last_hidden_state', params, (await o1.hidden.data()), c.get('last_hidden_state')!.data, 'text_encoder');
      check('pooler_output', params, (await o1.pooled.data()), c.get('pooler_output')!.data, 'text_encoder');
      check('clip_skip_2', params, (await o2.hidden.data()), c.get('clip_skip_2')!.data, 'text_encoder');
      check('hidden_states[-2] raw', params, (await o2.hiddenRaw.data()), c.get('hidden_states_minus2_raw')!.data, 'text_encoder');
      tf.dispose([o1, o2].flatMap((o) => [o.hidden, o.hiddenRaw, o.pooled]));
      expect(tf.memory().numTensors).toBe(before); // a forward leaks nothing
      ids.dispose();
    });

    it('unet: noise prediction at per-item timesteps and at scalar t=500', async () => {
      const c = await caseTensors('unet');
      const { params, config } = m.unet!;
      const x = nhwc(c.get('sample')!);
      const ehs = c.get('encoder_hidden_states')!;
      const ctx = tf.tensor3d(ehs.data as Float32Array, ehs.shape as [number, number, number]);
      const ts = tf.tensor1d(c.get('timesteps')!.data as Int32Array, 'int32');
      const before = tf.memory().numTensors;
      const y = unet(params, config, x, ts, ctx);
      const y500 = unet(params, config, x, 500, ctx);
      check('unet noise_pred', params, await toNchw(y), c.get('noise_pred')!.data, 'unet');
      check('unet noise_pred t=500', params, await toNchw(y500), c.get('noise_pred_t500')!.data, 'unet');
      tf.dispose([y, y500]);
      expect(tf.memory().numTensors).toBe(before);
      tf.dispose([x, ctx, ts]);
    });

    it('vae: encode (mean, std, logvar) and decode', async () => {
      const c = await caseTensors('vae');
      const { params, config } = m.vae!;
      expect(config.scaling_factor).toBe(0.18215);
      const img = nhwc(c.get('image')!);
      const z = nhwc(c.get('decode_latents')!);
      const before = tf.memory().numTensors;
      const dist = vaeEncode(params, config, img);
      const dec = vaeDecode(params, config, z);
      check('vae latent mean', params, await toNchw(dist.mean), c.get('latent_mean')!.data, 'vae');
      check('vae latent std', params, await toNchw(dist.std), c.get('latent_std')!.data, 'vae');
      check('vae latent logvar', params, await toNchw(dist.logvar), c.get('latent_logvar')!.data, 'vae');
      check('vae decoded', params, await toNchw(dec), c.get('decoded')!.data, 'vae');
      tf.dispose([dist.mean, dist.std, dist.logvar, dec]);
      expect(tf.memory().numTensors).toBe(before);
      tf.dispose([img, z]);
    });
  });
}

describeGolden('networks vs diffusers: other architectures', () => {
  it('inpainting UNet (9 input channels), from its component folder', async () => {
    const m = await loadModel(golden('tiny-sd-inpaint', 'unet'));
    try {
      expect(m.variant).toBe('inpaint');
      const c = await caseTensors('unet_inpaint');
      const { params, config } = m.unet!;
      const ehs = c.get('encoder_hidden_states')!;
      const ctx = tf.tensor3d(ehs.data as Float32Array, ehs.shape as [number, number, number]);
      const x = nhwc(c.get('sample')!);
      const y = unet(params, config, x, tf.tensor1d(c.get('timesteps')!.data as Int32Array, 'int32'), ctx);
      const y500 = unet(params, config, x, 500, ctx);
      expect(maxAbsDiff(await toNchw(y), c.get('noise_pred')!.data)).toBeLessThanOrEqual(atolOf('unet_inpaint'));
      expect(maxAbsDiff(await toNchw(y500), c.get('noise_pred_t500')!.data)).toBeLessThanOrEqual(atolOf('unet_inpaint'));
      tf.dispose([x, ctx, y, y500]);
    } finally {
      disposeModel(m);
    }
  });

  it('SD 2-style text encoder (gelu, eos id 2) and UNet (linear projections, per-block head counts)', async () => {
    const m = await loadModel(golden('tiny-sd2-depth'));
    try {
      const te = await caseTensors('sd2_text_encoder');
      const ids = ids2d(te.get('input_ids')!);
      const o = clipText(m.textEncoder!.params, m.textEncoder!.config, ids);
      const o2 = clipText(m.textEncoder!.params, m.textEncoder!.config, ids, { clipSkip: 2 });
      const atol = atolOf('sd2_text_encoder');
      expect(maxAbsDiff((await o.hidden.data()), te.get('last_hidden_state')!.data)).toBeLessThanOrEqual(atol);
      expect(maxAbsDiff((await o.pooled.data()), te.get('pooler_output')!.data)).toBeLessThanOrEqual(atol);
      expect(maxAbsDiff((await o2.hidden.data()), te.get('clip_skip_2')!.data)).toBeLessThanOrEqual(atol);
      const c = await caseTensors('sd2_unet');
      expect(m.unet!.config.use_linear_projection).toBe(true);
      expect(m.unet!.config.heads).toEqual([2, 4, 8, 8]);
      const ehs = c.get('encoder_hidden_states')!;
      const ctx = tf.tensor3d(ehs.data as Float32Array, ehs.shape as [number, number, number]);
      const x = nhwc(c.get('sample')!);
      const y = unet(m.unet!.params, m.unet!.config, x, tf.tensor1d(c.get('timesteps')!.data as Int32Array, 'int32'), ctx);
      const y500 = unet(m.unet!.params, m.unet!.config, x, 500, ctx);
      expect(maxAbsDiff(await toNchw(y), c.get('noise_pred')!.data)).toBeLessThanOrEqual(atolOf('sd2_unet'));
      expect(maxAbsDiff(await toNchw(y500), c.get('noise_pred_t500')!.data)).toBeLessThanOrEqual(atolOf('sd2_unet'));
      tf.dispose([ids, o.hidden, o.hiddenRaw, o.pooled, o2.hidden, o2.hiddenRaw, o2.pooled, ctx, x, y, y500]);
    } finally {
      disposeModel(m);
    }
  });
});
