// Hypernetwork training (method: hypernetwork) on the bundled tiny model: what trains, the A1111 .pt and safetensors
// exports (read back, sampled), dropout and its exact resume, the config's rules, and the bundled config from the CLI.
import * as tf from '@tensorflow/tfjs';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { type Hypernetwork, createHypernetwork, disposeHypernetwork, hypernetworkModuleShapes, readHypernetwork } from '../../src/adapters/hypernetwork.js';
import { modelHash } from '../../src/io/hashes.js';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { readPngText } from '../../src/io/png.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { unetConfig } from '../../src/models/configs.js';
import { flattenParams } from '../../src/models/params.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { loadConfigFile, resolveConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { createHypernetworkRecipe, modelAttentionWidths } from '../../src/train/recipes/hypernetwork.js';
import { MODEL, ROOT, config, quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-hn-train-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Every tensor of a hypernetwork by `<width>.<k|v>.<key>` (host copies). */
const weightsOf = (net: Hypernetwork) =>
  new Map([...net.layers].flatMap(([d, pair]) => pair.flatMap((t, j) => [...flattenParams(t)].map(([k, v]) => [`${d}.${'kv'[j]}.${k}`, v.dataSync() as Float32Array] as const))));
const same = (a: Float32Array, b: Float32Array) => Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;
async function read(file: string) {
  const net = await readHypernetwork(file);
  try {
    return { meta: net.meta, w: weightsOf(net) };
  } finally {
    disposeHypernetwork(net);
  }
}
const hn = (out: string, extra: Record<string, unknown> = {}) => config('hypernetwork', out, { 'train.lr': 1e-3, ...extra });

describe('hypernetwork training (bundled tiny model)', () => {
  it('defaults are A1111\'s; the model\'s attention widths (SD v1: 768, 320, 640, 1280); the rules between keys', async () => {
    const c = await resolveConfig('hypernetwork', null, { 'model.path': MODEL, 'data.dir': path.join(ROOT, 'datasets/shapes') });
    expect(c.hypernetwork).toEqual({
      layer_structure: [1, 2, 1], activation_func: 'linear', weight_initialization: 'Normal', add_layer_norm: false, use_dropout: false,
      dropout_structure: null, last_layer_dropout: true, activate_output: false, widths: null,
    });
    expect(c.train.lr).toBe(1e-5);
    expect(c.train.weight_decay).toBe(1e-2);
    expect(c.output.save_precision).toBe('fp32');
    expect(modelAttentionWidths(unetConfig({ cross_attention_dim: 768, block_out_channels: [320, 640, 1280, 1280] }))).toEqual([768, 320, 640, 1280]);
    const m = await loadModel(MODEL, { components: ['unet'] });
    expect(modelAttentionWidths(m.unet!.config)).toEqual([32, 64]); // the tiny model's text width is its first level's
    disposeModel(m);
    const refused = async (extra: Record<string, unknown>) => {
      try {
        await resolveConfig('hypernetwork', null, { 'model.path': MODEL, 'data.dir': path.join(ROOT, 'datasets/shapes'), ...extra });
      } catch (e) {
        return (e as Error).message;
      }
      return 'accepted';
    };
    expect(await refused({ 'hypernetwork.layer_structure': [2, 1] })).toMatch(/hypernetwork.layer_structure: expected at least 2 multipliers, the first and last 1 .*found \[2,1\]/);
    expect(await refused({ 'hypernetwork.layer_structure': [1, 0, 1] })).toMatch(/hypernetwork.layer_structure: expected a list of numbers > 0/);
    expect(await refused({ 'hypernetwork.dropout_structure': [0, 0.3, 0] })).toMatch(/dropout_structure is set but hypernetwork.use_dropout is false/);
    expect(await refused({ 'hypernetwork.use_dropout': true, 'hypernetwork.dropout_structure': [0, 0.3] })).toMatch(/expected 3 probabilities/);
    expect(await refused({ 'hypernetwork.use_dropout': true, 'hypernetwork.dropout_structure': [0, 0.3, 0.1] })).toMatch(/first and last probabilities must be 0/);
    expect(await refused({ 'hypernetwork.activation_func': 'softmax' })).toMatch(/hypernetwork.activation_func: expected one of "linear", "relu"/);
    expect(await refused({ 'output.save_precision': 'fp16' })).toMatch(/hypernetworks are saved in fp32/);
    expect(await refused({ 'hypernetwork.widths': [32, 32] })).toMatch(/each width once/);
    // a width no attention reads is refused when the model is known
    await expect(train('hypernetwork', await hn(path.join(tmp, 'w'), { 'hypernetwork.widths': [768], 'train.max_steps': 1 }), quiet)).rejects.toThrow(/768 is no context width of .*attentions \(32, 64\)/);
  });

  it('only the MLPs train; the .pt (A1111 keys, step, checkpoint hash and name) and the .safetensors hold the same trained weights', async () => {
    const out = path.join(tmp, 'run');
    const r = await train('hypernetwork', await hn(out, { 'train.max_steps': 3, 'hypernetwork.activation_func': 'relu' }), quiet);
    expect(r.losses.length).toBe(3);
    for (const l of r.losses) expect(Number.isFinite(l) && l > 0).toBe(true);
    expect(r.files).toEqual([path.join(out, 'run.pt'), path.join(out, 'run.safetensors')]);
    // the checkpoint's trainables are exactly the hypernetwork's tensors (nothing of the UNet or the text encoder)
    const ck = await SafetensorsFile.open(path.join(r.checkpoint, 'trainable.safetensors'));
    const keys = ck.keys().sort();
    await ck.close();
    const init = createHypernetwork({ widths: [32, 64], activation_func: 'relu', gen: new TorchGenerator(7) }); // the recipe's first draws
    const shapes = [32, 64].flatMap((d) => ['k', 'v'].flatMap((j) => [...hypernetworkModuleShapes(init.meta, d).keys()].map((k) => `hypernetwork.${d}.${j}.${k}`)));
    expect(keys).toEqual(shapes.sort());
    const pt = await read(path.join(out, 'run.pt'));
    const st = await read(path.join(out, 'run.safetensors'));
    expect(pt.meta).toEqual({
      layer_structure: [1, 2, 1], activation_func: 'relu', is_layer_norm: false, weight_initialization: 'Normal', use_dropout: false,
      dropout_structure: [0, 0, 0], last_layer_dropout: true, activate_output: false, name: 'run', step: 3,
      sd_checkpoint: await modelHash(path.join(MODEL, 'unet/diffusion_pytorch_model.safetensors')), sd_checkpoint_name: 'tiny-sd-v1', optional_info: null,
    });
    expect(st.meta).toEqual(pt.meta);
    const w0 = weightsOf(init);
    disposeHypernetwork(init);
    expect([...pt.w.keys()].sort()).toEqual([...w0.keys()].sort());
    let moved = 0;
    for (const [k, v] of pt.w) {
      expect(same(v, st.w.get(k)!), k).toBe(true);
      if (!same(v, w0.get(k)!)) moved++;
    }
    expect(moved).toBe(pt.w.size); // every weight and bias trained (biases start at 0)
  });

  it('dropout changes what trains; a resumed run repeats its masks exactly', async () => {
    const drop = { 'hypernetwork.layer_structure': [1, 2, 2, 1], 'hypernetwork.use_dropout': true, 'hypernetwork.activation_func': 'relu' };
    const straight = path.join(tmp, 'drop-straight');
    const resumed = path.join(tmp, 'drop-resumed');
    const plain = path.join(tmp, 'drop-off');
    await train('hypernetwork', await hn(straight, { ...drop, 'train.max_steps': 2 }), quiet);
    await train('hypernetwork', await hn(resumed, { ...drop, 'train.max_steps': 1 }), quiet);
    await train('hypernetwork', await hn(resumed, { ...drop, 'train.max_steps': 2 }), { ...quiet, resume: resumed });
    await train('hypernetwork', await hn(plain, { ...drop, 'hypernetwork.use_dropout': false, 'train.max_steps': 2 }), quiet);
    const [a, b, p] = await Promise.all([straight, resumed, plain].map((d) => read(path.join(d, 'run.pt'))));
    expect(a.meta.dropout_structure).toEqual([0, 0.3, 0.3, 0]); // A1111's rule: 0.3 after the hidden layers, last_layer_dropout
    for (const [k, v] of a.w) expect(same(v, b.w.get(k)!), k).toBe(true); // 1 step + resume 1 == 2 steps
    // without dropout the Sequential has no Dropout entries (other indices): compare layer by layer
    const [av, pv] = [[...a.w.values()], [...p.w.values()]];
    expect(pv.map((v) => v.length)).toEqual(av.map((v) => v.length));
    expect(av.filter((v, i) => !same(v, pv[i])).length).toBe(av.length); // the masks reach every tensor's gradient
  });

  it('validation samples see the hypernetwork (withInference gives the context adapter); the recipe frees its tensors', async () => {
    const m = await loadModel(MODEL);
    const before = tf.memory().numTensors;
    const recipe = createHypernetworkRecipe(m, { widths: [32, 64], gen: new TorchGenerator(1) });
    expect([...recipe.trainables.keys()].every((k) => k.startsWith('hypernetwork.'))).toBe(true);
    expect(recipe.textEncoderTrainable).toBe(false);
    expect(recipe.forward?.training).toBe(true);
    const ctx = tf.ones([1, 3, 32]) as tf.Tensor3D;
    const kv = await recipe.withInference(async (use) => use?.context?.kv(ctx, { kind: 'cross', width: 32 }, {}));
    expect(kv).toHaveLength(2);
    const d = tf.tidy(() => tf.max(tf.abs(tf.sub(kv![0], ctx))).dataSync()[0]);
    expect(d).toBeGreaterThan(0); // x + MLP(x): N(0, 0.01) weights move it a little
    tf.dispose([ctx, ...kv!]);
    recipe.dispose();
    expect(tf.memory().numTensors).toBe(before);
    disposeModel(m);
  });
});

describe('sdtune hypernetwork (bundled config)', () => {
  const BIN = path.join(ROOT, 'bin/sdtune.js');
  const sdtune = (...args: string[]) => {
    const r = spawnSync(process.execPath, [BIN, ...args], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
    return { code: r.status, out: r.stdout, err: r.stderr };
  };

  it('hypernetwork --config configs/hypernetwork.yaml (shortened), then sample --hypernetwork on the .pt and the .safetensors', async () => {
    expect((await loadConfigFile('hypernetwork', path.join(ROOT, 'configs/hypernetwork.yaml'), {})).hypernetwork?.layer_structure).toEqual([1, 2, 1]);
    const out = path.join(tmp, 'cli');
    const r = sdtune('hypernetwork', '--config', 'configs/hypernetwork.yaml', '--max-steps', '2', '--output', out, '--layer-structure', '1, 2, 1', '--set', 'output.sample_every=null', '--set', 'output.save_every=null');
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/method: hypernetwork; trainable parameters: [\d,]+/);
    expect(r.out.trim().split('\n')).toEqual([path.join(out, 'shapes-hn.pt'), path.join(out, 'shapes-hn.safetensors')]);
    for (const file of ['shapes-hn.pt', 'shapes-hn.safetensors']) {
      const png = path.join(tmp, `${file}.png`);
      const s = sdtune('sample', '--model', 'checkpoints/tiny-sd-v1', '--prompt', 'a red circle, outlined style', '--hypernetwork', `${path.join(out, file)}:0.7`, '--steps', '2', '--seed', '1', '--out', png);
      expect(s.code, s.err).toBe(0);
      expect(existsSync(png)).toBe(true);
      expect((await readPngText(png)).parameters).toMatch(/Hypernet: shapes-hn, Hypernet hash: [0-9a-f]{8}, Hypernet strength: 0.7/);
    }
  });
});
