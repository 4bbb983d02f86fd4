import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { openCheckpoint, readComponent, readTensorRef, type CheckpointSource } from '../../src/io/checkpoint.js';
import { diffusersToLdmTable, emaKey, ldmToDiffusersTable, transformShape, type Component } from '../../src/io/ldm-keymap.js';
import { SafetensorsFile, writeSafetensors, type WritableTensor } from '../../src/io/safetensors.js';
import { inferTextEncoderConfig, inferUnetConfig, inferVaeConfig, STRUCTURAL_FIELDS } from '../../src/models/presets.js';
import { describeGolden, golden } from '../golden.js';

type Shapes = Map<string, number[]>;

/** Diffusers key -> shape of a small SD-v1-structured UNet (only the shapes config inference reads are exact). */
function synthUnet(boc: number[], lpb: number, attn: boolean[], ctx: number, inCh = 4): Shapes {
  const s: Shapes = new Map();
  const lin = (p: string, o: number, i: number, bias = true) => (s.set(`${p}.weight`, [o, i]), bias && s.set(`${p}.bias`, [o]));
  const conv = (p: string, o: number, i: number, k = 3) => (s.set(`${p}.weight`, [o, i, k, k]), s.set(`${p}.bias`, [o]));
  const norm = (p: string, c: number) => (s.set(`${p}.weight`, [c]), s.set(`${p}.bias`, [c]));
  const temb = 4 * boc[0];
  const resnet = (p: string, i: number, o: number) => {
    norm(`${p}.norm1`, i), conv(`${p}.conv1`, o, i), lin(`${p}.time_emb_proj`, o, temb), norm(`${p}.norm2`, o), conv(`${p}.conv2`, o, o);
    if (i !== o) conv(`${p}.conv_shortcut`, o, i, 1);
  };
  const xf = (p: string, c: number) => {
    norm(`${p}.norm`, c), conv(`${p}.proj_in`, c, c, 1), conv(`${p}.proj_out`, c, c, 1);
    const t = `${p}.transformer_blocks.0`;
    for (const n of ['norm1', 'norm2', 'norm3']) norm(`${t}.${n}`, c);
    for (const a of ['attn1', 'attn2']) {
      const kv = a === 'attn1' ? c : ctx;
      lin(`${t}.${a}.to_q`, c, c, false), lin(`${t}.${a}.to_k`, c, kv, false), lin(`${t}.${a}.to_v`, c, kv, false), lin(`${t}.${a}.to_out.0`, c, c);
    }
    lin(`${t}.ff.net.0.proj`, 8 * c, c), lin(`${t}.ff.net.2`, c, 4 * c);
  };
  lin('time_embedding.linear_1', temb, boc[0]), lin('time_embedding.linear_2', temb, temb), conv('conv_in', boc[0], inCh);
  let ch = boc[0];
  boc.forEach((o, b) => {
    for (let j = 0; j < lpb; j++) (resnet(`down_blocks.${b}.resnets.${j}`, ch, o), (ch = o), attn[b] && xf(`down_blocks.${b}.attentions.${j}`, o));
    if (b < boc.length - 1) conv(`down_blocks.${b}.downsamplers.0.conv`, o, o);
  });
  resnet('mid_block.resnets.0', ch, ch), xf('mid_block.attentions.0', ch), resnet('mid_block.resnets.1', ch, ch);
  const up = [...attn].reverse();
  [...boc].reverse().forEach((o, b) => {
    for (let j = 0; j <= lpb; j++) (resnet(`up_blocks.${b}.resnets.${j}`, ch + o, o), (ch = o), up[b] && xf(`up_blocks.${b}.attentions.${j}`, o));
    if (b < boc.length - 1) conv(`up_blocks.${b}.upsamplers.0.conv`, o, o);
  });
  norm('conv_norm_out', boc[0]), conv('conv_out', 4, boc[0]);
  return s;
}

/** Diffusers key -> shape of a small VAE. */
function synthVae(boc: number[], lpb: number, latent = 4): Shapes {
  const s: Shapes = new Map();
  const conv = (p: string, o: number, i: number, k = 3) => (s.set(`${p}.weight`, [o, i, k, k]), s.set(`${p}.bias`, [o]));
  const norm = (p: string, c: number) => (s.set(`${p}.weight`, [c]), s.set(`${p}.bias`, [c]));
  const resnet = (p: string, i: number, o: number) => {
    norm(`${p}.norm1`, i), conv(`${p}.conv1`, o, i), norm(`${p}.norm2`, o), conv(`${p}.conv2`, o, o);
    if (i !== o) conv(`${p}.conv_shortcut`, o, i, 1);
  };
  const mid = (side: string, c: number) => {
    resnet(`${side}.mid_block.resnets.0`, c, c), resnet(`${side}.mid_block.resnets.1`, c, c), norm(`${side}.mid_block.attentions.0.group_norm`, c);
    for (const n of ['to_q', 'to_k', 'to_v', 'to_out.0']) s.set(`${side}.mid_block.attentions.0.${n}.weight`, [c, c]), s.set(`${side}.mid_block.attentions.0.${n}.bias`, [c]);
  };
  let ch = boc[0];
  conv('encoder.conv_in', ch, 3);
  boc.forEach((o, i) => {
    for (let j = 0; j < lpb; j++) (resnet(`encoder.down_blocks.${i}.resnets.${j}`, ch, o), (ch = o));
    if (i < boc.length - 1) conv(`encoder.down_blocks.${i}.downsamplers.0.conv`, o, o);
  });
  mid('encoder', ch), norm('encoder.conv_norm_out', ch), conv('encoder.conv_out', 2 * latent, ch);
  conv('quant_conv', 2 * latent, 2 * latent, 1), conv('post_quant_conv', latent, latent, 1), conv('decoder.conv_in', ch, latent), mid('decoder', ch);
  [...boc].reverse().forEach((o, i) => {
    for (let j = 0; j <= lpb; j++) (resnet(`decoder.up_blocks.${i}.resnets.${j}`, ch, o), (ch = o));
    if (i < boc.length - 1) conv(`decoder.up_blocks.${i}.upsamplers.0.conv`, o, o);
  });
  norm('decoder.conv_norm_out', ch), conv('decoder.conv_out', 3, ch);
  return s;
}

/** Diffusers key -> shape of a small CLIP text tower. */
function synthClip(width: number, layers: number, inter: number, vocab = 100): Shapes {
  const s: Shapes = new Map([['text_model.embeddings.token_embedding.weight', [vocab, width]], ['text_model.embeddings.position_embedding.weight', [77, width]]]);
  const lin = (p: string, o: number, i: number) => (s.set(`${p}.weight`, [o, i]), s.set(`${p}.bias`, [o]));
  for (let l = 0; l < layers; l++) {
    const p = `text_model.encoder.layers.${l}`;
    for (const n of ['q_proj', 'k_proj', 'v_proj', 'out_proj']) lin(`${p}.self_attn.${n}`, width, width);
    for (const n of ['layer_norm1', 'layer_norm2']) s.set(`${p}.${n}.weight`, [width]), s.set(`${p}.${n}.bias`, [width]);
    lin(`${p}.mlp.fc1`, inter, width), lin(`${p}.mlp.fc2`, width, inter);
  }
  s.set('text_model.final_layer_norm.weight', [width]), s.set('text_model.final_layer_norm.bias', [width]);
  return s;
}

const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
const filled = (shape: number[], v: number): WritableTensor => ({ shape, data: new Float32Array(numel(shape)).fill(v) });

/** Write a single-file LDM checkpoint from diffusers shapes (through our own reverse table), all values `v`. */
function ldmTensors(parts: Partial<Record<Component, Shapes>>, v = 0.5): Map<string, WritableTensor> {
  const out = new Map<string, WritableTensor>();
  for (const [c, shapes] of Object.entries(parts) as [Component, Shapes][])
    for (const e of diffusersToLdmTable(c, shapes.keys())) out.set(e.to, filled(transformShape(e.transform, shapes.get(e.from)!, e.to), v));
  return out;
}

async function expectError(p: Promise<unknown>, kind: string, ...parts: (string | RegExp)[]): Promise<SdtuneError> {
  const e = await p.then(() => undefined, (x) => x);
  expect(e).toBeInstanceOf(SdtuneError);
  expect((e as SdtuneError).kind, (e as Error).message).toBe(kind);
  for (const part of parts) expect((e as Error).message).toMatch(part);
  return e as SdtuneError;
}

let tmp: string;
beforeAll(async () => void (tmp = await mkdtemp(path.join(tmpdir(), 'sdtune-ckpt-'))));
afterAll(async () => rm(tmp, { recursive: true, force: true }));

const UNET = () => synthUnet([32, 64], 1, [true, false], 16);
const VAE = () => synthVae([32, 64], 1);
const CLIP = () => synthClip(128, 2, 200);

describe('single files (synthetic)', () => {
  it('infers configs from shapes (SD v1 preset + structure), with a note', async () => {
    const f = path.join(tmp, 'synth.safetensors');
    await writeSafetensors(f, ldmTensors({ unet: UNET(), vae: VAE(), text_encoder: CLIP() }));
    const src = await openCheckpoint(f);
    expect(src).toMatchObject({ layout: 'single-file', variant: 'v1', dtype: 'float32', hasEma: false, usedEma: false, tokenizerDir: undefined });
    expect(src.notes).toContain('config inferred from tensor shapes (SD v1 preset)');
    expect(src.components.unet!.config).toMatchObject({
      block_out_channels: [32, 64], layers_per_block: 1, in_channels: 4, out_channels: 4, cross_attention_dim: 16, attention_head_dim: 8,
      down_block_types: ['CrossAttnDownBlock2D', 'DownBlock2D'], up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D'], use_linear_projection: false,
    });
    expect(src.components.vae!.config).toMatchObject({ block_out_channels: [32, 64], layers_per_block: 1, latent_channels: 4, scaling_factor: 0.18215 });
    expect(src.components.text_encoder!.config).toMatchObject({ hidden_size: 128, num_attention_heads: 2, intermediate_size: 200, num_hidden_layers: 2, vocab_size: 100, hidden_act: 'quick_gelu' });
    expect(src.schedulerConfig).toMatchObject({ _class_name: 'PNDMScheduler', beta_schedule: 'scaled_linear', steps_offset: 1 });
    const ref = src.components.vae!.tensors.get('decoder.mid_block.attentions.0.to_k.weight')!;
    expect(ref).toMatchObject({ name: 'first_stage_model.decoder.mid.attn_1.k.weight', shape: [64, 64], transform: 'conv1x1_to_linear' });
    expect((await readTensorRef(ref)).shape).toEqual([64, 64]);
    await src.close();
  });

  it('inpainting (9 input channels) and EMA weights (§2.3), used only when asked', async () => {
    const f = path.join(tmp, 'ema.safetensors');
    const t = ldmTensors({ unet: synthUnet([32, 64], 1, [true, false], 16, 9) }, 0);
    for (const [k, v] of [...t]) if (k.startsWith('model.diffusion_model.')) t.set(emaKey(k), filled(v.shape, 1));
    t.set('model_ema.decay', filled([], 0.999));
    await writeSafetensors(f, t);
    const plain = await openCheckpoint(f);
    expect(plain).toMatchObject({ variant: 'inpaint', hasEma: true, usedEma: false });
    expect(plain.components.unet!.config.in_channels).toBe(9);
    expect((await readTensorRef(plain.components.unet!.tensors.get('conv_in.weight')!)).data[0]).toBe(0);
    await plain.close();
    const ema = await openCheckpoint(f, { ema: true });
    expect(ema).toMatchObject({ hasEma: true, usedEma: true });
    const w = await readComponent(ema.components.unet!);
    expect(w.get('conv_in.weight')!.shape).toEqual([32, 9, 3, 3]);
    expect([...w.values()].every((x) => x.data.every((v) => v === 1))).toBe(true);
    await ema.close();
    const noEma = path.join(tmp, 'synth-noema.safetensors');
    await writeSafetensors(noEma, ldmTensors({ unet: UNET() }));
    await expectError(openCheckpoint(noEma, { ema: true }), 'usage', /no EMA weights/);
  });

  it('restores configs embedded by our writer, and checks given configs against the weights', async () => {
    const configs = { unet: { ...inferUnetConfig(UNET()), attention_head_dim: 4 }, scheduler: { _class_name: 'DDIMScheduler' } };
    const f = path.join(tmp, 'embedded.safetensors');
    await writeSafetensors(f, ldmTensors({ unet: UNET() }), { metadata: { sdtune_configs: JSON.stringify(configs) } });
    const src = await openCheckpoint(f);
    expect(src.components.unet!.config).toEqual(configs.unet);
    expect(src.schedulerConfig).toEqual(configs.scheduler);
    expect(src.notes.join('\n')).not.toMatch(/inferred/);
    await src.close();

    const cfgDir = path.join(tmp, 'cfg');
    await mkdir(path.join(cfgDir, 'unet'), { recursive: true });
    await writeFile(path.join(cfgDir, 'unet', 'config.json'), JSON.stringify({ ...configs.unet, in_channels: 9, foo: 1 }));
    await expectError(openCheckpoint(f, { configDir: cfgDir }), 'format', /in_channels is 9 in the config but 4 in the weights/);
    await writeFile(path.join(cfgDir, 'unet', 'config.json'), JSON.stringify({ ...configs.unet, foo: 1 }));
    const withDir = await openCheckpoint(f, { configDir: cfgDir });
    expect(withDir.components.unet!.config.foo).toBe(1);
    expect(withDir.notes.join('\n')).toMatch(/ignored unknown config key foo/);
    await withDir.close();
  });

  it('old CLIP names and scheduler buffers in a single file', async () => {
    const t = ldmTensors({ unet: UNET(), text_encoder: CLIP() });
    for (const [k, v] of [...t])
      if (k.startsWith('cond_stage_model.transformer.text_model.')) (t.delete(k), t.set(k.replace('.text_model.', '.'), v));
    t.set('alphas_cumprod', filled([1000], 0.5));
    t.set('cond_stage_model.transformer.embeddings.position_ids', { shape: [1, 77], data: new Int32Array(77), dtype: 'I64' });
    const f = path.join(tmp, 'oldclip.safetensors');
    await writeSafetensors(f, t);
    const src = await openCheckpoint(f);
    expect([...src.components.text_encoder!.tensors.keys()].sort()).toEqual([...CLIP().keys()].sort());
    expect(src.notes.join('\n')).toMatch(/ignored 2 non-weight key\(s\): .*alphas_cumprod/);
    await src.close();
  });

  it('a VAE-only LDM file (names with or without first_stage_model.) opens as the VAE alone', async () => {
    for (const prefix of ['', 'first_stage_model.', 'vae.']) {
      const f = path.join(tmp, `vae-only-${prefix || 'bare'}.safetensors`);
      const t = ldmTensors({ vae: VAE() });
      await writeSafetensors(f, new Map([...t].map(([k, v]) => [prefix + k.slice('first_stage_model.'.length), v])));
      const src = await openCheckpoint(f);
      expect(Object.keys(src.components)).toEqual(['vae']);
      expect(new Set(src.components.vae!.tensors.keys())).toEqual(new Set(VAE().keys()));
      await src.close();
    }
  });

  it('refuses other families, LoRAs, embeddings and unknown files with what they are', async () => {
    const v2 = path.join(tmp, 'v2.safetensors');
    await writeSafetensors(v2, ldmTensors({ unet: synthUnet([32, 64], 2, [true, false], 1024) }));
    // an SD 2.x file opens (test/io/sd2-loading.test.ts); without configs, widths that are not multiples of 64 leave its heads unknown
    const e1 = await expectError(openCheckpoint(v2), 'format', /attention heads/, /--config/);
    expect(e1.message).toContain(v2);
    const xl = path.join(tmp, 'xl.safetensors');
    await writeSafetensors(xl, new Map([...ldmTensors({ unet: UNET() }), ['conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias', filled([4], 0)]]));
    await expectError(openCheckpoint(xl), 'unsupported', /SDXL/);
    const lora = path.join(tmp, 'lora.safetensors');
    await writeSafetensors(lora, { 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight': filled([4, 32], 0), 'lora_unet_down_blocks_0_attentions_0_proj_in.alpha': filled([], 4) });
    await expectError(openCheckpoint(lora), 'format', /is a LoRA/, /--lora/);
    const emb = path.join(tmp, 'emb.safetensors');
    await writeSafetensors(emb, { '<tok>': filled([2, 32], 0) });
    await expectError(openCheckpoint(emb), 'format', /textual-inversion embedding/, /--embedding/);
    const junk = path.join(tmp, 'junk.safetensors');
    await writeSafetensors(junk, { a: filled([2], 0), b: filled([3], 0) });
    await expectError(openCheckpoint(junk), 'format', /not a Stable Diffusion checkpoint/);
    await expectError(openCheckpoint(path.join(tmp, 'missing.safetensors')), 'file', /no such file/);
  });
});

describe('pickles', () => {
  // read as data by src/io/pickle.ts (test/io/pickle.test.ts); here: what openCheckpoint says about files that are not
  it('.ckpt/.pt/.pth/.bin files that are not torch.save files, and a folder with diffusers .bin weights that are not', async () => {
    for (const ext of ['ckpt', 'pt', 'pth', 'bin']) {
      const f = path.join(tmp, `model.${ext}`);
      await writeFile(f, 'not really a pickle');
      await expectError(openCheckpoint(f), 'file', /not a PyTorch file \(neither a torch\.save zip nor a pickle/);
    }
    const dir = path.join(tmp, 'picklefolder', 'unet');
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'config.json'), JSON.stringify({ _class_name: 'UNet2DConditionModel' }));
    await writeFile(path.join(dir, 'diffusion_pytorch_model.bin'), 'x');
    await expectError(openCheckpoint(path.dirname(dir)), 'file', /diffusion_pytorch_model\.bin: file too short/);
  });
});

describe('diffusers folders (synthetic)', () => {
  const plainTensors = (shapes: Shapes, v: number) => new Map([...shapes].map(([k, s]) => [k, filled(s, v)]));

  it('picks plain weights, the fp16 variant when asked or when it is the only one, and sharded indexes', async () => {
    const root = path.join(tmp, 'variants');
    const unet = path.join(root, 'unet'), vae = path.join(root, 'vae');
    await mkdir(unet, { recursive: true });
    await mkdir(vae, { recursive: true });
    await writeFile(path.join(unet, 'config.json'), JSON.stringify({ ...inferUnetConfig(UNET()), torch_dtype: 'float16', extra_thing: true }));
    await writeSafetensors(path.join(unet, 'diffusion_pytorch_model.safetensors'), plainTensors(UNET(), 1));
    await writeSafetensors(path.join(unet, 'diffusion_pytorch_model.fp16.safetensors'), plainTensors(UNET(), 2), { floatDtype: 'F16' });
    // the VAE is sharded in two files and has only the fp16 variant
    await writeFile(path.join(vae, 'config.json'), JSON.stringify(inferVaeConfig(VAE())));
    const keys = [...VAE().keys()];
    const half = Math.floor(keys.length / 2);
    const shard = (ks: string[]) => new Map(ks.map((k) => [k, filled(VAE().get(k)!, 3)]));
    await writeSafetensors(path.join(vae, 'a.safetensors'), shard(keys.slice(0, half)), { floatDtype: 'F16' });
    await writeSafetensors(path.join(vae, 'b.safetensors'), shard(keys.slice(half)), { floatDtype: 'F16' });
    await writeFile(path.join(vae, 'diffusion_pytorch_model.fp16.safetensors.index.json'),
      JSON.stringify({ metadata: {}, weight_map: Object.fromEntries(keys.map((k, i) => [k, i < half ? 'a.safetensors' : 'b.safetensors'])) }));

    const src = await openCheckpoint(root);
    expect(src).toMatchObject({ layout: 'diffusers', variant: 'v1', dtype: 'mixed', modelIndex: undefined });
    expect(src.components.unet!.tensors.get('conv_in.weight')!.file.path).toMatch(/diffusion_pytorch_model\.safetensors$/);
    expect(src.components.vae!.tensors.size).toBe(keys.length);
    expect(new Set([...src.components.vae!.tensors.values()].map((r) => path.basename(r.file.path)))).toEqual(new Set(['a.safetensors', 'b.safetensors']));
    expect((await readTensorRef(src.components.vae!.tensors.get(keys.at(-1)!)!)).data[0]).toBe(3);
    expect(src.notes.join('\n')).toMatch(/vae: using the fp16 weights variant/);
    expect(src.notes.join('\n')).toMatch(/unet\/config.json: ignored unknown config key extra_thing/);
    expect(src.notes.join('\n')).toMatch(/scheduler preset/);
    await src.close();

    const fp16 = await openCheckpoint(root, { variant: 'fp16' });
    expect(fp16.dtype).toBe('float16');
    expect((await readTensorRef(fp16.components.unet!.tensors.get('conv_in.weight')!)).data[0]).toBe(2);
    await fp16.close();
    await expectError(openCheckpoint(root, { variant: 'bf16' }), 'file', /no "bf16" weights variant/);
  });

  it('a component folder passed directly opens as that component; bad configs and keys are named', async () => {
    const dir = path.join(tmp, 'solo', 'text_encoder');
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'config.json'), JSON.stringify({ ...inferTextEncoderConfig(CLIP()), architectures: ['CLIPTextModel'] }));
    await writeSafetensors(path.join(dir, 'model.safetensors'), new Map([...plainTensors(CLIP(), 1), ['text_model.embeddings.position_ids', { shape: [1, 77], data: new Int32Array(77), dtype: 'I64' }]]));
    const src = await openCheckpoint(dir);
    expect(Object.keys(src.components)).toEqual(['text_encoder']);
    expect(src.components.text_encoder!.tensors.has('text_model.embeddings.position_ids')).toBe(false);
    await src.close();
    await writeFile(path.join(dir, 'config.json'), '{"hidden_size": 12');
    await expectError(openCheckpoint(dir), 'file', /config.json: malformed JSON/);
    await writeFile(path.join(dir, 'config.json'), JSON.stringify({ ...inferTextEncoderConfig(CLIP()), num_hidden_layers: 3 }));
    await expectError(openCheckpoint(dir), 'format', /num_hidden_layers is 3 in the config but 2 in the weights/);
    await writeFile(path.join(dir, 'config.json'), JSON.stringify({ _class_name: 'ControlNetModel' }));
    await expectError(openCheckpoint(dir), 'unsupported', /ControlNetModel/);
    await writeFile(path.join(dir, 'config.json'), JSON.stringify(inferTextEncoderConfig(CLIP())));
    await writeSafetensors(path.join(dir, 'model.safetensors'), new Map([...plainTensors(CLIP(), 1), ['text_model.foo.weight', filled([2], 0)]]));
    await expectError(openCheckpoint(dir), 'format', /"text_model.foo.weight"/);
  });

  it('a weight stored as an integer dtype is refused when read, naming file, key, expected and found dtype', async () => {
    const dir = path.join(tmp, 'relabelled', 'text_encoder');
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'config.json'), JSON.stringify(inferTextEncoderConfig(CLIP())));
    const t = plainTensors(CLIP(), 1);
    const key = 'text_model.final_layer_norm.weight';
    const f32 = t.get(key)!.data as Float32Array;
    t.set(key, { shape: t.get(key)!.shape, data: new Int32Array(f32.buffer), dtype: 'I32' }); // the same bytes, relabelled
    await writeSafetensors(path.join(dir, 'model.safetensors'), t);
    const src = await openCheckpoint(dir);
    try {
      const e = await expectError(readTensorRef(src.components.text_encoder!.tensors.get(key)!), 'format', `model.safetensors: tensor "${key}" has dtype I32, expected a floating-point dtype (F32, F16, BF16 or F64)`);
      expect(e.message).not.toContain('\n');
      expect((await readTensorRef(src.components.text_encoder!.tensors.get('text_model.final_layer_norm.bias')!)).data[0]).toBe(1);
    } finally {
      await src.close();
    }
  });
});

describeGolden('golden checkpoints', () => {
  const opened: CheckpointSource[] = [];
  const open = async (p: string, o?: Parameters<typeof openCheckpoint>[1]) => {
    const s = await openCheckpoint(p, o);
    opened.push(s);
    return s;
  };
  afterAll(async () => void (await Promise.all(opened.map((s) => s.close()))));
  const cfg = (c: string) => JSON.parse(readFileSync(golden('tiny-sd', c, 'config.json'), 'utf8'));

  it('tiny-sd (diffusers folder)', async () => {
    const s = await open(golden('tiny-sd'));
    expect(s).toMatchObject({ layout: 'diffusers', variant: 'v1', dtype: 'float32', hasEma: false, tokenizerDir: golden('tiny-sd', 'tokenizer'), notes: [] });
    expect(s.modelIndex!._class_name).toBe('StableDiffusionPipeline');
    expect(s.schedulerConfig._class_name).toBe('PNDMScheduler');
    for (const c of ['unet', 'vae', 'text_encoder'] as const) expect(s.components[c]!.config).toEqual(cfg(c));
    expect([s.components.unet!.tensors.size, s.components.vae!.tensors.size, s.components.text_encoder!.tensors.size]).toEqual([684, 244, 52]);
  });

  it('tiny-sd.safetensors with configDir: configs, tokenizer and scheduler from the folder; tensors equal the folder', async () => {
    const s = await open(golden('tiny-sd.safetensors'), { configDir: golden('tiny-sd') });
    const d = await open(golden('tiny-sd'));
    expect(s).toMatchObject({ layout: 'single-file', variant: 'v1', dtype: 'float32', hasEma: false, usedEma: false, tokenizerDir: golden('tiny-sd', 'tokenizer') });
    for (const c of ['unet', 'vae', 'text_encoder'] as const) {
      expect(s.components[c]!.config).toEqual(cfg(c));
      expect(new Set(s.components[c]!.tensors.keys())).toEqual(new Set(d.components[c]!.tensors.keys()));
      for (const [k, ref] of s.components[c]!.tensors) expect(ref.shape, k).toEqual(d.components[c]!.tensors.get(k)!.shape);
    }
    const [a, b] = [await readComponent(s.components.vae!), await readComponent(d.components.vae!)];
    for (const [k, t] of a) expect(Buffer.from(t.data.buffer).equals(Buffer.from(b.get(k)!.data.buffer)), k).toBe(true);
  });

  it('tiny-sd.safetensors without configs: the CLIP heads cannot be inferred for width 32', async () => {
    await expectError(openCheckpoint(golden('tiny-sd.safetensors')), 'format', golden('tiny-sd.safetensors'), /heads for width 32/, /--config DIR/);
  });

  it('configs inferred from tiny-sd.safetensors equal tiny-sd config.json on every structural field', async () => {
    const f = await SafetensorsFile.open(golden('tiny-sd.safetensors'));
    const table = ldmToDiffusersTable(new Map([...f.tensors].map(([k, t]) => [k, t.shape])));
    await f.close();
    const shapes = (c: Component) => new Map(table.entries.filter((e) => e.component === c).map((e) => [e.to, transformShape(e.transform, f.info(e.from).shape, e.from)]));
    const inferred = { unet: inferUnetConfig(shapes('unet')), vae: inferVaeConfig(shapes('vae')), text_encoder: inferTextEncoderConfig(shapes('text_encoder'), { requireHeads: false }) };
    for (const c of ['unet', 'vae', 'text_encoder'] as const)
      for (const field of STRUCTURAL_FIELDS[c]) expect(inferred[c][field], `${c}.${field}`).toEqual(cfg(c)[field]);
    for (const field of ['attention_head_dim', 'norm_num_groups', 'mid_block_type', 'time_embedding_dim', 'flip_sin_to_cos', 'freq_shift'])
      expect(inferred.unet[field], field).toEqual(cfg('unet')[field]);
    expect(inferred.vae.scaling_factor).toBe(0.18215);
  });

  it('tiny-sd-fp16.safetensors opens as float16', async () => {
    const s = await open(golden('tiny-sd-fp16.safetensors'), { configDir: golden('tiny-sd') });
    expect(s.dtype).toBe('float16');
    const t = await readTensorRef(s.components.unet!.tensors.get('conv_in.weight')!);
    expect(t.data).toBeInstanceOf(Float32Array);
    expect(t.shape).toEqual([32, 4, 3, 3]);
  });

  it('tiny-sd-inpaint (only unet/) and the unet/ folder alone open as inpaint', async () => {
    for (const p of [golden('tiny-sd-inpaint'), golden('tiny-sd-inpaint', 'unet')]) {
      const s = await open(p);
      expect(s).toMatchObject({ layout: 'diffusers', variant: 'inpaint', tokenizerDir: undefined });
      expect(Object.keys(s.components)).toEqual(['unet']);
      expect(s.components.unet!.tensors.get('conv_in.weight')!.shape).toEqual([32, 9, 3, 3]);
    }
    const vae = await open(golden('tiny-sd', 'vae'));
    expect(Object.keys(vae.components)).toEqual(['vae']);
    expect(vae.tokenizerDir).toBe(golden('tiny-sd', 'tokenizer'));
    expect(vae.schedulerConfig).toEqual(JSON.parse(readFileSync(golden('tiny-sd', 'scheduler', 'scheduler_config.json'), 'utf8')));
  });

  it('LoRA and embedding files get errors naming the flag; a fake .ckpt is refused as a broken zip', async () => {
    await expectError(openCheckpoint(golden('lora', 'tiny_lora_kohya.safetensors')), 'format', /LoRA/, /--lora/);
    await expectError(openCheckpoint(golden('lora', 'diffusers_format', 'pytorch_lora_weights.safetensors')), 'format', /LoRA/, /--lora/);
    await expectError(openCheckpoint(golden('textual_inversion', 'my-token-a1111.safetensors')), 'format', /embedding/, /--embedding/);
    await expectError(openCheckpoint(golden('textual_inversion', 'my-token-diffusers.safetensors')), 'format', /embedding/, /--embedding/);
    const fake = path.join(tmp, 'fake.ckpt');
    await writeFile(fake, 'PK\x03\x04');
    await expectError(openCheckpoint(fake), 'file', /too short \(4 bytes\) to be a zip archive/);
  });
});
