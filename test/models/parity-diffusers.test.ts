// Parity of the three networks against the reference (diffusers + transformers), loading the diffusers folder
// directly through the safetensors reader (the loader's own tests cover the other layouts).
import * as tf from '@tensorflow/tfjs';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { buildParams } from '../../src/models/build.js';
import { clipText, clipTextParamShapes } from '../../src/models/clip-text.js';
import { clipTextConfig, unetConfig, vaeConfig } from '../../src/models/configs.js';
import { type ParamTree, disposeParams } from '../../src/models/params.js';
import { unet, unetParamShapes } from '../../src/models/unet.js';
import { vaeDecode, vaeEncode, vaeParamShapes } from '../../src/models/vae.js';
import { atolOf, caseTensors, describeGolden, golden } from '../golden.js';
import { maxAbsDiff, nhwc, rawTensor, toNchwData } from '../helpers.js';

async function loadDir(dir: string, file: string) {
  const f = await SafetensorsFile.open(golden(...dir.split('/'), file));
  const t = await f.readAll();
  await f.close();
  return { config: JSON.parse(readFileSync(golden(...dir.split('/'), 'config.json'), 'utf8')), tensors: t };
}

describeGolden('networks vs diffusers (diffusers folder)', () => {
  const trees: ParamTree[] = [];
  afterAll(() => trees.forEach(disposeParams));

  for (const [name, dir] of [['text_encoder', 'tiny-sd/text_encoder'], ['sd2_text_encoder', 'tiny-sd2-depth/text_encoder']] as const)
  it(`${name}: last hidden state, clip skip 2, raw penultimate, pooled`, async () => {
    const { config, tensors } = await loadDir(dir, 'model.safetensors');
    const cfg = clipTextConfig(config);
    const params = buildParams('text_encoder', clipTextParamShapes(cfg), tensors);
    trees.push(params);
    const c = await caseTensors(name);
    const ids = rawTensor(c.get('input_ids'), 'input_ids');
    const atol = atolOf(name);
    const idsT = tf.tensor2d(ids.data as Int32Array, ids.shape as [number, number], 'int32');
    const before = tf.memory().numTensors;
    const o1 = clipText(params, cfg, idsT);
    const o2 = clipText(params, cfg, idsT, { clipSkip: 2 });
    const e = {
      last: maxAbsDiff(o1.hidden.dataSync(), c.get('last_hidden_state')!.data),
      pooled: maxAbsDiff(o1.pooled.dataSync(), c.get('pooler_output')!.data),
      skip2: maxAbsDiff(o2.hidden.dataSync(), c.get('clip_skip_2')!.data),
      raw2: maxAbsDiff(o2.hiddenRaw.dataSync(), c.get('hidden_states_minus2_raw')!.data),
    };
    console.log(`${name} max abs err`, e);
    for (const v of Object.values(e)) expect(v).toBeLessThanOrEqual(atol);
    tf.dispose([o1, o2].flatMap((o) => [o.hidden, o.hiddenRaw, o.pooled]));
    expect(tf.memory().numTensors).toBe(before); // the forward leaks nothing
    idsT.dispose();
  });

  for (const [name, dir] of [['unet', 'tiny-sd/unet'], ['unet_inpaint', 'tiny-sd-inpaint/unet'], ['sd2_unet', 'tiny-sd2-depth/unet']] as const) {
    it(`${name}: noise prediction at per-item timesteps and at scalar t=500`, async () => {
      const { config, tensors } = await loadDir(dir, 'diffusion_pytorch_model.safetensors');
      const cfg = unetConfig(config);
      const params = buildParams('unet', unetParamShapes(cfg), tensors);
      trees.push(params);
      const c = await caseTensors(name);
      const x = nhwc(rawTensor(c.get('sample'), 'sample'));
      const ehs = c.get('encoder_hidden_states')!;
      const ctx = tf.tensor3d(ehs.data as Float32Array, ehs.shape as [number, number, number]);
      const ts = tf.tensor1d(c.get('timesteps')!.data as Int32Array, 'int32');
      const before = tf.memory().numTensors;
      const y = unet(params, cfg, x, ts, ctx);
      const y500 = unet(params, cfg, x, 500, ctx);
      const e = { noise_pred: maxAbsDiff(toNchwData(y), c.get('noise_pred')!.data), t500: maxAbsDiff(toNchwData(y500), c.get('noise_pred_t500')!.data) };
      console.log(`${name} max abs err`, e);
      expect(e.noise_pred).toBeLessThanOrEqual(atolOf(name));
      expect(e.t500).toBeLessThanOrEqual(atolOf(name));
      tf.dispose([y, y500]);
      expect(tf.memory().numTensors).toBe(before);
      tf.dispose([x, ctx, ts]);
    });
  }

  it('vae: encode (mean, std, logvar) and decode', async () => {
    const { config, tensors } = await loadDir('tiny-sd/vae', 'diffusion_pytorch_model.safetensors');
    const cfg = vaeConfig(config);
    const params = buildParams('vae', vaeParamShapes(cfg), tensors);
    trees.push(params);
    const c = await caseTensors('vae');
    const img = nhwc(rawTensor(c.get('image'), 'image'));
    const z = nhwc(rawTensor(c.get('decode_latents'), 'decode_latents'));
    const before = tf.memory().numTensors;
    const dist = vaeEncode(params, cfg, img);
    const dec = vaeDecode(params, cfg, z);
    const e = {
      mean: maxAbsDiff(toNchwData(dist.mean), c.get('latent_mean')!.data),
      std: maxAbsDiff(toNchwData(dist.std), c.get('latent_std')!.data),
      logvar: maxAbsDiff(toNchwData(dist.logvar), c.get('latent_logvar')!.data),
      decoded: maxAbsDiff(toNchwData(dec), c.get('decoded')!.data),
    };
    console.log('vae max abs err', e);
    for (const v of Object.values(e)) expect(v).toBeLessThanOrEqual(atolOf('vae'));
    tf.dispose([dist.mean, dist.std, dist.logvar, dec]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([img, z]);
  });
});
