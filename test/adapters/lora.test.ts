// LoRA files and merging: parity with diffusers on the golden tiny-sd (kohya and PEFT files, scale 1.0 / 0.5), and
// round trips / errors on a tiny random model (runs on a fresh clone).
import * as tf from '@tensorflow/tfjs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type LoraFile, type LoraModel, type LoraModule, mergeLora, readLora, writeLoraKohya, writeLoraPeft } from '../../src/adapters/lora.js';
import { SdtuneError } from '../../src/errors.js';
import { addnetHash } from '../../src/io/hashes.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { type WritableTensor, SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { randomParams } from '../../src/models/build.js';
import { clipText, clipTextParamShapes } from '../../src/models/clip-text.js';
import { type ParamTree, disposeParams, flattenParams } from '../../src/models/params.js';
import { unet, unetParamShapes } from '../../src/models/unet.js';
import { atolOf, caseTensors, describeGolden, golden } from '../golden.js';
import { TINY_CLIP, TINY_UNET, maxAbsDiff, nhwc, toNchwData } from '../helpers.js';

/** Host copies of every weight, to check that restore() is exact. */
const snapshot = (trees: ParamTree[]) => trees.map((t) => new Map([...flattenParams(t)].map(([k, v]) => [k, { t: v, data: (v.dataSync() as Float32Array).slice() }])));
function expectRestored(trees: ParamTree[], snap: ReturnType<typeof snapshot>) {
  trees.forEach((tree, i) => {
    for (const [k, v] of flattenParams(tree)) {
      const s = snap[i].get(k)!;
      expect(v, k).toBe(s.t); // the very same tensor object
      expect(Buffer.from((v.dataSync() as Float32Array).buffer).equals(Buffer.from(s.data.buffer)), k).toBe(true);
    }
  });
}

describeGolden('LoRA vs diffusers (tiny-sd)', () => {
  let m: LoadedModel;
  let model: LoraModel;
  const files: Record<string, LoraFile> = {};
  beforeAll(async () => {
    m = await loadModel(golden('tiny-sd'), { components: ['unet', 'text_encoder'] });
    model = { unet: m.unet!.params, textEncoder: m.textEncoder!.params };
    files.kohya = await readLora(golden('lora', 'tiny_lora_kohya.safetensors'), model);
    files.peft = await readLora(golden('lora', 'diffusers_format', 'pytorch_lora_weights.safetensors'), model);
  });
  afterAll(() => disposeModel(m));

  it('kohya and PEFT files resolve to the same 140 modules with identical effective deltas', () => {
    const { kohya, peft } = files;
    expect([kohya.format, peft.format]).toEqual(['kohya', 'peft']);
    for (const f of [kohya, peft]) {
      expect(f.modules.filter((x) => x.component === 'unet')).toHaveLength(128);
      expect(f.modules.filter((x) => x.component === 'text_encoder')).toHaveLength(12);
    }
    expect(kohya.metadata).toEqual({ ss_network_dim: '4', ss_network_alpha: '2.0' });
    const byId = new Map(peft.modules.map((x) => [`${x.component}:${x.module}`, x]));
    expect(kohya.modules.map((x) => `${x.component}:${x.module}`).sort()).toEqual([...byId.keys()].sort());
    expect(byId.has('unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q')).toBe(true);
    expect(byId.has('text_encoder:text_model.encoder.layers.0.self_attn.k_proj')).toBe(true);
    let err = 0;
    for (const k of kohya.modules) {
      const p = byId.get(`${k.component}:${k.module}`)!;
      expect([k.alpha, k.down.shape[0], p.alpha, p.down.shape[0]]).toEqual([2, 4, 4, 4]); // PEFT: no alpha -> scale 1
      expect(Array.from(p.down.data)).toEqual(Array.from(k.down.data));
      err = Math.max(err, maxAbsDiff(p.up.data.map((x) => (x * p.alpha) / 4), k.up.data.map((x) => (x * k.alpha) / 4)));
    }
    expect(err).toBe(0);
  });

  for (const format of ['kohya', 'peft']) {
    for (const [scale, tag] of [[1.0, '1p0'], [0.5, '0p5']] as const) {
      it(`${format} merged at scale ${scale}: UNet noise and prompt embeddings match, restore is exact`, async () => {
        const c = await caseTensors('lora');
        const trees = [model.unet!, model.textEncoder!];
        const snap = snapshot(trees);
        const before = tf.memory().numTensors;
        const restore = mergeLora(model, files[format], scale);
        // UNet on the lora case inputs
        const x = nhwc(c.get('sample')!);
        const ehs = c.get('encoder_hidden_states')!;
        const ctx = tf.tensor3d(ehs.data as Float32Array, ehs.shape as [number, number, number]);
        const ts = tf.tensor1d(c.get('timesteps')!.data as Int32Array, 'int32');
        const eps = unet(model.unet!, m.unet!.config, x, ts, ctx);
        const errUnet = maxAbsDiff(toNchwData(eps), c.get(`unet_noise_pred_scale${tag}`)!.data);
        // text encoder: the pipeline's prompt and negative prompt
        const tok = m.tokenizer!;
        const ids = tf.tensor2d([...tok.encode('a photo of an astronaut riding a horse').inputIds, ...tok.encode('blurry').inputIds], [2, 77], 'int32');
        const te = clipText(model.textEncoder!, m.textEncoder!.config, ids);
        const hidden = te.hidden.dataSync();
        const errPos = maxAbsDiff(hidden.subarray(0, 77 * 32), c.get(`prompt_embeds_scale${tag}`)!.data);
        const errNeg = maxAbsDiff(hidden.subarray(77 * 32), c.get(`negative_prompt_embeds_scale${tag}`)!.data);
        console.log(`lora ${format} scale ${scale}: unet ${errUnet.toExponential(2)}, prompt ${errPos.toExponential(2)}, negative ${errNeg.toExponential(2)} (atol ${atolOf('lora')})`);
        expect(Math.max(errUnet, errPos, errNeg)).toBeLessThanOrEqual(atolOf('lora'));
        tf.dispose([x, ctx, ts, eps, ids, te.hidden, te.hiddenRaw, te.pooled]);
        restore();
        expect(tf.memory().numTensors).toBe(before);
        expectRestored(trees, snap);
      });
    }
  }
});

// ---- tiny random model ------------------------------------------------------------------------------------------

const UNET = TINY_UNET;
const CLIP = TINY_CLIP;

let seed = 1;
const rand = (shape: number[]) => {
  const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < data.length; i++) data[i] = (((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) / 2 ** 24 - 0.5) * 0.4;
  return { shape, data };
};
const lin = (component: LoraModule['component'], module: string, out: number, inp: number, r: number, alpha: number): LoraModule => ({
  component, module, down: rand([r, inp]), up: rand([out, r]), alpha,
});

/** One module of each kind: Linear (self/cross attn, MLP, TE), 1x1 conv, 3x3 conv (LoCon), CP (lora_mid). */
function tinyModules(): LoraModule[] {
  const t = 'down_blocks.0.attentions.0';
  return [
    lin('unet', `${t}.transformer_blocks.0.attn1.to_q`, 32, 32, 4, 2),
    lin('unet', `${t}.transformer_blocks.0.attn2.to_k`, 32, 16, 2, 1),
    lin('unet', `${t}.transformer_blocks.0.ff.net.0.proj`, 256, 32, 4, 4),
    { component: 'unet', module: `${t}.proj_in`, down: rand([4, 32, 1, 1]), up: rand([32, 4, 1, 1]), alpha: 3 },
    { component: 'unet', module: 'down_blocks.0.resnets.0.conv1', down: rand([2, 32, 3, 3]), up: rand([32, 2, 1, 1]), alpha: 1 },
    { component: 'unet', module: 'up_blocks.1.resnets.0.conv2', down: rand([2, 32, 1, 1]), mid: rand([2, 2, 3, 3]), up: rand([32, 2, 1, 1]), alpha: 2 },
    lin('text_encoder', 'text_model.encoder.layers.1.self_attn.q_proj', 16, 16, 4, 2),
    lin('text_encoder', 'text_model.encoder.layers.0.mlp.fc1', 24, 16, 3, 1.5),
  ];
}

/** Reference delta in torch layout [out,in,kh,kw], computed element by element (spec §1.5). */
function refDelta(m: LoraModule): { shape: number[]; data: Float64Array } {
  const r = m.down.shape[0];
  const out = m.up.shape[0];
  const inp = m.down.shape[1];
  const [kh, kw] = m.mid ? m.mid.shape.slice(2) : m.down.shape.length === 4 ? m.down.shape.slice(2) : [1, 1];
  const d = new Float64Array(out * inp * kh * kw);
  for (let o = 0; o < out; o++)
    for (let c = 0; c < inp; c++)
      for (let y = 0; y < kh; y++)
        for (let x = 0; x < kw; x++) {
          let s = 0;
          for (let p = 0; p < r; p++) {
            if (!m.mid) s += m.up.data[o * r + p] * m.down.data[((p * inp + c) * kh + y) * kw + x];
            else for (let q = 0; q < r; q++) s += m.up.data[o * r + p] * m.mid.data[((p * r + q) * kh + y) * kw + x] * m.down.data[q * inp + c];
          }
          d[((o * inp + c) * kh + y) * kw + x] = s;
        }
  return { shape: [out, inp, kh, kw], data: d };
}

const leafOf = (tree: ParamTree, module: string) => flattenParams(tree).get(`${module}.weight`)!;

describe('LoRA on a tiny random model', () => {
  let dir: string;
  let model: LoraModel;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'sdtune-lora-'));
    model = { unet: randomParams(unetParamShapes(UNET), 1), textEncoder: randomParams(clipTextParamShapes(CLIP), 2) };
  });
  afterAll(async () => {
    disposeParams(model.unet!);
    disposeParams(model.textEncoder!);
    await rm(dir, { recursive: true, force: true });
  });
  const file = (name: string) => path.join(dir, name);
  const lora = (modules: LoraModule[]): LoraFile => ({ path: 'mem', format: 'kohya', modules, metadata: {} });

  it('merge adds scale * alpha/r * up@down in tfjs layout (Linear, 1x1, 3x3, CP), and restore is exact without leaks', () => {
    const modules = tinyModules();
    const trees = [model.unet!, model.textEncoder!];
    const snap = snapshot(trees);
    const before = tf.memory().numTensors;
    const restore = mergeLora(model, lora(modules), { unet: 0.7, textEncoder: -1.5 });
    for (const mod of modules) {
      const tree = mod.component === 'unet' ? model.unet! : model.textEncoder!;
      const w0 = snap[mod.component === 'unet' ? 0 : 1].get(`${mod.module}.weight`)!.data;
      const w1 = leafOf(tree, mod.module);
      const ref = refDelta(mod);
      const [out, inp, kh, kw] = ref.shape;
      const s = ((mod.component === 'unet' ? 0.7 : -1.5) * mod.alpha) / mod.down.shape[0];
      const got = w1.dataSync();
      let err = 0;
      for (let o = 0; o < out; o++)
        for (let c = 0; c < inp; c++)
          for (let y = 0; y < kh; y++)
            for (let x = 0; x < kw; x++) {
              const i = w1.rank === 4 ? ((y * kw + x) * inp + c) * out + o : c * out + o; // HWIO / [in,out]
              err = Math.max(err, Math.abs(got[i] - w0[i] - s * ref.data[((o * inp + c) * kh + y) * kw + x]));
            }
      expect(err, mod.module).toBeLessThan(1e-5);
    }
    restore();
    expect(tf.memory().numTensors).toBe(before);
    expectRestored(trees, snap);
    restore(); // idempotent
  });

  it('kohya round trip: keys, F32 alpha, ss_* metadata and kohya hashes; F16 within rounding', async () => {
    const modules = tinyModules();
    await writeLoraKohya(file('k.safetensors'), modules, { metadata: { ss_network_dim: '4', ss_network_alpha: '2', modelspec: 'x' } });
    const f = await SafetensorsFile.open(file('k.safetensors'));
    expect(f.keys()).toContain('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight');
    expect(f.keys()).toContain('lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha');
    expect(f.keys()).toContain('lora_unet_up_blocks_1_resnets_0_conv2.lora_mid.weight');
    expect(f.info('lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha')).toMatchObject({ dtype: 'F32', shape: [] });
    await f.close();
    const back = await readLora(file('k.safetensors'), model);
    expect(back.format).toBe('kohya');
    expect(back.metadata).toMatchObject({ ss_network_dim: '4', ss_network_alpha: '2', modelspec: 'x' });
    expect(back.metadata.sshs_model_hash).toBe(await addnetHash(file('k.safetensors')));
    expect(back.metadata.sshs_legacy_hash).toBe('e3b0c442'); // SHA-256 of bytes [1 MiB, 1 MiB + 64 KiB): none in a small file
    const byModule = new Map(back.modules.map((x) => [x.module, x]));
    for (const mod of modules) {
      const b = byModule.get(mod.module)!;
      expect(b.component).toBe(mod.component);
      expect(b.alpha).toBe(mod.alpha);
      expect(b.down).toEqual(mod.down);
      expect(b.up).toEqual(mod.up);
      expect(b.mid).toEqual(mod.mid);
    }
    await writeLoraKohya(file('k16.safetensors'), modules, { half: true });
    const half = await readLora(file('k16.safetensors'), model);
    const h = new Map(half.modules.map((x) => [x.module, x]));
    for (const mod of modules) expect(maxAbsDiff(h.get(mod.module)!.up.data, mod.up.data)).toBeLessThan(2e-4);
  });

  it('PEFT round trip folds alpha/r into lora_B and gives the same merged weights', async () => {
    const modules = tinyModules().filter((x) => !x.mid);
    await writeLoraPeft(file('p.safetensors'), modules);
    const f = await SafetensorsFile.open(file('p.safetensors'));
    expect(f.metadata).toEqual({ format: 'pt' });
    expect(f.keys()).toContain('unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight');
    expect(f.keys()).toContain('text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight');
    await f.close();
    const back = await readLora(file('p.safetensors'), model);
    expect(back.format).toBe('peft');
    expect(back.modules).toHaveLength(modules.length);
    for (const b of back.modules) expect(b.alpha).toBe(b.down.shape[0]);
    const merged = (l: LoraFile) => {
      const restore = mergeLora(model, l, 0.8);
      const w = modules.map((x) => leafOf(x.component === 'unet' ? model.unet! : model.textEncoder!, x.module).dataSync().slice());
      restore();
      return w;
    };
    const a = merged(lora(modules));
    const b = merged(back);
    a.forEach((w, i) => expect(maxAbsDiff(w, b[i])).toBeLessThan(1e-6));
    await expect(writeLoraPeft(file('cp.safetensors'), tinyModules())).rejects.toMatchObject({ kind: 'unsupported' });
  });

  /** Write raw tensors (torch layout) to a file and return its path. */
  const raw = async (name: string, tensors: Record<string, number[]>, metadata?: Record<string, string>) => {
    const t: Record<string, WritableTensor> = {};
    for (const [k, shape] of Object.entries(tensors)) t[k] = shape.length ? rand(shape) : { shape: [], data: Float32Array.of(2) };
    await writeSafetensors(file(name), t, { metadata });
    return file(name);
  };
  const err = async (p: Promise<unknown>) => {
    const e = await p.then(() => undefined, (x: unknown) => x);
    expect(e).toBeInstanceOf(SdtuneError);
    return e as SdtuneError;
  };
  const Q = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q';
  const KQ = `lora_unet_${Q.replace(/\./g, '_')}`;

  it('reads older diffusers keys, LDM-named kohya keys, lora_te1_, PEFT adapter metadata; missing alpha = rank', async () => {
    const old = await readLora(await raw('old.safetensors', {
      'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight': [4, 32],
      'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight': [32, 4],
      'down_blocks.0.attentions.0.proj_in.lora.down.weight': [2, 32, 1, 1],
      'down_blocks.0.attentions.0.proj_in.lora.up.weight': [32, 2, 1, 1],
      'text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight': [4, 16],
      'text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight': [16, 4],
      'text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.down.weight': [4, 24],
      'text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.up.weight': [16, 4],
    }), model);
    expect(old.format).toBe('diffusers-old');
    expect(old.modules.map((x) => x.module).sort()).toEqual([
      'down_blocks.0.attentions.0.proj_in', 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0',
      'text_model.encoder.layers.0.self_attn.q_proj', 'text_model.encoder.layers.1.mlp.fc2',
    ]);
    expect(old.modules.every((x) => x.alpha === x.down.shape[0])).toBe(true);

    const ldm = await readLora(await raw('ldm.safetensors', {
      'lora_unet_input_blocks_1_1_proj_in.lora_down.weight': [4, 32, 1, 1],
      'lora_unet_input_blocks_1_1_proj_in.lora_up.weight': [32, 4, 1, 1],
      'lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v.lora_down.weight': [4, 16],
      'lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v.lora_up.weight': [32, 4],
      'lora_te1_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight': [4, 16],
      'lora_te1_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight': [16, 4],
      'lora_te1_text_model_encoder_layers_0_self_attn_v_proj.alpha': [],
    }), model);
    expect(ldm.modules.map((x) => [x.module, x.alpha]).sort()).toEqual([
      ['down_blocks.0.attentions.0.proj_in', 4],
      ['text_model.encoder.layers.0.self_attn.v_proj', 2],
      ['up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v', 4],
    ]);

    const adapter = JSON.stringify({ 'unet.lora_alpha': 8, 'unet.r': 4, 'unet.rank_pattern': {}, 'unet.alpha_pattern': { 'attn1.to_k': 2 } });
    const meta = await readLora(await raw('meta.safetensors', {
      [`unet.${Q}.lora_A.weight`]: [4, 32], [`unet.${Q}.lora_B.weight`]: [32, 4],
      [`unet.${Q.replace('to_q', 'to_k')}.lora_A.weight`]: [4, 32], [`unet.${Q.replace('to_q', 'to_k')}.lora_B.weight`]: [32, 4],
    }, { format: 'pt', lora_adapter_metadata: adapter }), model);
    expect(Object.fromEntries(meta.modules.map((x) => [x.module.split('.').at(-1), x.alpha]))).toEqual({ to_q: 8, to_k: 2 });
  });

  it('fails clearly: unknown keys and modules, shape mismatch, SDXL, LyCORIS, unknown file types', async () => {
    const down = `${KQ}.lora_down.weight`, up = `${KQ}.lora_up.weight`;
    let e = await err(readLora(await raw('u1.safetensors', { [down]: [4, 32], [up]: [32, 4], 'lora_unet_nope_to_q.lora_down.weight': [4, 32], 'lora_unet_nope_to_q.lora_up.weight': [32, 4] }), model));
    expect([e.kind, e.message]).toEqual(['format', expect.stringContaining('lora_unet_nope_to_q')]);
    e = await err(readLora(await raw('u2.safetensors', { [down]: [4, 32], [up]: [32, 4], [`${KQ}.weird`]: [4] }), model));
    expect([e.kind, e.message]).toEqual(['format', expect.stringContaining(`${KQ}.weird`)]);
    e = await err(readLora(await raw('u3.safetensors', { [down]: [4, 32] }), model));
    expect(e.message).toContain('no lora_up');
    e = await err(readLora(await raw('u4.safetensors', { [`unet.${Q}.lora_A.weight`]: [4, 32], [`unet.${Q}.lora_B.weight`]: [32, 4], 'unet.foo.lora_A.weight': [4, 32] }), model));
    expect([e.kind, e.message]).toEqual(['format', expect.stringContaining('unet:foo')]);
    // an SD 2.x-style cross-attention LoRA (context width 1024) on this model
    const k2 = KQ.replace('attn1_to_q', 'attn2_to_k');
    e = await err(readLora(await raw('sd2.safetensors', { [`${k2}.lora_down.weight`]: [4, 1024], [`${k2}.lora_up.weight`]: [32, 4] }), model));
    expect(e.kind).toBe('format');
    expect(e.message).toMatch(/\[32,16\].*\[32,1024\].*SD 2\.x/);
    // SDXL: second text encoder, metadata, or LDM names this UNet lacks
    e = await err(readLora(await raw('xl1.safetensors', { 'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight': [4, 1280], 'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight': [1280, 4] }), model));
    expect([e.kind, e.message]).toEqual(['unsupported', expect.stringContaining('SDXL')]);
    e = await err(readLora(await raw('xl2.safetensors', { [down]: [4, 32], [up]: [32, 4] }, { ss_base_model_version: 'sdxl_base_v1-0' }), model));
    expect([e.kind, e.message]).toEqual(['unsupported', expect.stringContaining('SDXL')]);
    const xl = 'lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q';
    e = await err(readLora(await raw('xl3.safetensors', { [`${xl}.lora_down.weight`]: [4, 640], [`${xl}.lora_up.weight`]: [640, 4] }), model));
    expect([e.kind, e.message]).toEqual(['unsupported', expect.stringMatching(/input_blocks_4_1.*SDXL/)]);
    e = await err(readLora(await raw('loha.safetensors', { [`${KQ}.hada_w1_a`]: [32, 4], [`${KQ}.hada_w1_b`]: [4, 32] }), model));
    expect([e.kind, e.message]).toEqual(['unsupported', expect.stringContaining('LoHa')]);
    e = await err(readLora(file('x.onnx'), model)); // pickles (.pt/.bin) are read as data: test/io/pickle.test.ts
    expect(e.kind).toBe('unsupported');
    // merging into a model without the text encoder
    const te = lin('text_encoder', 'text_model.encoder.layers.0.self_attn.q_proj', 16, 16, 2, 2);
    const before = tf.memory().numTensors;
    expect(() => mergeLora({ unet: model.unet }, lora([tinyModules()[0], te]), 1)).toThrow(/text encoder/);
    expect(tf.memory().numTensors).toBe(before); // the partial merge was undone
  });
});
