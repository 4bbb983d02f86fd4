// SD 2.x single files: OpenCLIP text-tower keys (cond_stage_model.model.*, fused in_proj), the penultimate-layer cut,
// SD 2 presets when no config is given, the 5-channel depth UNet; and the golden tiny-sd2-depth.safetensors.
import { mkdtemp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { type CheckpointSource, openCheckpoint, readComponent, readTensorRef } from '../../src/io/checkpoint.js';
import { diffusersToLdmTable, openClipToDiffusers, transformShape } from '../../src/io/ldm-keymap.js';
import { convertCheckpoint } from '../../src/io/convert.js';
import { SafetensorsFile, type WritableTensor, writeSafetensors } from '../../src/io/safetensors.js';
import { describeGolden, golden } from '../golden.js';
import { maxAbsDiff } from '../helpers.js';

const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
const filled = (shape: number[], v: number): WritableTensor => ({ shape, data: new Float32Array(numel(shape)).fill(v) });

/** Diffusers UNet keys -> shapes: one level pair [c0, c1], one resnet per level, attention on level 0, linear projections. */
function unetShapes(c0: number, c1: number, ctx: number, inCh: number): Map<string, number[]> {
  const s = new Map<string, number[]>();
  const lin = (p: string, o: number, i: number, bias = true) => (s.set(`${p}.weight`, [o, i]), bias && s.set(`${p}.bias`, [o]));
  const conv = (p: string, o: number, i: number, k = 3) => (s.set(`${p}.weight`, [o, i, k, k]), s.set(`${p}.bias`, [o]));
  const norm = (p: string, c: number) => (s.set(`${p}.weight`, [c]), s.set(`${p}.bias`, [c]));
  const temb = 4 * c0;
  const resnet = (p: string, i: number, o: number) => {
    norm(`${p}.norm1`, i), conv(`${p}.conv1`, o, i), lin(`${p}.time_emb_proj`, o, temb), norm(`${p}.norm2`, o), conv(`${p}.conv2`, o, o);
    if (i !== o) conv(`${p}.conv_shortcut`, o, i, 1);
  };
  const xf = (p: string, c: number) => {
    norm(`${p}.norm`, c), lin(`${p}.proj_in`, c, c), lin(`${p}.proj_out`, c, c);
    const t = `${p}.transformer_blocks.0`;
    for (const n of ['norm1', 'norm2', 'norm3']) norm(`${t}.${n}`, c);
    for (const a of ['attn1', 'attn2']) {
      const kv = a === 'attn1' ? c : ctx;
      lin(`${t}.${a}.to_q`, c, c, false), lin(`${t}.${a}.to_k`, c, kv, false), lin(`${t}.${a}.to_v`, c, kv, false), lin(`${t}.${a}.to_out.0`, c, c);
    }
    lin(`${t}.ff.net.0.proj`, 8 * c, c), lin(`${t}.ff.net.2`, c, 4 * c);
  };
  lin('time_embedding.linear_1', temb, c0), lin('time_embedding.linear_2', temb, temb), conv('conv_in', c0, inCh);
  resnet('down_blocks.0.resnets.0', c0, c0), xf('down_blocks.0.attentions.0', c0), conv('down_blocks.0.downsamplers.0.conv', c0, c0);
  resnet('down_blocks.1.resnets.0', c0, c1);
  resnet('mid_block.resnets.0', c1, c1), xf('mid_block.attentions.0', c1), resnet('mid_block.resnets.1', c1, c1);
  resnet('up_blocks.0.resnets.0', 2 * c1, c1), resnet('up_blocks.0.resnets.1', c1 + c0, c1), conv('up_blocks.0.upsamplers.0.conv', c1, c1);
  resnet('up_blocks.1.resnets.0', c1 + c0, c0), xf('up_blocks.1.attentions.0', c0), resnet('up_blocks.1.resnets.1', 2 * c0, c0), xf('up_blocks.1.attentions.1', c0);
  norm('conv_norm_out', c0), conv('conv_out', 4, c0);
  return s;
}

/**
 * An OpenCLIP text tower as SD 2 files hold it (`cond_stage_model.model.*`): `layers` resblocks of width w, each fused
 * in_proj's q, k, v thirds filled with 1, 2, 3 (+ 10 x layer) so the split can be checked; text_projection and logit_scale.
 */
function openClip(w: number, layers: number): Map<string, WritableTensor> {
  const P = 'cond_stage_model.model.';
  const m = new Map<string, WritableTensor>();
  const thirds = (rows: number, cols: number, base: number): WritableTensor => {
    const data = new Float32Array(3 * rows * Math.max(cols, 1));
    for (let i = 0; i < 3; i++) data.fill(base + i + 1, i * data.length / 3, (i + 1) * data.length / 3);
    return { shape: cols ? [3 * rows, cols] : [3 * rows], data };
  };
  m.set(`${P}token_embedding.weight`, filled([100, w], 0.1)).set(`${P}positional_embedding`, filled([77, w], 0.2));
  m.set(`${P}ln_final.weight`, filled([w], 1)).set(`${P}ln_final.bias`, filled([w], 0));
  m.set(`${P}text_projection`, filled([w, w], 0.3)).set(`${P}logit_scale`, filled([], 4.6));
  for (let l = 0; l < layers; l++) {
    const b = `${P}transformer.resblocks.${l}.`;
    m.set(`${b}attn.in_proj_weight`, thirds(w, w, 10 * l)).set(`${b}attn.in_proj_bias`, thirds(w, 0, 10 * l));
    m.set(`${b}attn.out_proj.weight`, filled([w, w], 0.01)).set(`${b}attn.out_proj.bias`, filled([w], 0));
    for (const n of ['ln_1', 'ln_2']) m.set(`${b}${n}.weight`, filled([w], 1)).set(`${b}${n}.bias`, filled([w], 0));
    m.set(`${b}mlp.c_fc.weight`, filled([4 * w, w], 0.01)).set(`${b}mlp.c_fc.bias`, filled([4 * w], 0));
    m.set(`${b}mlp.c_proj.weight`, filled([w, 4 * w], 0.01)).set(`${b}mlp.c_proj.bias`, filled([w], 0));
  }
  return m;
}

/** An SD 2-style single file: UNet (+ depth channel when inCh is 5) through our reverse table, and the OpenCLIP tower. */
function sd2File(inCh: number, layers: number, extra: [string, WritableTensor][] = []): Map<string, WritableTensor> {
  const out = new Map<string, WritableTensor>();
  const u = unetShapes(64, 128, 64, inCh);
  for (const e of diffusersToLdmTable('unet', u.keys())) out.set(e.to, filled(transformShape(e.transform, u.get(e.from)!, e.to), 0.5));
  for (const [k, t] of openClip(64, layers)) out.set(k, t);
  for (const [k, t] of extra) out.set(k, t);
  return out;
}

async function expectError(p: Promise<unknown>, kind: string, ...parts: RegExp[]): Promise<SdtuneError> {
  const e = await p.then(() => undefined, (x) => x);
  expect(e).toBeInstanceOf(SdtuneError);
  expect((e as SdtuneError).kind, (e as Error).message).toBe(kind);
  for (const part of parts) expect((e as Error).message).toMatch(part);
  return e as SdtuneError;
}

let tmp: string;
beforeAll(async () => void (tmp = await mkdtemp(path.join(tmpdir(), 'sdtune-sd2-'))));
afterAll(async () => rm(tmp, { recursive: true, force: true }));

describe('OpenCLIP key rules', () => {
  it('maps fixed keys, splits in_proj into q/k/v thirds, ignores the contrastive head, rejects the rest', () => {
    expect(openClipToDiffusers('positional_embedding')).toEqual([{ to: 'text_model.embeddings.position_embedding.weight', transform: 'none' }]);
    expect(openClipToDiffusers('ln_final.bias')).toEqual([{ to: 'text_model.final_layer_norm.bias', transform: 'none' }]);
    expect(openClipToDiffusers('transformer.resblocks.7.mlp.c_fc.weight')).toEqual([{ to: 'text_model.encoder.layers.7.mlp.fc1.weight', transform: 'none' }]);
    expect(openClipToDiffusers('transformer.resblocks.0.attn.in_proj_bias')!.map((r) => [r.to, r.transform])).toEqual([
      ['text_model.encoder.layers.0.self_attn.q_proj.bias', 'qkv_q'],
      ['text_model.encoder.layers.0.self_attn.k_proj.bias', 'qkv_k'],
      ['text_model.encoder.layers.0.self_attn.v_proj.bias', 'qkv_v'],
    ]);
    expect(openClipToDiffusers('text_projection')).toEqual([]);
    expect(openClipToDiffusers('transformer.resblocks.0.attn.foo.weight')).toBeUndefined();
    expect(transformShape('qkv_k', [3072, 1024], 'k')).toEqual([1024, 1024]);
    expect(() => transformShape('qkv_q', [3000, 1024], 'x.in_proj_weight')).toThrow(/x\.in_proj_weight.*\[3000,1024\].*fused q,k,v/);
  });
});

describe('SD 2.x single files (synthetic)', () => {
  it('a depth file without configs: SD 2 presets, q/k/v split, the 24th OpenCLIP layer cut, epsilon scheduler, notes', async () => {
    const f = path.join(tmp, 'depth.safetensors');
    // + two tensors of the MiDaS depth estimator that real 512-depth-ema files carry
    await writeSafetensors(f, sd2File(5, 24, [['depth_model.model.pretrained.model.cls_token', filled([1, 1, 8], 0)], ['depth_model.model.scratch.output_conv.4.bias', filled([1], 0)]]));
    const src = await openCheckpoint(f);
    try {
      expect(src.variant).toBe('depth');
      const te = src.components.text_encoder!;
      expect(te.config).toMatchObject({ hidden_act: 'gelu', num_hidden_layers: 23, hidden_size: 64, num_attention_heads: 1, eos_token_id: 2, intermediate_size: 256 });
      expect(te.tensors.has('text_model.encoder.layers.22.mlp.fc2.bias')).toBe(true);
      expect([...te.tensors.keys()].some((k) => k.includes('layers.23.'))).toBe(false);
      expect(te.tensors.size).toBe(4 + 23 * 16);
      for (const [i, p] of ['q', 'k', 'v'].entries()) {
        const wq = await readTensorRef(te.tensors.get(`text_model.encoder.layers.3.self_attn.${p}_proj.weight`)!);
        expect(wq.shape).toEqual([64, 64]);
        expect(new Set(wq.data)).toEqual(new Set([30 + i + 1]));
        const bq = await readTensorRef(te.tensors.get(`text_model.encoder.layers.3.self_attn.${p}_proj.bias`)!);
        expect([...new Set(bq.data)]).toEqual([30 + i + 1]);
      }
      expect(src.components.unet!.config).toMatchObject({ in_channels: 5, attention_head_dim: [1, 2], use_linear_projection: true, cross_attention_dim: 64, sample_size: 64 });
      expect(src.schedulerConfig.prediction_type).toBe('epsilon');
      const notes = src.notes.join('\n');
      expect(notes).toMatch(/OpenCLIP layer 23 \(the last\) not loaded/);
      expect(notes).toMatch(/cond_stage_model\.model\.text_projection/);
      expect(notes).toMatch(/SD 2\.x presets/);
      expect(notes).toMatch(/ignored the 2 tensors of the MiDaS depth estimator \(depth_model\.\*\)/);
      expect(notes).toMatch(/epsilon/);
    } finally {
      await src.close();
    }
  });

  it('a plain 2.x file defaults to v-prediction (as diffusers) and says how to choose; a given config decides the layer count', async () => {
    const f = path.join(tmp, 'v2.safetensors');
    await writeSafetensors(f, sd2File(4, 3));
    let src: CheckpointSource = await openCheckpoint(f);
    try {
      expect(src.variant).toBe('v1');
      expect(src.schedulerConfig.prediction_type).toBe('v_prediction');
      expect(src.notes.join('\n')).toMatch(/v_prediction.*--config DIR for an epsilon model/);
      expect(src.components.unet!.config.sample_size).toBe(96);
      // 3 layers, not 24: kept (a tower already cut, as diffusers' converter writes it), with a note
      expect(src.components.text_encoder!.config.num_hidden_layers).toBe(3);
      expect(src.notes.join('\n')).toMatch(/all 3 OpenCLIP layers used/);
    } finally {
      await src.close();
    }
    // a config of 2 layers: the third is the cut one; a config of 1 layer contradicts the weights
    const cfg = path.join(tmp, 'cfg');
    await mkdir(path.join(cfg, 'text_encoder'), { recursive: true });
    const te = { architectures: ['CLIPTextModel'], hidden_act: 'gelu', hidden_size: 64, intermediate_size: 256, num_attention_heads: 1, num_hidden_layers: 2, vocab_size: 100, max_position_embeddings: 77 };
    await writeFile(path.join(cfg, 'text_encoder', 'config.json'), JSON.stringify(te));
    src = await openCheckpoint(f, { configDir: cfg });
    try {
      expect(src.components.text_encoder!.tensors.has('text_model.encoder.layers.1.mlp.fc1.weight')).toBe(true);
      expect([...src.components.text_encoder!.tensors.keys()].some((k) => k.includes('layers.2.'))).toBe(false);
    } finally {
      await src.close();
    }
    await writeFile(path.join(cfg, 'text_encoder', 'config.json'), JSON.stringify({ ...te, num_hidden_layers: 1 }));
    await expectError(openCheckpoint(f, { configDir: cfg }), 'format', /num_hidden_layers is 1 in the config but 3 in the weights/);
  });

  it('refuses a malformed fused projection and an unknown OpenCLIP key, naming them', async () => {
    const bad = path.join(tmp, 'bad.safetensors');
    await writeSafetensors(bad, sd2File(5, 2, [['cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight', filled([190, 64], 0)]]));
    await expectError(openCheckpoint(bad), 'format', /resblocks\.1\.attn\.in_proj_weight/, /\[190,64\]/);
    const odd = path.join(tmp, 'odd.safetensors');
    await writeSafetensors(odd, sd2File(5, 2, [['cond_stage_model.model.transformer.resblocks.0.attn.qkv.weight', filled([4], 0)]]));
    await expectError(openCheckpoint(odd), 'format', /unexpected key "cond_stage_model\.model\.transformer\.resblocks\.0\.attn\.qkv\.weight"/, /OpenCLIP/);
  });
});

describeGolden('golden tiny-sd2-depth.safetensors', () => {
  it('with the folder as config: every tensor equals the diffusers folder (q/k/v split exactly), tokenizer pads with "!"', async () => {
    const a = await openCheckpoint(golden('tiny-sd2-depth.safetensors'), { configDir: golden('tiny-sd2-depth') });
    const b = await openCheckpoint(golden('tiny-sd2-depth'));
    try {
      expect(a.variant).toBe('depth');
      expect(a.tokenizerDir).toBe(golden('tiny-sd2-depth', 'tokenizer'));
      for (const c of ['unet', 'text_encoder'] as const) {
        const [ta, tb] = [await readComponent(a.components[c]!), await readComponent(b.components[c]!)];
        expect(ta.size).toBe(tb.size);
        for (const [k, t] of tb) {
          expect(ta.get(k)?.shape, k).toEqual(t.shape);
          expect(maxAbsDiff(ta.get(k)!.data, t.data), k).toBe(0);
        }
      }
      expect(a.components.text_encoder!.tensors.size).toBe(52);
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });

  it('convert writes an SD 2 folder as the single file diffusers\' converter makes (OpenCLIP keys, fused in_proj), and back', async () => {
    const out = path.join(tmp, 'sd2-depth.safetensors');
    const r = await convertCheckpoint(golden('tiny-sd2-depth'), out);
    expect(r.layout).toBe('single-file');
    const [ours, ref] = [await SafetensorsFile.open(out), await SafetensorsFile.open(golden('tiny-sd2-depth.safetensors'))];
    try {
      // the folder has no VAE: every UNet and text-encoder key of the reference file, each bit-identical
      const want = ref.keys().filter((k) => !k.startsWith('first_stage_model.'));
      expect(ours.keys().sort()).toEqual(want.sort());
      for (const k of want) expect(maxAbsDiff((await ours.readFloat(k)).data, (await ref.readFloat(k)).data), k).toBe(0);
    } finally {
      await Promise.all([ours.close(), ref.close()]);
    }
    // and it opens as the depth model again, with its embedded configs (no --config needed)
    const back = await openCheckpoint(out);
    try {
      expect(back.variant).toBe('depth');
      expect(back.components.text_encoder!.config.num_hidden_layers).toBe(3);
      expect(back.schedulerConfig.prediction_type).toBe('v_prediction');
    } finally {
      await back.close();
    }
    // to a folder again: a depth pipeline's model_index.json (the folder had one; the file does not carry it)
    const dir = path.join(tmp, 'sd2-depth-folder');
    await convertCheckpoint(out, dir);
    const index = JSON.parse(await readFile(path.join(dir, 'model_index.json'), 'utf8'));
    expect([index._class_name, index.depth_estimator]).toEqual(['StableDiffusionDepth2ImgPipeline', [null, null]]);
    const again = await openCheckpoint(dir);
    expect(again.variant).toBe('depth');
    await again.close();
  });

  it('without configs: the heads of 32-wide blocks cannot be inferred, and the error says to pass --config', async () => {
    await expectError(openCheckpoint(golden('tiny-sd2-depth.safetensors')), 'format', /attention heads/, /--config DIR/);
  });
});
