/**
 * What kohya sd-scripts and ComfyUI do when they load a kohya-format LoRA, restated in TypeScript so that tests can
 * check our exports without Python or torch. Sources read (public): kohya-ss/sd-scripts networks/lora.py
 * (LoRAModule, create_network, create_network_from_weights, LoRANetwork: UNET_TARGET_REPLACE_MODULE,
 * UNET_TARGET_REPLACE_MODULE_CONV2D_3X3, TEXT_ENCODER_TARGET_REPLACE_MODULE, create_modules), train_network.py
 * (network_args -> net_kwargs -> ss_network_args); comfyanonymous/ComfyUI comfy/lora.py (load_lora,
 * model_lora_keys_unet, model_lora_keys_clip, LORA_CLIP_MAP), comfy/utils.py (unet_to_diffusers and its
 * UNET_MAP_* tables), comfy/weight_adapter/lora.py (calculate_weight).
 *
 * The module shapes come from the diffusers config, built the way diffusers' UNet2DConditionModel (and kohya's
 * library/original_unet.py, which mirrors its names) lays out its blocks, not from our params tree, so a wrong target
 * set or factor shape in sdtune cannot agree with them by construction.
 */
import type { ClipTextConfig, UNetConfig } from '../../src/models/configs.js';

/** One torch Linear / Conv2d module of the diffusers-named model. */
export interface TorchModule {
  /** 'transformer' = inside a Transformer2DModel, 'conv-block' = inside ResnetBlock2D / Downsample2D / Upsample2D,
   *  'clip' = inside CLIPAttention / CLIPMLP, 'other' = outside every kohya target class */
  container: 'transformer' | 'conv-block' | 'clip' | 'other';
  kind: 'linear' | 'conv';
  /** torch weight shape: [out, in] or [out, in, kh, kw] */
  shape: number[];
}

/** Every Linear / Conv2d module of the UNet (key "unet:<path>") and text encoder ("text_encoder:<path>"). */
export function torchModules(unet: UNetConfig, clip?: ClipTextConfig): Map<string, TorchModule> {
  const out = new Map<string, TorchModule>();
  const add = (c: 'unet' | 'text_encoder', path: string, container: TorchModule['container'], shape: number[]) =>
    out.set(`${c}:${path}`, { container, kind: shape.length === 4 ? 'conv' : 'linear', shape });
  const boc = unet.block_out_channels;
  const n = boc.length;
  const temb = boc[0] * 4;
  const ctx = unet.cross_attention_dim;
  const resnet = (p: string, cin: number, cout: number) => {
    add('unet', `${p}.conv1`, 'conv-block', [cout, cin, 3, 3]);
    add('unet', `${p}.time_emb_proj`, 'conv-block', [cout, temb]);
    add('unet', `${p}.conv2`, 'conv-block', [cout, cout, 3, 3]);
    if (cin !== cout) add('unet', `${p}.conv_shortcut`, 'conv-block', [cout, cin, 1, 1]);
  };
  const transformer = (p: string, c: number) => {
    const proj = unet.use_linear_projection ? [c, c] : [c, c, 1, 1];
    add('unet', `${p}.proj_in`, 'transformer', proj);
    for (let t = 0; t < unet.transformer_layers_per_block; t++) {
      const b = `${p}.transformer_blocks.${t}`;
      for (const a of ['attn1', 'attn2']) {
        const kv = a === 'attn1' ? c : ctx;
        add('unet', `${b}.${a}.to_q`, 'transformer', [c, c]);
        add('unet', `${b}.${a}.to_k`, 'transformer', [c, kv]);
        add('unet', `${b}.${a}.to_v`, 'transformer', [c, kv]);
        add('unet', `${b}.${a}.to_out.0`, 'transformer', [c, c]);
      }
      add('unet', `${b}.ff.net.0.proj`, 'transformer', [8 * c, c]); // GEGLU: 2 x 4c
      add('unet', `${b}.ff.net.2`, 'transformer', [c, 4 * c]);
    }
    add('unet', `${p}.proj_out`, 'transformer', proj);
  };
  const cross = (t: string) => t.startsWith('CrossAttn');
  add('unet', 'conv_in', 'other', [boc[0], unet.in_channels, 3, 3]);
  add('unet', 'time_embedding.linear_1', 'other', [temb, boc[0]]);
  add('unet', 'time_embedding.linear_2', 'other', [temb, temb]);
  let cout = boc[0];
  unet.down_block_types.forEach((type, i) => {
    const cin = cout;
    cout = boc[i];
    for (let j = 0; j < unet.layers_per_block; j++) {
      resnet(`down_blocks.${i}.resnets.${j}`, j === 0 ? cin : cout, cout);
      if (cross(type)) transformer(`down_blocks.${i}.attentions.${j}`, cout);
    }
    if (i < n - 1) add('unet', `down_blocks.${i}.downsamplers.0.conv`, 'conv-block', [cout, cout, 3, 3]);
  });
  resnet('mid_block.resnets.0', boc[n - 1], boc[n - 1]);
  transformer('mid_block.attentions.0', boc[n - 1]);
  resnet('mid_block.resnets.1', boc[n - 1], boc[n - 1]);
  const rev = [...boc].reverse();
  cout = rev[0];
  unet.up_block_types.forEach((type, i) => {
    const prev = cout;
    cout = rev[i];
    const input = rev[Math.min(i + 1, n - 1)];
    for (let j = 0; j <= unet.layers_per_block; j++) {
      const skip = j === unet.layers_per_block ? input : cout;
      resnet(`up_blocks.${i}.resnets.${j}`, (j === 0 ? prev : cout) + skip, cout);
      if (cross(type)) transformer(`up_blocks.${i}.attentions.${j}`, cout);
    }
    if (i < n - 1) add('unet', `up_blocks.${i}.upsamplers.0.conv`, 'conv-block', [cout, cout, 3, 3]);
  });
  add('unet', 'conv_out', 'other', [unet.out_channels, boc[0], 3, 3]);
  if (clip) {
    const h = clip.hidden_size;
    for (let l = 0; l < clip.num_hidden_layers; l++) {
      const p = `text_model.encoder.layers.${l}`;
      for (const q of ['q_proj', 'k_proj', 'v_proj', 'out_proj']) add('text_encoder', `${p}.self_attn.${q}`, 'clip', [h, h]);
      add('text_encoder', `${p}.mlp.fc1`, 'clip', [clip.intermediate_size, h]);
      add('text_encoder', `${p}.mlp.fc2`, 'clip', [h, clip.intermediate_size]);
    }
  }
  return out;
}

/** A LoRA file as the loaders see it: tensor shapes and the alpha values. */
export interface LoraFileView {
  shapes: Map<string, number[]>;
  alphas: Map<string, number>;
}

const kohyaName = (id: string) => {
  const [c, path] = id.split(':');
  return `${c === 'unet' ? 'lora_unet' : 'lora_te'}_${path.replace(/\./g, '_')}`;
};
const numel = (s: number[]) => s.reduce((a, b) => a * b, 1);
const same = (a: number[] | undefined, b: number[]) => !!a && a.length === b.length && a.every((x, i) => x === b[i]);

/**
 * kohya create_network_from_weights(file) + network.load_state_dict(weights, strict=True): the network gets one
 * LoRAModule per file lora_name that names a Linear/Conv2d child of a Transformer2DModel, ResnetBlock2D,
 * Downsample2D or Upsample2D (UNet; the conv classes are always targets when building from weights) or of a
 * CLIPAttention / CLIPMLP (text encoder), with dim = lora_down.shape[0]; its state dict is lora_down.weight
 * (Conv2d: [dim, in, kh, kw] with the layer's kernel; Linear: [dim, in]), lora_up.weight ([out, dim, 1, 1] /
 * [out, dim]) and the scalar buffer alpha. Returns what strict loading would complain about (empty: it loads).
 */
export function kohyaStrictLoadErrors(file: LoraFileView, modules: Map<string, TorchModule>): string[] {
  const errors: string[] = [];
  const byName = new Map<string, TorchModule>();
  for (const [id, m] of modules) if (m.container !== 'other') byName.set(kohyaName(id), m);
  const dims = new Map<string, number>();
  for (const [key, shape] of file.shapes) if (key.includes('.') && key.includes('lora_down')) dims.set(key.split('.')[0], shape[0]);
  const expected = new Map<string, number[]>();
  for (const [name, dim] of dims) {
    const m = byName.get(name);
    if (!m) continue; // no module is created for it: its keys are unexpected below
    const [out, inp, ...k] = m.shape;
    expected.set(`${name}.lora_down.weight`, m.kind === 'conv' ? [dim, inp, ...k] : [dim, inp]);
    expected.set(`${name}.lora_up.weight`, m.kind === 'conv' ? [out, dim, 1, 1] : [out, dim]);
    expected.set(`${name}.alpha`, []);
  }
  for (const [key, shape] of file.shapes) {
    const want = expected.get(key);
    if (!want) errors.push(`unexpected key ${key}`);
    else if (!same(shape, want)) errors.push(`size mismatch for ${key}: file [${shape}], module [${want}]`);
  }
  for (const key of expected.keys()) if (!file.shapes.has(key)) errors.push(`missing key ${key}`);
  return errors;
}

/**
 * The modules kohya's create_network(network_dim, network_alpha, conv_dim=..., conv_alpha=...) trains, with their
 * (dim, alpha): Transformer2DModel children always, ResnetBlock2D / Downsample2D / Upsample2D children only with
 * conv_dim; Linear and 1x1-conv children get network_dim / network_alpha, k x k convs conv_dim / conv_alpha
 * (create_modules); text encoder CLIPAttention / CLIPMLP children when it is trained. Keyed by kohya lora_name.
 */
export function kohyaTrainedModules(
  modules: Map<string, TorchModule>,
  o: { dim: number; alpha: number; convDim?: number; convAlpha?: number; textEncoder: boolean },
): Map<string, { dim: number; alpha: number }> {
  const out = new Map<string, { dim: number; alpha: number }>();
  for (const [id, m] of modules) {
    const wanted = m.container === 'transformer' || (m.container === 'conv-block' && o.convDim !== undefined) || (m.container === 'clip' && o.textEncoder);
    if (!wanted) continue;
    const pointwise = m.kind === 'linear' || (m.shape[2] === 1 && m.shape[3] === 1);
    out.set(kohyaName(id), pointwise ? { dim: o.dim, alpha: o.alpha } : { dim: o.convDim!, alpha: o.convAlpha ?? 1 });
  }
  return out;
}

// ---- ComfyUI ----------------------------------------------------------------------------------------------------

/** comfy/utils.py UNET_MAP_RESNET / UNET_MAP_ATTENTIONS / TRANSFORMER_BLOCKS, the `.weight` entries (LDM -> diffusers). */
const UNET_MAP_RESNET: Record<string, string> = {
  'in_layers.2': 'conv1', 'emb_layers.1': 'time_emb_proj', 'out_layers.3': 'conv2', skip_connection: 'conv_shortcut',
  'in_layers.0': 'norm1', 'out_layers.0': 'norm2',
};
const UNET_MAP_ATTENTIONS = ['proj_in', 'proj_out', 'norm'];
const TRANSFORMER_BLOCKS = [
  'norm1', 'norm2', 'norm3', 'attn1.to_q', 'attn1.to_k', 'attn1.to_v', 'attn1.to_out.0', 'attn2.to_q', 'attn2.to_k', 'attn2.to_v',
  'attn2.to_out.0', 'ff.net.0.proj', 'ff.net.2',
];
const UNET_MAP_BASIC: [string, string][] = [
  ['input_blocks.0.0', 'conv_in'], ['out.0', 'conv_norm_out'], ['out.2', 'conv_out'], ['time_embed.0', 'time_embedding.linear_1'],
  ['time_embed.2', 'time_embedding.linear_2'],
];

/**
 * comfy.utils.unet_to_diffusers for an SD1-style config (module paths, without `.weight`): diffusers module -> LDM
 * module. ComfyUI's unet_config lists transformer depths per input block (popped from the front) and per output
 * block (popped from the back, so that pop() yields output_blocks 0, 1, ... as openaimodel builds them).
 */
export function comfyUnetToDiffusers(unet: UNetConfig): Map<string, string> {
  const map = new Map<string, string>();
  const levels = unet.block_out_channels.length;
  const numRes = Array<number>(levels).fill(unet.layers_per_block);
  const depth = (t: string) => (t.startsWith('CrossAttn') ? unet.transformer_layers_per_block : 0);
  const tDepth = unet.down_block_types.flatMap((t) => Array<number>(unet.layers_per_block).fill(depth(t)));
  const tDepthOut = unet.up_block_types.flatMap((t) => Array<number>(unet.layers_per_block + 1).fill(depth(t))).reverse();
  const tMid = unet.transformer_layers_per_block;
  const attentions = (from: string, to: string, nt: number) => {
    for (const b of UNET_MAP_ATTENTIONS) map.set(`${from}.${b}`, `${to}.${b}`);
    for (let t = 0; t < nt; t++) for (const b of TRANSFORMER_BLOCKS) map.set(`${from}.transformer_blocks.${t}.${b}`, `${to}.transformer_blocks.${t}.${b}`);
  };
  for (let x = 0; x < levels; x++) {
    let n = 1 + (numRes[x] + 1) * x;
    for (let i = 0; i < numRes[x]; i++) {
      for (const [ldm, diff] of Object.entries(UNET_MAP_RESNET)) map.set(`down_blocks.${x}.resnets.${i}.${diff}`, `input_blocks.${n}.0.${ldm}`);
      const nt = tDepth.shift()!;
      if (nt > 0) attentions(`down_blocks.${x}.attentions.${i}`, `input_blocks.${n}.1`, nt);
      n++;
    }
    map.set(`down_blocks.${x}.downsamplers.0.conv`, `input_blocks.${n}.0.op`);
  }
  attentions('mid_block.attentions.0', 'middle_block.1', tMid);
  [0, 2].forEach((n, i) => {
    for (const [ldm, diff] of Object.entries(UNET_MAP_RESNET)) map.set(`mid_block.resnets.${i}.${diff}`, `middle_block.${n}.${ldm}`);
  });
  const rev = [...numRes].reverse();
  for (let x = 0; x < levels; x++) {
    let n = (rev[x] + 1) * x;
    const l = rev[x] + 1;
    for (let i = 0; i < l; i++) {
      let c = 0;
      for (const [ldm, diff] of Object.entries(UNET_MAP_RESNET)) map.set(`up_blocks.${x}.resnets.${i}.${diff}`, `output_blocks.${n}.0.${ldm}`);
      c++;
      const nt = tDepthOut.pop()!;
      if (nt > 0) {
        c++;
        attentions(`up_blocks.${x}.attentions.${i}`, `output_blocks.${n}.1`, nt);
      }
      if (i === l - 1) map.set(`up_blocks.${x}.upsamplers.0.conv`, `output_blocks.${n}.${c}.conv`);
      n++;
    }
  }
  for (const [ldm, diff] of UNET_MAP_BASIC) map.set(diff, ldm);
  return map;
}

/** comfy/lora.py LORA_CLIP_MAP */
const LORA_CLIP_MAP: Record<string, string> = {
  'mlp.fc1': 'mlp_fc1', 'mlp.fc2': 'mlp_fc2', 'self_attn.k_proj': 'self_attn_k_proj', 'self_attn.q_proj': 'self_attn_q_proj',
  'self_attn.v_proj': 'self_attn_v_proj', 'self_attn.out_proj': 'self_attn_out_proj',
};

/**
 * ComfyUI's LoRA loader on an SD1 checkpoint (model_lora_keys_unet + model_lora_keys_clip, then load_lora and
 * LoRAAdapter.calculate_weight). `ldmKeys` are the state-dict keys of the model as ComfyUI holds it
 * (`diffusion_model.<LDM key>`, `clip_l.transformer.text_model...`): a kohya name resolves to one of them, either as
 * lora_unet_<LDM module with _> or through unet_to_diffusers as lora_unet_<diffusers module with _>; text encoder
 * lora_te_text_model_encoder_layers_<b>_<LORA_CLIP_MAP[c]>. Returns the file keys ComfyUI leaves unloaded ("lora key
 * not loaded: ..."), names whose target weight it lacks, and patches whose up.flatten(1) @ down.flatten(1) cannot be
 * reshaped to the weight (ComfyUI logs "ERROR lora ..." and skips them).
 */
export function comfyLoadProblems(file: LoraFileView, unet: UNetConfig, ldmShapes: Map<string, number[]>): string[] {
  const keyMap = new Map<string, string>();
  for (const k of ldmShapes.keys()) {
    if (k.startsWith('diffusion_model.') && k.endsWith('.weight')) keyMap.set(`lora_unet_${k.slice('diffusion_model.'.length, -'.weight'.length).replace(/\./g, '_')}`, k);
  }
  for (const [diff, ldm] of comfyUnetToDiffusers(unet)) keyMap.set(`lora_unet_${diff.replace(/\./g, '_')}`, `diffusion_model.${ldm}.weight`);
  for (let b = 0; b < 32; b++) {
    for (const [c, flat] of Object.entries(LORA_CLIP_MAP)) {
      const k = `clip_l.transformer.text_model.encoder.layers.${b}.${c}.weight`;
      if (ldmShapes.has(k)) keyMap.set(`lora_te_text_model_encoder_layers_${b}_${flat}`, k);
    }
  }
  const problems: string[] = [];
  const loaded = new Set<string>();
  for (const [x, target] of keyMap) {
    if (file.shapes.has(`${x}.alpha`)) loaded.add(`${x}.alpha`);
    const up = file.shapes.get(`${x}.lora_up.weight`);
    if (!up) continue;
    const down = file.shapes.get(`${x}.lora_down.weight`);
    loaded.add(`${x}.lora_up.weight`).add(`${x}.lora_down.weight`);
    if (file.shapes.has(`${x}.lora_mid.weight`)) loaded.add(`${x}.lora_mid.weight`);
    const w = ldmShapes.get(target);
    if (!w) problems.push(`${x}: the model has no ${target}`);
    else if (!down || up[1] !== down[0] || up[0] * numel(down.slice(1)) !== numel(w) || up[0] !== w[0]) {
      problems.push(`${x}: up [${up}] x down [${down}] does not reshape to ${target} [${w}]`);
    }
  }
  for (const k of file.shapes.keys()) if (!loaded.has(k)) problems.push(`lora key not loaded: ${k}`);
  return problems;
}

/** ComfyUI's state-dict keys and shapes for a model of these configs, from our torch module table (weights only). */
export function comfyShapesFromConfig(unet: UNetConfig, clip: ClipTextConfig | undefined): Map<string, number[]> {
  const toLdm = comfyUnetToDiffusers(unet);
  const out = new Map<string, number[]>();
  for (const [id, m] of torchModules(unet, clip)) {
    const [c, path] = id.split(':');
    if (c === 'unet') {
      const ldm = toLdm.get(path);
      if (!ldm) throw new Error(`unet_to_diffusers has no entry for ${path}`);
      out.set(`diffusion_model.${ldm}.weight`, m.shape);
    } else out.set(`clip_l.transformer.${path}.weight`, m.shape);
  }
  return out;
}
