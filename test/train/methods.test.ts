// The method registry: a method defined here, in the test (its recipe, its config section and its rules), trains
// through resolveConfig + train with no change to the loop or the config; unknown methods list the registered ones.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { SdtuneError } from '../../src/errors.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { makeTrainable } from '../../src/models/params.js';
import { resolveConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { type MethodEntry, getMethod, methodNames, registerMethod, unregisterMethod } from '../../src/train/registry.js';
import { encodeWithTextEncoder } from '../../src/train/recipe.js';
import { int, num } from '../../src/train/schema.js';
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
  create(model, c) {
    const s = c.bias_only!;
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
  },
};

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
      resolveConfig('dreambooth', null, {});
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(SdtuneError);
    expect((e as SdtuneError).kind).toBe('usage');
    expect((e as SdtuneError).message).toBe('unknown training method "dreambooth"; registered: lora, textual_inversion, finetune, bias_only');
    expect(() => getMethod('nope')).toThrow(/registered: lora, textual_inversion, finetune/);
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
    expect(resolveConfig('bias_only', null, { ...base(path.join(tmp, 'cfg')), scale: '3' }).bias_only).toEqual({ scale: 3, repeat: 1 });
    // its section belongs to it alone
    expect(() => resolveConfig('lora', 'bias_only:\n  scale: 2\n', base(path.join(tmp, 'cfg')))).toThrow(/has a bias_only section, but this command trains lora/);
    expect(() => resolveConfig('bias_only', 'lora:\n  rank: 2\n', base(path.join(tmp, 'cfg')))).toThrow(/has a lora section, but this command trains bias_only/);
    expect(methodNames()).toEqual(['lora', 'textual_inversion', 'finetune', 'bias_only']);
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
