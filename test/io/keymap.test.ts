import { describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import {
  diffusersToLdmTable, emaKey, ldmToDiffusersTable, normalizeDiffusersKeys, normalizeOldClipKey, transformShape,
  type Component, type KeyMapEntry,
} from '../../src/io/ldm-keymap.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { describeGolden, golden } from '../golden.js';

/** Diffusers UNet key names for a structure (levels, layers_per_block, attention per down level); shapes are dummies. */
function unetKeys(levels: number, lpb: number, attn: boolean[]): string[] {
  const k: string[] = [];
  const wb = (p: string) => k.push(`${p}.weight`, `${p}.bias`);
  const resnet = (p: string, shortcut: boolean) => {
    for (const n of ['norm1', 'conv1', 'time_emb_proj', 'norm2', 'conv2']) wb(`${p}.${n}`);
    if (shortcut) wb(`${p}.conv_shortcut`);
  };
  const xf = (p: string) => {
    for (const n of ['norm', 'proj_in', 'proj_out']) wb(`${p}.${n}`);
    const t = `${p}.transformer_blocks.0`;
    for (const n of ['norm1', 'norm2', 'norm3', 'attn1.to_out.0', 'attn2.to_out.0', 'ff.net.0.proj', 'ff.net.2']) wb(`${t}.${n}`);
    for (const a of ['attn1', 'attn2']) for (const q of ['to_q', 'to_k', 'to_v']) k.push(`${t}.${a}.${q}.weight`);
  };
  for (const n of ['time_embedding.linear_1', 'time_embedding.linear_2', 'conv_in', 'conv_norm_out', 'conv_out']) wb(n);
  for (let b = 0; b < levels; b++) {
    for (let j = 0; j < lpb; j++) (resnet(`down_blocks.${b}.resnets.${j}`, j === 0 && b > 0), attn[b] && xf(`down_blocks.${b}.attentions.${j}`));
    if (b < levels - 1) wb(`down_blocks.${b}.downsamplers.0.conv`);
  }
  resnet('mid_block.resnets.0', false), xf('mid_block.attentions.0'), resnet('mid_block.resnets.1', false);
  const up = [...attn].reverse();
  for (let b = 0; b < levels; b++) {
    for (let j = 0; j <= lpb; j++) (resnet(`up_blocks.${b}.resnets.${j}`, true), up[b] && xf(`up_blocks.${b}.attentions.${j}`));
    if (b < levels - 1) wb(`up_blocks.${b}.upsamplers.0.conv`);
  }
  return k;
}

/** Diffusers VAE key names for `levels` levels with `lpb` resnets per encoder level. */
function vaeKeys(levels: number, lpb: number): string[] {
  const k: string[] = [];
  const wb = (p: string) => k.push(`${p}.weight`, `${p}.bias`);
  const resnet = (p: string) => ['norm1', 'conv1', 'norm2', 'conv2', 'conv_shortcut'].forEach((n) => wb(`${p}.${n}`));
  for (const side of ['encoder', 'decoder']) {
    for (const n of ['conv_in', 'conv_norm_out', 'conv_out']) wb(`${side}.${n}`);
    resnet(`${side}.mid_block.resnets.0`), resnet(`${side}.mid_block.resnets.1`);
    for (const n of ['group_norm', 'to_q', 'to_k', 'to_v', 'to_out.0']) wb(`${side}.mid_block.attentions.0.${n}`);
  }
  for (let i = 0; i < levels; i++) {
    for (let j = 0; j < lpb; j++) resnet(`encoder.down_blocks.${i}.resnets.${j}`);
    for (let j = 0; j <= lpb; j++) resnet(`decoder.up_blocks.${i}.resnets.${j}`);
    if (i < levels - 1) (wb(`encoder.down_blocks.${i}.downsamplers.0.conv`), wb(`decoder.up_blocks.${i}.upsamplers.0.conv`));
  }
  wb('quant_conv'), wb('post_quant_conv');
  return k;
}

const shapeMap = (keys: string[], shape = (k: string) => (k.includes('mid_block.attentions.0.to_') && k.endsWith('weight') ? [8, 8] : [1])) =>
  new Map(keys.map((k) => [k, shape(k)]));
const lookup = (rows: KeyMapEntry[]) => new Map(rows.map((e) => [e.from, e]));

/** diffusers -> LDM -> diffusers must be the identity on keys and shapes, with no two keys colliding. */
function roundTrip(c: Component, keys: string[]) {
  const shapes = shapeMap(keys);
  const toLdm = diffusersToLdmTable(c, keys);
  expect(new Set(toLdm.map((e) => e.to)).size).toBe(keys.length);
  const ldmShapes = new Map(toLdm.map((e) => [e.to, transformShape(e.transform, shapes.get(e.from)!, e.to)]));
  const back = ldmToDiffusersTable(ldmShapes);
  expect(back.ignored).toEqual([]);
  const byLdm = lookup(back.entries);
  for (const e of toLdm) {
    const b = byLdm.get(e.to)!;
    expect(b.to).toBe(e.from);
    expect(transformShape(b.transform, ldmShapes.get(e.to)!, b.from)).toEqual(shapes.get(e.from));
  }
  return new Map(toLdm.map((e) => [e.from, e.to]));
}

describe('UNet key rules', () => {
  it('SD v1 structure: the spec tables (§3.1-§3.3)', () => {
    const m = roundTrip('unet', unetKeys(4, 2, [true, true, true, false]));
    const P = 'model.diffusion_model.';
    const expected: [string, string][] = [
      ['time_embedding.linear_1.weight', 'time_embed.0.weight'],
      ['time_embedding.linear_2.bias', 'time_embed.2.bias'],
      ['conv_in.weight', 'input_blocks.0.0.weight'],
      ['conv_norm_out.weight', 'out.0.weight'],
      ['conv_out.bias', 'out.2.bias'],
      ['down_blocks.0.resnets.1.norm1.weight', 'input_blocks.2.0.in_layers.0.weight'],
      ['down_blocks.1.resnets.0.conv_shortcut.weight', 'input_blocks.4.0.skip_connection.weight'],
      ['down_blocks.1.resnets.0.time_emb_proj.weight', 'input_blocks.4.0.emb_layers.1.weight'],
      ['down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight', 'input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight'],
      ['down_blocks.0.downsamplers.0.conv.weight', 'input_blocks.3.0.op.weight'],
      ['down_blocks.2.downsamplers.0.conv.bias', 'input_blocks.9.0.op.bias'],
      ['down_blocks.3.resnets.1.conv2.weight', 'input_blocks.11.0.out_layers.3.weight'],
      ['mid_block.resnets.0.conv1.weight', 'middle_block.0.in_layers.2.weight'],
      ['mid_block.attentions.0.proj_in.weight', 'middle_block.1.proj_in.weight'],
      ['mid_block.resnets.1.norm2.bias', 'middle_block.2.out_layers.0.bias'],
      ['up_blocks.0.resnets.2.conv1.weight', 'output_blocks.2.0.in_layers.2.weight'],
      ['up_blocks.0.upsamplers.0.conv.weight', 'output_blocks.2.1.conv.weight'],
      ['up_blocks.1.upsamplers.0.conv.weight', 'output_blocks.5.2.conv.weight'],
      ['up_blocks.2.upsamplers.0.conv.bias', 'output_blocks.8.2.conv.bias'],
      ['up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight', 'output_blocks.11.1.transformer_blocks.0.ff.net.2.weight'],
      ['up_blocks.3.resnets.2.conv_shortcut.weight', 'output_blocks.11.0.skip_connection.weight'],
    ];
    for (const [d, l] of expected) expect(m.get(d)).toBe(P + l);
  });

  it('is generic in layers_per_block and the number of levels', () => {
    // 3 levels, 1 layer per block (L = 2), attention only in the middle level
    const m = roundTrip('unet', unetKeys(3, 1, [false, true, false]));
    const P = 'model.diffusion_model.';
    expect(m.get('down_blocks.0.resnets.0.conv1.weight')).toBe(`${P}input_blocks.1.0.in_layers.2.weight`);
    expect(m.get('down_blocks.0.downsamplers.0.conv.weight')).toBe(`${P}input_blocks.2.0.op.weight`);
    expect(m.get('down_blocks.1.attentions.0.norm.weight')).toBe(`${P}input_blocks.3.1.norm.weight`);
    expect(m.get('down_blocks.2.resnets.0.conv1.weight')).toBe(`${P}input_blocks.5.0.in_layers.2.weight`);
    expect(m.get('up_blocks.0.upsamplers.0.conv.weight')).toBe(`${P}output_blocks.1.1.conv.weight`); // no attention: sub-index 1
    expect(m.get('up_blocks.1.upsamplers.0.conv.weight')).toBe(`${P}output_blocks.3.2.conv.weight`);
    expect(m.get('up_blocks.2.resnets.1.norm1.bias')).toBe(`${P}output_blocks.5.0.in_layers.0.bias`);
    roundTrip('unet', unetKeys(2, 3, [true, true]));
    roundTrip('unet', unetKeys(5, 2, [true, false, true, true, false]));
  });
});

describe('VAE key rules', () => {
  it('maps the spec tables, reverses the decoder order, reshapes the mid attention (§4)', () => {
    const m = roundTrip('vae', vaeKeys(4, 2));
    const P = 'first_stage_model.';
    expect(m.get('encoder.conv_norm_out.weight')).toBe(`${P}encoder.norm_out.weight`);
    expect(m.get('encoder.down_blocks.1.resnets.0.conv_shortcut.weight')).toBe(`${P}encoder.down.1.block.0.nin_shortcut.weight`);
    expect(m.get('encoder.down_blocks.2.downsamplers.0.conv.weight')).toBe(`${P}encoder.down.2.downsample.conv.weight`);
    expect(m.get('decoder.up_blocks.0.resnets.2.conv1.weight')).toBe(`${P}decoder.up.3.block.2.conv1.weight`);
    expect(m.get('decoder.up_blocks.2.upsamplers.0.conv.bias')).toBe(`${P}decoder.up.1.upsample.conv.bias`);
    expect(m.get('decoder.mid_block.resnets.1.norm1.weight')).toBe(`${P}decoder.mid.block_2.norm1.weight`);
    expect(m.get('encoder.mid_block.attentions.0.group_norm.bias')).toBe(`${P}encoder.mid.attn_1.norm.bias`);
    expect(m.get('encoder.mid_block.attentions.0.to_out.0.weight')).toBe(`${P}encoder.mid.attn_1.proj_out.weight`);
    const rows = lookup(diffusersToLdmTable('vae', vaeKeys(4, 2)));
    expect(rows.get('decoder.mid_block.attentions.0.to_q.weight')!.transform).toBe('linear_to_conv1x1');
    expect(rows.get('decoder.mid_block.attentions.0.to_q.bias')!.transform).toBe('none');
    roundTrip('vae', vaeKeys(3, 1));
    expect(roundTrip('vae', vaeKeys(3, 1)).get('decoder.up_blocks.0.resnets.1.conv2.weight')).toBe(`${P}decoder.up.2.block.1.conv2.weight`);
  });

  it('accepts 4-D, 3-D and 2-D mid-attention weights in single files', () => {
    const k = 'first_stage_model.decoder.mid.attn_1.q.weight';
    for (const [shape, t] of [[[8, 8, 1, 1], 'conv1x1_to_linear'], [[8, 8, 1], 'conv1x1_to_linear'], [[8, 8], 'none']] as const) {
      const [e] = ldmToDiffusersTable(new Map([[k, [...shape]]])).entries;
      expect(e).toMatchObject({ component: 'vae', to: 'decoder.mid_block.attentions.0.to_q.weight', transform: t });
      expect(transformShape(e.transform, shape, k)).toEqual([8, 8]);
    }
    expect(() => transformShape('conv1x1_to_linear', [8, 8, 3, 3], k)).toThrow(/\[8,8,3,3\] cannot be reshaped/);
    expect(transformShape('linear_to_conv1x1', [8, 8], k)).toEqual([8, 8, 1, 1]);
  });

  it('normalises legacy diffusers attention names (query/key/value/proj_attn)', () => {
    const shapes = new Map<string, number[]>([
      ['encoder.mid_block.attentions.0.query.weight', [8, 8, 1, 1]],
      ['encoder.mid_block.attentions.0.key.weight', [8, 8]],
      ['encoder.mid_block.attentions.0.value.bias', [8]],
      ['encoder.mid_block.attentions.0.proj_attn.weight', [8, 8]],
      ['encoder.mid_block.attentions.0.group_norm.weight', [8]],
    ]);
    const rows = lookup(normalizeDiffusersKeys('vae', shapes).entries);
    expect(rows.get('encoder.mid_block.attentions.0.query.weight')).toMatchObject({ to: 'encoder.mid_block.attentions.0.to_q.weight', transform: 'conv1x1_to_linear' });
    expect(rows.get('encoder.mid_block.attentions.0.key.weight')).toMatchObject({ to: 'encoder.mid_block.attentions.0.to_k.weight', transform: 'none' });
    expect(rows.get('encoder.mid_block.attentions.0.value.bias')!.to).toBe('encoder.mid_block.attentions.0.to_v.bias');
    expect(rows.get('encoder.mid_block.attentions.0.proj_attn.weight')!.to).toBe('encoder.mid_block.attentions.0.to_out.0.weight');
    const dup = new Map([...shapes, ['encoder.mid_block.attentions.0.to_q.weight', [8, 8]]]);
    expect(() => normalizeDiffusersKeys('vae', dup)).toThrow(/same weight/);
  });
});

describe('CLIP, EMA, ignorable and unknown keys', () => {
  it('rewrites old CLIP names without text_model. (§5) and ignores position_ids', () => {
    expect(normalizeOldClipKey('embeddings.token_embedding.weight')).toBe('text_model.embeddings.token_embedding.weight');
    expect(normalizeOldClipKey('text_model.encoder.layers.0.mlp.fc1.bias')).toBe('text_model.encoder.layers.0.mlp.fc1.bias');
    const P = 'cond_stage_model.transformer.';
    const t = ldmToDiffusersTable(new Map([
      [`${P}embeddings.position_embedding.weight`, [77, 8]],
      [`${P}encoder.layers.3.self_attn.out_proj.bias`, [8]],
      [`${P}final_layer_norm.weight`, [8]],
      [`${P}embeddings.position_ids`, [1, 77]],
      [`${P}text_model.embeddings.position_ids`, [1, 77]],
    ]));
    expect(t.entries.map((e) => e.to)).toEqual([
      'text_model.embeddings.position_embedding.weight', 'text_model.encoder.layers.3.self_attn.out_proj.bias', 'text_model.final_layer_norm.weight',
    ]);
    expect(t.ignored).toHaveLength(2);
    const d = normalizeDiffusersKeys('text_encoder', new Map([['text_model.embeddings.position_ids', [1, 77]], ['text_model.final_layer_norm.bias', [8]]]));
    expect(d.ignored).toEqual(['text_model.embeddings.position_ids']);
    expect(diffusersToLdmTable('text_encoder', ['text_model.final_layer_norm.bias'])[0].to).toBe(`${P}text_model.final_layer_norm.bias`);
  });

  it('derives EMA keys by the §2.3 rule and sets EMA keys and scheduler buffers apart', () => {
    expect(emaKey('model.diffusion_model.input_blocks.0.0.weight')).toBe('model_ema.diffusion_modelinput_blocks00weight');
    expect(emaKey('model.diffusion_model.output_blocks.2.1.conv.bias')).toBe('model_ema.diffusion_modeloutput_blocks21convbias');
    const t = ldmToDiffusersTable(new Map([
      ['model.diffusion_model.input_blocks.0.0.weight', [4, 4, 3, 3]],
      ['model_ema.diffusion_modelinput_blocks00weight', [4, 4, 3, 3]],
      ['model_ema.decay', []], ['model_ema.num_updates', []],
      ['alphas_cumprod', [1000]], ['betas', [1000]], ['logvar', [1000]],
    ]));
    expect(t.entries.map((e) => e.to)).toEqual(['conv_in.weight']);
    expect(t.ema).toEqual(['model_ema.diffusion_modelinput_blocks00weight']);
    expect(t.ignored.sort()).toEqual(['alphas_cumprod', 'betas', 'logvar', 'model_ema.decay', 'model_ema.num_updates']);
  });

  it('fails on an unknown key, naming it', () => {
    const bad = [
      'model.diffusion_model.input_blocks.1.0.in_layers.1.weight',
      'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn3.to_q.weight',
      'model.diffusion_model.output_blocks.1.2.conv.weight', // an upsampler that is not at the end of its level
      'first_stage_model.encoder.down.0.block.0.conv3.weight',
      'first_stage_model.decoder.mid.attn_1.w.weight',
      'cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc3.weight',
      'some_other_model.weight',
    ];
    for (const key of bad) {
      let err: unknown;
      try {
        ldmToDiffusersTable(new Map([[key, [1]], ['model.diffusion_model.input_blocks.3.0.op.weight', [1]]]), { source: 'x.safetensors' });
      } catch (e) {
        err = e;
      }
      expect(err, key).toBeInstanceOf(SdtuneError);
      expect((err as SdtuneError).kind).toBe('format');
      expect((err as SdtuneError).message).toContain(`x.safetensors: unexpected key "${key}"`);
    }
    expect(() => diffusersToLdmTable('unet', ['add_embedding.linear_1.weight'])).toThrow(/unexpected unet key "add_embedding.linear_1.weight"/);
    expect(() => normalizeDiffusersKeys('text_encoder', new Map([['text_projection.weight', [8, 8]]]))).toThrow(/"text_projection.weight"/);
  });
});

describeGolden('golden: tiny-sd.safetensors <-> the tiny-sd diffusers folder', () => {
  const files: Record<Component, string> = {
    unet: golden('tiny-sd', 'unet', 'diffusion_pytorch_model.safetensors'),
    vae: golden('tiny-sd', 'vae', 'diffusion_pytorch_model.safetensors'),
    text_encoder: golden('tiny-sd', 'text_encoder', 'model.safetensors'),
  };

  it('maps every single-file key to exactly one diffusers key, covering all; tensors bit-identical (fp32) / RNE-f16 (fp16)', async () => {
    const single = await SafetensorsFile.open(golden('tiny-sd.safetensors'));
    const half = await SafetensorsFile.open(golden('tiny-sd-fp16.safetensors'));
    const table = ldmToDiffusersTable(new Map([...single.tensors].map(([k, t]) => [k, t.shape])), { source: single.path });
    expect(table.ignored).toEqual([]);
    expect(table.ema).toEqual([]);
    expect(table.entries).toHaveLength(980);
    for (const c of ['unet', 'vae', 'text_encoder'] as const) {
      const folder = await SafetensorsFile.open(files[c]);
      const rows = table.entries.filter((e) => e.component === c);
      expect(rows.length, c).toBe(folder.tensors.size);
      expect(new Set(rows.map((e) => e.to))).toEqual(new Set(folder.keys()));
      for (const e of rows) {
        expect(transformShape(e.transform, single.info(e.from).shape, e.from), e.from).toEqual(folder.info(e.to).shape);
        const [a, b, h] = [await single.read(e.from), await folder.read(e.to), await half.read(e.from)];
        expect(Buffer.from(a.data.buffer).equals(Buffer.from(b.data.buffer)), e.from).toBe(true);
        const rounded = new Float32Array(b.data.length);
        for (let i = 0; i < rounded.length; i++) rounded[i] = roundToF16(b.data[i]);
        expect(h.dtype).toBe('F16');
        expect(Buffer.from(h.data.buffer).equals(Buffer.from(rounded.buffer)), e.from).toBe(true);
      }
      // the reverse table reproduces the single-file keys
      const back = diffusersToLdmTable(c, folder.keys());
      expect(new Set(back.map((e) => e.to))).toEqual(new Set(rows.map((e) => e.from)));
      await folder.close();
    }
    await single.close();
    await half.close();
  });
});

/** Round a float32 to the nearest binary16 value (ties to even), on the binary16 grid of its binade. */
function roundToF16(x: number): number {
  if (!Number.isFinite(x) || x === 0) return x;
  const a = Math.abs(x);
  if (a >= 65520) return Math.sign(x) * Infinity;
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  else if (2 ** (e + 1) <= a) e++;
  e = Math.max(e, -14);
  const ulp = 2 ** (e - 10);
  let q = a / ulp;
  const f = Math.floor(q);
  q = q - f > 0.5 || (q - f === 0.5 && f % 2 === 1) ? f + 1 : f;
  return Math.sign(x) * q * ulp;
}
