// LoCon (kohya networks.lora with conv_dim / conv_alpha): the conv LoRA's gradients against finite differences and
// against the chain rule through the merged weight; the injected (training) forward against the merged forward of
// the exported file; every exported key checked against what kohya's and ComfyUI's loaders do with it (rules in
// loader-rules.ts, themselves checked on the golden single-file model and kohya LoRA); and a trained export loaded
// back by `sdtune sample`.
import * as tf from '@tensorflow/tfjs';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { type LoraRanks, extractLora, injectLora, loraTargetModules, ownedVariable, removeLora } from '../../src/adapters/lora-inject.js';
import { type LoraModel, type LoraModule, mergeLora, readLora, writeLoraKohya } from '../../src/adapters/lora.js';
import { torchToTfLayout } from '../../src/io/layout.js';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { readImageRgb } from '../../src/io/png.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { generate, toUint8 } from '../../src/infer/pipeline.js';
import { sampleToFiles } from '../../src/infer/sample.js';
import { randomParams } from '../../src/models/build.js';
import { clipText, clipTextParamShapes } from '../../src/models/clip-text.js';
import { clipTextConfig, unetConfig } from '../../src/models/configs.js';
import { type Padding, conv2d } from '../../src/models/layers.js';
import { type ParamTree, disposeParams, sub } from '../../src/models/params.js';
import { unet, unetParamShapes } from '../../src/models/unet.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { resolveSampler } from '../../src/schedulers/index.js';
import { resolveConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { describeGolden, golden } from '../golden.js';
import { TINY_CLIP, TINY_UNET, maxAbsDiff, relMaxErr } from '../helpers.js';
import {
  type LoraFileView,
  comfyLoadProblems,
  comfyShapesFromConfig,
  kohyaStrictLoadErrors,
  kohyaTrainedModules,
  torchModules,
} from './loader-rules.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MODEL = path.join(ROOT, 'checkpoints/tiny-sd-v1');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-locon-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const readJson = (f: string) => JSON.parse(readFileSync(f, 'utf8')) as Record<string, unknown>;
const configsOf = (dir: string) => ({ unet: unetConfig(readJson(path.join(dir, 'unet/config.json'))), clip: clipTextConfig(readJson(path.join(dir, 'text_encoder/config.json'))) });

/** A LoRA file as kohya / ComfyUI see it (shapes, alpha values), plus its metadata. */
async function viewOf(file: string): Promise<LoraFileView & { metadata: Record<string, string> }> {
  const f = await SafetensorsFile.open(file);
  try {
    const shapes = new Map(f.keys().map((k) => [k, [...f.info(k).shape]]));
    const alphas = new Map<string, number>();
    for (const k of f.keys()) if (k.endsWith('.alpha')) alphas.set(k.slice(0, -'.alpha'.length), Number((await f.read(k)).data[0]));
    return { shapes, alphas, metadata: { ...f.metadata } };
  } finally {
    await f.close();
  }
}

/** kohya lora_name -> (rank, alpha) of a file. */
const ranksOf = (v: LoraFileView) =>
  new Map([...v.shapes].filter(([k]) => k.endsWith('.lora_down.weight')).map(([k, s]) => [k.split('.')[0], { dim: s[0], alpha: v.alphas.get(k.split('.')[0])! }]));

// ---- the loader rules themselves, on files real tools wrote ------------------------------------------------------

describeGolden('loader rules (test helpers) on the golden single-file model and kohya LoRA', () => {
  const { unet: ucfg, clip: ccfg } = configsOf(golden('tiny-sd'));
  /** ComfyUI's view of the golden LDM checkpoint: model.diffusion_model.* and cond_stage_model.transformer.* renamed. */
  async function goldenComfyShapes(): Promise<Map<string, number[]>> {
    const f = await SafetensorsFile.open(golden('tiny-sd.safetensors'));
    const out = new Map<string, number[]>();
    for (const k of f.keys()) {
      if (k.startsWith('model.diffusion_model.')) out.set(k.slice('model.'.length), [...f.info(k).shape]);
      else if (k.startsWith('cond_stage_model.transformer.')) out.set(`clip_l.transformer.${k.slice('cond_stage_model.transformer.'.length)}`, [...f.info(k).shape]);
    }
    await f.close();
    return out;
  }

  it('the module table and unet_to_diffusers port reproduce every Linear/Conv2d weight of the golden LDM file', async () => {
    const real = await goldenComfyShapes();
    const ours = comfyShapesFromConfig(ucfg, ccfg);
    for (const [k, s] of ours) expect(real.get(k), k).toEqual(s);
    const linConv = [...real].filter(([k, s]) => k.endsWith('.weight') && (s.length === 4 || s.length === 2) && !/embedding/.test(k));
    expect(linConv.map(([k]) => k).filter((k) => !ours.has(k))).toEqual([]);
    expect(ours.size).toBe(linConv.length);
  });

  it('the golden kohya LoRA loads in both; broken variants fail the way kohya / ComfyUI would', async () => {
    const v = await viewOf(golden('lora', 'tiny_lora_kohya.safetensors'));
    const mods = torchModules(ucfg, ccfg);
    const comfy = await goldenComfyShapes();
    expect(kohyaStrictLoadErrors(v, mods)).toEqual([]);
    expect(comfyLoadProblems(v, ucfg, comfy)).toEqual([]);
    const edit = (f: (s: Map<string, number[]>) => void): LoraFileView => {
      const shapes = new Map(v.shapes);
      f(shapes);
      return { shapes, alphas: v.alphas };
    };
    const Q = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q';
    // a module outside kohya's target classes (ComfyUI still takes it)
    const convIn = edit((s) => s.set('lora_unet_conv_in.lora_down.weight', [2, 4, 3, 3]).set('lora_unet_conv_in.lora_up.weight', [32, 2, 1, 1]).set('lora_unet_conv_in.alpha', []));
    expect(kohyaStrictLoadErrors(convIn, mods)).toEqual(expect.arrayContaining(['unexpected key lora_unet_conv_in.lora_down.weight']));
    expect(comfyLoadProblems(convIn, ucfg, comfy)).toEqual([]);
    expect(kohyaStrictLoadErrors(edit((s) => s.delete(`${Q}.alpha`)), mods)).toEqual([`missing key ${Q}.alpha`]);
    expect(kohyaStrictLoadErrors(edit((s) => s.set(`${Q}.lora_down.weight`, [4, 32, 1, 1])), mods)[0]).toMatch(/^size mismatch/);
    // a 3x3 conv adapted with 1x1 factors: kohya refuses the shape, ComfyUI cannot reshape the delta
    const R = 'lora_unet_down_blocks_0_resnets_0_conv1';
    const bad = edit((s) => s.set(`${R}.lora_down.weight`, [2, 32, 1, 1]).set(`${R}.lora_up.weight`, [32, 2, 1, 1]).set(`${R}.alpha`, []));
    expect(kohyaStrictLoadErrors(bad, mods)).toEqual([`size mismatch for ${R}.lora_down.weight: file [2,32,1,1], module [2,32,3,3]`]);
    expect(comfyLoadProblems(bad, ucfg, comfy)).toEqual([expect.stringContaining(`${R}: up [32,2,1,1] x down [2,32,1,1] does not reshape`)]);
    expect(comfyLoadProblems(edit((s) => s.set('lora_unet_nope.alpha', [])), ucfg, comfy)).toEqual(['lora key not loaded: lora_unet_nope.alpha']);
  });
});

// ---- gradients of one conv LoRA ----------------------------------------------------------------------------------

describe('conv LoRA gradients (layers.conv2d with lora_down / lora_up)', () => {
  const cases: { name: string; k: number; stride: number; padding: Padding; hw: number; flat?: boolean }[] = [
    { name: '3x3, stride 1 (resnet conv)', k: 3, stride: 1, padding: 1, hw: 6 },
    { name: '3x3, stride 2, padding 1 (Downsample2D)', k: 3, stride: 2, padding: 1, hw: 7 },
    { name: '1x1 with 2-D factors (conv_shortcut, proj_in)', k: 1, stride: 1, padding: 0, hw: 5, flat: true },
  ];
  for (const c of cases) {
    it(`${c.name}: equal to the merged-weight chain rule and to central differences`, async () => {
      const [cin, cout, r, s] = [3, 5, 2, 0.75];
      const before = tf.memory().numTensors;
      const x = tf.randomNormal([2, c.hw, c.hw, cin], 0, 1, 'float32', 1) as tf.Tensor4D;
      const w = tf.randomNormal([c.k, c.k, cin, cout], 0, 0.3, 'float32', 2);
      const bias = tf.randomNormal([cout], 0, 0.1, 'float32', 3);
      const down = ownedVariable(tf.randomNormal(c.flat ? [cin, r] : [c.k, c.k, cin, r], 0, 0.5, 'float32', 4), `down${c.k}${c.stride}`);
      const up = ownedVariable(tf.randomNormal(c.flat ? [r, cout] : [1, 1, r, cout], 0, 0.5, 'float32', 5), `up${c.k}${c.stride}`);
      const scale = tf.scalar(s);
      const opts = { stride: c.stride, padding: c.padding };
      const p: ParamTree = { weight: w, bias, lora_down: { weight: down }, lora_up: { weight: up }, lora_scale: scale };
      let resid: tf.Tensor | undefined;
      // L = sum(y^2 / 2 + R y): quadratic in each factor, so central differences have no truncation error
      const loss = (y: tf.Tensor) => tf.tidy(() => tf.sum(tf.add(tf.mul(tf.square(y), 0.5), tf.mul(y, (resid ??= tf.keep(tf.randomNormal(y.shape, 0, 1, 'float32', 6)))))) as tf.Scalar);
      const { value, grads } = tf.variableGrads(() => loss(conv2d(p, x, opts)), [down, up]);
      const gD = (await grads[down.name].data()) as Float32Array;
      const gU = (await grads[up.name].data()) as Float32Array;
      const L0 = (await value.data())[0];
      // merged weight W' = W + s * sum_t D[y,x,c,t] U[t,o] (HWIO), in float64 on the host
      const [D, U, W] = [down.dataSync(), up.dataSync(), w.dataSync()];
      const taps = c.k * c.k * cin;
      const merged = Float32Array.from(W, (v, i) => {
        const [tap, o] = [Math.floor(i / cout), i % cout];
        let d = 0;
        for (let t = 0; t < r; t++) d += D[tap * r + t] * U[t * cout + o];
        return v + s * d;
      });
      const wm = tf.tensor(merged, w.shape);
      const yL = tf.tidy(() => conv2d(p, x, opts).dataSync());
      const yM = tf.tidy(() => conv2d({ weight: wm, bias }, x, opts).dataSync());
      const fwdErr = relMaxErr(yL, yM);
      const gWt = tf.grad((k: tf.Tensor) => loss(conv2d({ weight: k, bias }, x, opts)))(wm);
      const gW = gWt.dataSync();
      gWt.dispose();
      // chain rule: dL/dD[tap,t] = s sum_o gW[tap,o] U[t,o]; dL/dU[t,o] = s sum_tap gW[tap,o] D[tap,t]
      const refD = new Float64Array(taps * r);
      const refU = new Float64Array(r * cout);
      for (let tap = 0; tap < taps; tap++)
        for (let t = 0; t < r; t++)
          for (let o = 0; o < cout; o++) {
            refD[tap * r + t] += s * gW[tap * cout + o] * U[t * cout + o];
            refU[t * cout + o] += s * gW[tap * cout + o] * D[tap * r + t];
          }
      const chainErr = Math.max(relMaxErr(gD, refD), relMaxErr(gU, refU));
      // central differences on a few entries of each factor
      const h = 0.05;
      let fdErr = 0;
      for (const [v, g] of [[down, gD], [up, gU]] as const) {
        const base = (v.dataSync() as Float32Array).slice();
        const gmax = Math.max(...Array.from(g, Math.abs));
        for (const i of [0, Math.floor(base.length / 2), base.length - 1]) {
          const set = (d: Float32Array) => tf.tidy(() => v.assign(tf.tensor(d, v.shape)));
          const at = (delta: number) => {
            const d = base.slice();
            d[i] += delta;
            set(d);
            return tf.tidy(() => loss(conv2d(p, x, opts)).dataSync()[0]);
          };
          const fd = (at(h) - at(-h)) / (2 * h);
          fdErr = Math.max(fdErr, Math.abs(fd - g[i]) / gmax);
          set(base);
        }
      }
      console.log(`conv LoRA ${c.name}: loss ${L0.toFixed(3)}, forward vs merged ${fwdErr.toExponential(2)}, gradient vs chain rule ${chainErr.toExponential(2)}, vs central differences ${fdErr.toExponential(2)}`);
      expect(fwdErr).toBeLessThan(1e-5);
      expect(chainErr).toBeLessThan(1e-5);
      expect(fdErr).toBeLessThan(2e-3); // float32 loss of ~10^2 differenced over 0.1
      expect(Math.max(...Array.from(gD, Math.abs))).toBeGreaterThan(0.1); // a real gradient
      tf.dispose([value, ...Object.values(grads), x, w, bias, down, up, scale, wm, resid!]);
      expect(tf.memory().numTensors).toBe(before);
    });
  }
});

// ---- a LoCon on a tiny random model: injected == merged, kohya's module set ---------------------------------------

/** Put a file's factors into a params tree as injected ones (tfjs layouts, per-module alpha / rank). */
function injectModules(model: LoraModel, modules: LoraModule[]): void {
  for (const m of modules) {
    const node = sub((m.component === 'unet' ? model.unet : model.textEncoder)!, ...m.module.split('.'));
    const tfOf = (name: string, a: { shape: number[]; data: Float32Array }) => {
      const t = torchToTfLayout(`${m.module}.${name}.weight`, a);
      return tf.tensor(t.data as Float32Array, t.shape);
    };
    node.lora_down = { weight: tfOf('lora_down', m.down) };
    node.lora_up = { weight: tfOf('lora_up', m.up) };
    node.lora_scale = tf.scalar(m.alpha / m.down.shape[0]);
  }
}

describe('LoCon on a tiny random UNet + text encoder', () => {
  const ranks: LoraRanks = { rank: 3, alpha: 1.5, convRank: 2, convAlpha: 5 };

  it('targets: attn+ff = kohya networks.lora, attn+ff+conv = kohya with conv_dim (time_emb_proj included); attn is a subset', () => {
    const u = randomParams(unetParamShapes(TINY_UNET), 1);
    const te = randomParams(clipTextParamShapes(TINY_CLIP), 2);
    const mods = torchModules(TINY_UNET, TINY_CLIP);
    const ours = (t: 'attn' | 'attn+ff' | 'attn+ff+conv') =>
      [...loraTargetModules(u, 'unet', t).map((m) => `lora_unet_${m.replace(/\./g, '_')}`), ...loraTargetModules(te, 'text_encoder', t).map((m) => `lora_te_${m.replace(/\./g, '_')}`)].sort();
    const kohya = (conv: boolean) => [...kohyaTrainedModules(mods, { dim: 4, alpha: 1, convDim: conv ? 4 : undefined, textEncoder: true }).keys()].sort();
    expect(ours('attn+ff')).toEqual(kohya(false));
    expect(ours('attn+ff+conv')).toEqual(kohya(true));
    expect(ours('attn+ff+conv')).toContain('lora_unet_down_blocks_1_resnets_0_time_emb_proj');
    expect(ours('attn+ff+conv')).toContain('lora_unet_down_blocks_1_resnets_0_conv_shortcut');
    expect(ours('attn+ff+conv')).toContain('lora_unet_down_blocks_0_downsamplers_0_conv');
    expect(ours('attn+ff+conv')).toContain('lora_unet_up_blocks_0_upsamplers_0_conv');
    const attn = ours('attn');
    expect(attn.length).toBe(4 * 8 + 2 * 4); // 4 transformers x 8 projections, 2 text layers x 4
    expect(attn.every((n) => kohya(false).includes(n))).toBe(true);
    disposeParams(u);
    disposeParams(te);
  });

  it('the injected forward equals the merged forward of the written kohya file; kohya and ComfyUI take every key', async () => {
    const model: LoraModel = { unet: randomParams(unetParamShapes(TINY_UNET), 3), textEncoder: randomParams(clipTextParamShapes(TINY_CLIP), 4) };
    const gen = new TorchGenerator(5);
    const vars = [
      ...injectLora(model.unet!, loraTargetModules(model.unet!, 'unet', 'attn+ff+conv'), { ...ranks, gen }).values(),
      ...injectLora(model.textEncoder!, loraTargetModules(model.textEncoder!, 'text_encoder', 'attn+ff+conv'), { ...ranks, gen }).values(),
    ];
    const ids = tf.tensor2d([[0, 5, 17, 33, 99, 99, 99, 99, 99, 99, 99, 99]], [1, 12], 'int32');
    const x = tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 6) as tf.Tensor4D;
    const forward = () =>
      tf.tidy(() => {
        const ctx = clipText(model.textEncoder!, TINY_CLIP, ids).hidden;
        return [unet(model.unet!, TINY_UNET, x, 321, ctx).dataSync(), ctx.dataSync()] as const;
      });
    const [baseEps] = forward(); // lora_up starts at zero: the base model
    // move lora_up off zero (trained-like factors)
    vars.forEach((v, i) => v.name.includes('lora_up') && tf.tidy(() => v.assign(tf.randomNormal(v.shape, 0, 0.2, 'float32', 100 + i))));
    const [injEps, injCtx] = forward();
    const modules = [...(await extractLora(model.unet!, 'unet', ranks)), ...(await extractLora(model.textEncoder!, 'text_encoder', ranks))];
    const file = path.join(tmp, 'tiny-locon.safetensors');
    await writeLoraKohya(file, modules);
    removeLora(model.unet!);
    removeLora(model.textEncoder!);
    const before = tf.memory().numTensors;
    const lora = await readLora(file, model);
    expect(lora.modules).toHaveLength(modules.length);
    const restore = mergeLora(model, lora, 1);
    const [mrgEps, mrgCtx] = forward();
    restore();
    expect(tf.memory().numTensors).toBe(before);
    const errEps = relMaxErr(mrgEps, injEps);
    const errCtx = relMaxErr(mrgCtx, injCtx);
    const effect = relMaxErr(baseEps, injEps);
    console.log(`LoCon tiny model: merged vs injected forward: UNet ${errEps.toExponential(2)}, text encoder ${errCtx.toExponential(2)} (the LoRA moves the UNet output by ${effect.toFixed(3)})`);
    expect(effect).toBeGreaterThan(0.05);
    expect(errEps).toBeLessThan(1e-5);
    expect(errCtx).toBeLessThan(1e-5);
    // the file: kohya's shapes per module kind, conv rank/alpha on 3x3 convs only, and both loaders take every key
    const v = await viewOf(file);
    const mods = torchModules(TINY_UNET, TINY_CLIP);
    expect(v.shapes.get('lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight')).toEqual([2, 32, 3, 3]);
    expect(v.shapes.get('lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight')).toEqual([32, 2, 1, 1]);
    expect(v.shapes.get('lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight')).toEqual([3, 32, 1, 1]);
    expect(v.shapes.get('lora_unet_down_blocks_1_resnets_0_time_emb_proj.lora_up.weight')).toEqual([64, 3]);
    expect(ranksOf(v)).toEqual(kohyaTrainedModules(mods, { dim: 3, alpha: 1.5, convDim: 2, convAlpha: 5, textEncoder: true }));
    expect(kohyaStrictLoadErrors(v, mods)).toEqual([]);
    expect(comfyLoadProblems(v, TINY_UNET, comfyShapesFromConfig(TINY_UNET, TINY_CLIP))).toEqual([]);
    tf.dispose([ids, x]);
    disposeParams(model.unet!);
    disposeParams(model.textEncoder!);
  });
});

// ---- trained on the bundled model, loaded back by `sdtune sample` -----------------------------------------------

describe('LoCon trained on the bundled tiny-sd-v1 (1x1 convs: proj_in/out, conv_shortcut)', () => {
  it('export: kohya keys and ss_network_args, kohya and ComfyUI consume every key, and sample renders it like the injected model', async () => {
    const out = path.join(tmp, 'train');
    const cfg = resolveConfig('lora', null, {
      'model.path': MODEL, 'data.dir': path.join(ROOT, 'datasets/shapes'), 'data.resolution': 64, 'train.batch_size': 1, 'train.max_steps': 2,
      'train.lr': 1e-2, 'train.seed': 3, 'lora.targets': 'attn+ff+conv', 'lora.rank': 4, 'lora.alpha': 2, 'lora.conv_rank': 2, 'lora.conv_alpha': 1,
      'lora.text_encoder': true, 'output.dir': out, 'output.name': 'locon',
    });
    const r = await train('lora', cfg, { quiet: true, log: () => {} });
    const file = path.join(out, 'locon.safetensors');
    expect(r.files).toEqual([file]);
    const v = await viewOf(file);
    expect(v.metadata).toMatchObject({ ss_network_module: 'networks.lora', ss_network_dim: '4', ss_network_alpha: '2.0', ss_network_args: '{"conv_dim": "2", "conv_alpha": "1"}' });
    const { unet: ucfg, clip: ccfg } = configsOf(MODEL);
    const mods = torchModules(ucfg, ccfg);
    // the modules kohya trains with network_dim 4, network_alpha 2, network_args conv_dim=2 conv_alpha=1, with TE
    expect(ranksOf(v)).toEqual(kohyaTrainedModules(mods, { dim: 4, alpha: 2, convDim: 2, convAlpha: 1, textEncoder: true }));
    expect(kohyaStrictLoadErrors(v, mods)).toEqual([]);
    expect(comfyLoadProblems(v, ucfg, comfyShapesFromConfig(ucfg, ccfg))).toEqual([]);

    // sample with the file (read + merge) == the pipeline on the model with the file's factors injected
    const base = { prompt: 'a red circle, outlined style', seed: 1, steps: 4, cfg: 7.5, width: 64, height: 64 };
    const png = path.join(tmp, 'locon.png');
    await sampleToFiles({ ...base, model: MODEL, sampler: 'euler', lora: [{ path: file, weight: 1 }], out: png, quiet: true });
    const sampled = (await readImageRgb(png)).data;
    const m = await loadModel(MODEL);
    try {
      const run = async () => toUint8((await generate(m, { ...base, negativePrompt: '', sampler: resolveSampler('euler') })).images[0]);
      const plain = await run();
      const lora = await readLora(file, { unet: m.unet!.params, textEncoder: m.textEncoder!.params });
      expect(lora.modules).toHaveLength(ranksOf(v).size);
      expect(lora.modules.find((x) => x.module === 'down_blocks.0.downsamplers.0.conv')).toMatchObject({ alpha: 1, down: { shape: [2, 32, 3, 3] } });
      injectModules({ unet: m.unet!.params, textEncoder: m.textEncoder!.params }, lora.modules);
      const injected = await run();
      removeLora(m.unet!.params);
      removeLora(m.textEncoder!.params);
      const d = maxAbsDiff(sampled, injected);
      const moved = maxAbsDiff(sampled, plain);
      console.log(`LoCon export sampled: vs injected model ${d} levels, vs base model ${moved} levels (of 255); losses ${r.losses.map((l) => l.toFixed(4)).join(', ')}`);
      expect(moved).toBeGreaterThan(4);
      expect(d).toBeLessThanOrEqual(1);
    } finally {
      disposeModel(m);
    }
  });
});
