// The method registry: a method defined here, in the test (its recipe, its config section and its rules), trains
// through resolveConfig + train with no change to the loop or the config; unknown methods list the registered ones.
// The recipe hooks: per-item loss weights, a loss that is not diffusion, the after-step hook, the recipe's own
// batches and checkpoint state (saved and resumed exactly).
import * as tf from '@tensorflow/tfjs';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { configOverrides, flagKeys } from '../../src/cli/train-flags.js';
import { SdtuneError } from '../../src/errors.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { makeTrainable } from '../../src/models/params.js';
import { resolveConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { type MethodEntry, getMethod, methodNames, registerMethod, unregisterMethod } from '../../src/train/registry.js';
import { encodeWithTextEncoder } from '../../src/train/recipe.js';
import { int, num } from '../../src/train/schema.js';
import type { Recipe } from '../../src/train/recipe.js';
import type { LoadedModel } from '../../src/io/model.js';
import { MODEL, ROOT, quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-methods-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A test-only method: trains the UNet's conv_out bias (a 4-element leaf), exports it as one safetensors file. */
const BIAS_SECTION = z.object({
  scale: num(0, { minOpen: true }).default(1), // multiplies the lr of the bias
  repeat: int(1).default(1),
});
declare module '../../src/train/config.js' {
  interface MethodSections {
    bias_only: z.output<typeof BIAS_SECTION>;
  }
}
const biasMethod: MethodEntry = {
  name: 'bias_only',
  section: BIAS_SECTION,
  defaults: { 'train.lr': 1e-2, 'train.weight_decay': 0 },
  check(c, fail) {
    const s = c.bias_only!;
    if (s.repeat > 1 && s.scale !== 1) fail('bias_only.repeat', 'bias_only.repeat needs bias_only.scale 1');
  },
  cli: { command: 'bias-only', describe: 'test method', flags: { scale: { key: 'bias_only.scale' } } },
  create: (model, c) => biasRecipe(model, c.bias_only!.scale),
};

/** The recipe of bias_only: conv_out.bias trains (lr x scale), exported alone. */
function biasRecipe(model: LoadedModel, scale: number): Recipe {
    const s = { scale };
    const vars = makeTrainable(model.unet!.params, (k) => k === 'conv_out.bias', 'test/bias');
    const trainables = new Map([...vars].map(([k, v]) => [`unet.${k}`, v] as const));
    return {
      method: 'bias_only',
      trainables,
      textEncoderTrainable: false,
      lrFor: (_name, factor, base) => base * s.scale * factor,
      captionFor: (caption) => caption,
      encodeIds: (ids) => encodeWithTextEncoder(model, ids),
      withInference: (fn) => fn(),
      async export(dir, name) {
        const file = path.join(dir, `${name}.safetensors`);
        const v = trainables.get('unet.conv_out.bias')!;
        await writeSafetensors(file, new Map([['conv_out.bias', { shape: [...v.shape], dtype: 'F32' as const, load: async () => (await v.data()) as Float32Array }]]));
        return [file];
      },
      dispose() {},
    };
}

/** Register a variant of bias_only named `name` whose recipe has `hooks` (built on the recipe, per run). */
function variant(name: string, hooks: (r: Recipe, model: LoadedModel) => Partial<Recipe>): void {
  registerMethod({
    ...biasMethod,
    name,
    section: z.object({}),
    check: undefined,
    cli: { command: name, describe: 'test method' },
    create(model) {
      const r = biasRecipe(model, 1);
      return { ...r, method: name, ...hooks(r, model) };
    },
  });
}

const base = (out: string, extra: Record<string, unknown> = {}) => ({
  'model.path': MODEL,
  'data.dir': path.join(ROOT, 'datasets/shapes'),
  'data.resolution': 64,
  'train.batch_size': 2,
  'train.seed': 7,
  'output.dir': out,
  'output.name': 'run',
  ...extra,
});

describe('method registry', () => {
  beforeAll(() => registerMethod(biasMethod));
  afterAll(() => unregisterMethod('bias_only'));

  it('an unknown method is a usage error listing the registered ones', () => {
    let e: unknown;
    try {
      resolveConfig('hypernetwork_xl', null, {});
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(SdtuneError);
    expect((e as SdtuneError).kind).toBe('usage');
    expect((e as SdtuneError).message).toBe('unknown training method "hypernetwork_xl"; registered: lora, textual_inversion, finetune, dreambooth, hypernetwork, vae, bias_only');
    expect(() => getMethod('nope')).toThrow(/registered: lora, textual_inversion, finetune, dreambooth, hypernetwork, vae/);
    expect(() => registerMethod(biasMethod)).toThrow(/registered already/);
    expect(() => registerMethod({ ...biasMethod, name: 'train' })).toThrow(/shared config section/);
  });

  it("a registered method's section, defaults, rules and flags are the config's", () => {
    const c = resolveConfig('bias_only', null, base(path.join(tmp, 'cfg')));
    expect(c.bias_only).toEqual({ scale: 1, repeat: 1 });
    expect(c.train).toMatchObject({ lr: 1e-2, weight_decay: 0 }); // the method's defaults of shared keys
    expect(c.lora).toBeUndefined();
    expect(resolveConfig('bias_only', 'bias_only:\n  scale: 2\n', { ...base(path.join(tmp, 'cfg')) }).output.name).toBe('run');
    expect(() => resolveConfig('bias_only', 'bias_only:\n  scal: 2\n', base(path.join(tmp, 'cfg')), 'b.yaml')).toThrow('b.yaml:2: unknown key bias_only.scal (did you mean bias_only.scale?)');
    expect(() => resolveConfig('bias_only', 'bias_only:\n  scale: 0\n', base(path.join(tmp, 'cfg')), 'b.yaml')).toThrow('b.yaml:2: bias_only.scale: expected a number > 0, found 0');
    expect(() => resolveConfig('bias_only', 'bias_only:\n  scale: 2\n  repeat: 2\n', base(path.join(tmp, 'cfg')), 'b.yaml')).toThrow('b.yaml:3: bias_only.repeat needs bias_only.scale 1');
    // its flags: the CLI reads them from the entry (--scale sets bias_only.scale, and messages name the flag)
    const flags = configOverrides('bias_only', { ...base(path.join(tmp, 'cfg')), scale: '3' });
    expect(flags.overrides['bias_only.scale']).toBe('3');
    expect(resolveConfig('bias_only', null, flags.overrides, flags).bias_only).toEqual({ scale: 3, repeat: 1 });
    const bad = configOverrides('bias_only', { ...base(path.join(tmp, 'cfg')), scale: 'big' });
    expect(() => resolveConfig('bias_only', null, bad.overrides, bad)).toThrow('--scale: bias_only.scale: expected a number > 0, found "big"');
    expect(flagKeys().scale).toBe('bias_only.scale');
    // the library itself takes dotted keys only
    expect(() => resolveConfig('bias_only', null, { ...base(path.join(tmp, 'cfg')), scale: 3 })).toThrow(/^override scale: unknown key scale \(/);
    // its section belongs to it alone
    expect(() => resolveConfig('lora', 'bias_only:\n  scale: 2\n', base(path.join(tmp, 'cfg')))).toThrow(/has a bias_only section, but this command trains lora/);
    expect(() => resolveConfig('bias_only', 'lora:\n  rank: 2\n', base(path.join(tmp, 'cfg')))).toThrow(/has a lora section, but this command trains bias_only/);
    expect(methodNames()).toEqual(['lora', 'textual_inversion', 'finetune', 'dreambooth', 'hypernetwork', 'vae', 'bias_only']);
  });

  it('trains end to end through resolveConfig + train (the loop and config unchanged)', async () => {
    const out = path.join(tmp, 'bias');
    const c = resolveConfig('bias_only', 'bias_only:\n  scale: 2\n', base(out, { 'train.max_steps': 1 }));
    const r = await train('bias_only', c, quiet);
    expect(r.steps).toBe(1);
    expect(r.losses).toHaveLength(1);
    expect(r.losses.every(Number.isFinite)).toBe(true);
    expect(r.files).toEqual([path.join(out, 'run.safetensors')]);
    const f = await SafetensorsFile.open(r.files[0]);
    const trained = (await f.readFloat('conv_out.bias')).data;
    await f.close();
    const b = await SafetensorsFile.open(path.join(MODEL, 'unet', 'diffusion_pytorch_model.safetensors'));
    const orig = (await b.readFloat('conv_out.bias')).data;
    await b.close();
    // AdamW's first step moves every element by lr (1e-2 x the method's scale 2, no decay), whatever its gradient
    for (let i = 0; i < orig.length; i++) expect(Math.abs(trained[i] - orig[i])).toBeCloseTo(0.02, 5);
    expect(readFileSync(path.join(out, 'config.resolved.yaml'), 'utf8')).toMatch(/bias_only:\n {2}scale: 2\n {2}repeat: 1\n/);
  });
});

describe('recipe hooks', () => {
  afterAll(() => ['plain', 'weighted', 'not_diffusion', 'stateful'].forEach(unregisterMethod));
  const bias = async (file: string) => {
    const f = await SafetensorsFile.open(file);
    try {
      return (await f.readFloat('conv_out.bias')).data as Float32Array;
    } finally {
      await f.close();
    }
  };

  it('reduceLoss: per-item weights change the loss trained on (default: the mean of the per-item losses)', async () => {
    const seen: number[][] = [];
    const w = [0.25, 1.75];
    variant('weighted', () => ({
      reduceLoss(perItem) {
        seen.push([...perItem.dataSync()]); // inside the tape: the per-item losses of the step's batch
        return tf.mean(tf.mul(perItem, tf.tensor1d(w))) as tf.Scalar;
      },
    }));
    variant('plain', () => ({}));
    const plain = await train('plain', resolveConfig('plain', null, base(path.join(tmp, 'plain'), { 'train.max_steps': 1 })), quiet);
    const weighted = await train('weighted', resolveConfig('weighted', null, base(path.join(tmp, 'weighted'), { 'train.max_steps': 1 })), quiet);
    expect(seen).toHaveLength(1);
    const [p0, p1] = seen[0];
    expect(p0).not.toBeCloseTo(p1, 4); // two different items, so the weights matter
    // the same seed draws the same batch, noise and timesteps: the default is their mean, the recipe's the weighted mean
    expect(plain.losses[0]).toBeCloseTo((p0 + p1) / 2, 6);
    expect(weighted.losses[0]).toBeCloseTo((w[0] * p0 + w[1] * p1) / 2, 6);
  });

  it('loss: a recipe that is not diffusion training gives the whole loss (no UNet forward), and the loop trains it', async () => {
    const target = 0.5;
    let unetRuns = 0;
    variant('not_diffusion', (r) => ({
      loss(batch) {
        expect(batch.captions).toHaveLength(2); // the loader's batch is still the one handed over
        const v = r.trainables.get('unet.conv_out.bias')!;
        return tf.sum(tf.square(tf.sub(v, target))) as tf.Scalar;
      },
      reduceLoss() {
        unetRuns++;
        return tf.scalar(0);
      },
    }));
    const out = path.join(tmp, 'not-diffusion');
    const orig = await bias(path.join(MODEL, 'unet', 'diffusion_pytorch_model.safetensors'));
    const r = await train('not_diffusion', resolveConfig('not_diffusion', null, base(out, { 'train.max_steps': 1, 'train.max_grad_norm': 0 })), quiet);
    expect(unetRuns).toBe(0);
    expect(r.losses[0]).toBeCloseTo(orig.reduce((a, x) => a + (x - target) ** 2, 0), 5);
    // one AdamW step of lr 1e-2 towards the target
    const got = await bias(r.files[0]);
    for (let i = 0; i < orig.length; i++) expect(got[i] - orig[i]).toBeCloseTo(Math.sign(target - orig[i]) * 1e-2, 5);
  });

  it('nextBatch, afterStep and checkpoint state: saved with every checkpoint, resumed exactly (same curve, same state)', async () => {
    // state: a counter of steps, a tensor that each step changes (so its value is the run's history), and the
    // number of batches drawn (JSON); the recipe's batches are the loader's
    variant('stateful', () => {
      const counter = tf.variable(tf.scalar(0), false, `test/counter#${Math.random()}`);
      const trace = tf.variable(tf.linspace(-1, 1, 6).reshape([2, 3]), false, `test/trace#${Math.random()}`);
      let batches = 0;
      return {
        async nextBatch(loader) {
          batches++;
          return loader.next();
        },
        afterStep(step) {
          counter.assign(tf.add(counter, 1));
          trace.assign(tf.tidy(() => tf.add(tf.mul(trace, 0.37), step / 3)));
        },
        checkpoint: {
          json: () => ({ batches }),
          tensors: () => new Map<string, tf.Tensor>([['counter', counter], ['trace', trace]]),
          restore(saved) {
            batches = (saved.json as { batches: number }).batches;
            counter.assign(saved.tensors.get('counter') as tf.Scalar);
            trace.assign(saved.tensors.get('trace')!);
          },
        },
        dispose() {
          counter.dispose();
          trace.dispose();
        },
      };
    });
    const cfg = (out: string, steps: number) => resolveConfig('stateful', null, base(out, { 'train.max_steps': steps, 'train.gradient_accumulation': 2 }));
    const straight = await train('stateful', cfg(path.join(tmp, 'straight'), 3), quiet);
    await train('stateful', cfg(path.join(tmp, 'resumed'), 2), quiet);
    const tail = await train('stateful', cfg(path.join(tmp, 'resumed'), 3), { ...quiet, resume: path.join(tmp, 'resumed') });
    expect(tail.losses).toEqual([straight.losses[2]]); // the same curve
    const stateOf = async (out: string) => {
      const ck = path.join(out, 'checkpoints', 'step-000003');
      const f = await SafetensorsFile.open(path.join(ck, 'recipe.safetensors'));
      try {
        const json = JSON.parse(readFileSync(path.join(ck, 'state.json'), 'utf8')).recipe;
        return { json, counter: Array.from((await f.readFloat('counter')).data), trace: Array.from((await f.readFloat('trace')).data) };
      } finally {
        await f.close();
      }
    };
    const a = await stateOf(path.join(tmp, 'straight'));
    expect(a.json).toEqual({ batches: 6 }); // 3 steps x 2 accumulated batches
    expect(a.counter).toEqual([3]);
    let t = Array.from(tf.linspace(-1, 1, 6).dataSync());
    for (let step = 1; step <= 3; step++) t = t.map((x) => Math.fround(Math.fround(x * Math.fround(0.37)) + Math.fround(step / 3)));
    expect(a.trace).toEqual(t);
    expect(await stateOf(path.join(tmp, 'resumed'))).toEqual(a); // bit for bit after save + resume
    // a checkpoint without the recipe's state (another method's) is refused by name
    rmSync(path.join(tmp, 'resumed', 'checkpoints', 'step-000003', 'recipe.safetensors'));
    await expect(train('stateful', cfg(path.join(tmp, 'resumed'), 4), { ...quiet, resume: path.join(tmp, 'resumed', 'checkpoints', 'step-000003') })).rejects.toThrow(
      /the recipe state does not match this training setup \(missing: counter, trace; unexpected: -\)/,
    );
  });
});
