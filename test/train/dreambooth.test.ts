// DreamBooth on the bundled tiny model and datasets/logo: both batching schemes, class images generated, cached and
// counted through the method, bad input refused before any step, exact resume, exports that `sdtune sample` loads,
// and the bundled config from the command line.
import * as tf from '@tensorflow/tfjs';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listImages, prepareClassImages } from '../../src/data/class-images.js';
import { DataLoader } from '../../src/data/loader.js';
import { sampleToFiles } from '../../src/infer/sample.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { type ModelResolvedConfig, dumpConfig, loadConfigFile, resolveConfig } from '../../src/train/config.js';
import { loaderOptions } from '../../src/train/data-options.js';
import { train } from '../../src/train/loop.js';
import { getMethod } from '../../src/train/registry.js';
import { writeImage } from '../data/fixtures.js';
import { MODEL, ROOT } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-dreambooth-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const LOGO = path.join(ROOT, 'datasets/logo');
const CLASS = path.join(tmp, 'class'); // shared by the tests: 2 class images, generated once
const GEN = { 'dreambooth.class_images.steps': 2, 'dreambooth.class_images.batch_size': 2, 'dreambooth.class_images.cfg': 3 };

/** A dreambooth config at 64 px, batch 2, on datasets/logo ("a photo of sks logo" / "a photo of a logo"). */
function cfg(out: string, extra: Record<string, unknown> = {}) {
  return resolveConfig('dreambooth', null, {
    'model.path': MODEL,
    'data.dir': LOGO,
    'data.resolution': 64,
    'train.batch_size': 2,
    'train.seed': 7,
    'train.lr': 1e-3,
    'output.dir': out,
    'output.name': 'run',
    'dreambooth.instance_prompt': 'a photo of sks logo',
    'dreambooth.class_prompt': 'a photo of a logo',
    'dreambooth.class_data_dir': CLASS,
    'dreambooth.num_class_images': 2,
    'dreambooth.trains': 'lora',
    'dreambooth.lora.rank': 4,
    'dreambooth.lora.alpha': 4,
    ...GEN,
    ...extra,
  }) as ModelResolvedConfig;
}
const logged = () => {
  const lines: string[] = [];
  return { lines, log: (l: string) => void lines.push(l), quiet: true };
};
const tensors = async (file: string) => {
  const f = await SafetensorsFile.open(file);
  try {
    return await f.readAll();
  } finally {
    await f.close();
  }
};
const bytesOf = (t: { data: ArrayLike<number> }) => Buffer.from(new Float32Array(t.data as ArrayLike<number>).buffer);
const pixels = async (png: string) => sharp(png).raw().toBuffer();

describe('dreambooth config', () => {
  const YAML = 'model:\n  path: m\ndata:\n  dir: d\ndreambooth:\n  class_prompt: a photo of dog\n';
  it('defaults follow what trains; kohya/diffusers spellings point to the keys; the resolved config reads back the same', () => {
    const full = resolveConfig('dreambooth', YAML, {});
    expect(full.dreambooth).toMatchObject({ instance_prompt: null, with_prior_preservation: true, prior_loss_weight: 1, num_class_images: 100, batching: 'paired', trains: 'full', train_text_encoder: false });
    expect([full.train.lr, full.output.save_precision]).toEqual([5e-6, 'fp32']); // diffusers train_dreambooth.py
    const lora = resolveConfig('dreambooth', YAML, { 'dreambooth.trains': 'lora', 'dreambooth.class_images.sampler': 'Euler a' });
    expect([lora.train.lr, lora.output.save_precision, lora.dreambooth!.lora.rank]).toEqual([1e-4, 'fp16', 16]);
    expect(lora.dreambooth!.class_images.sampler).toBe('euler_a');
    expect(resolveConfig('dreambooth', dumpConfig(lora), {})).toEqual(lora);
    expect(() => resolveConfig('dreambooth', YAML, { 'dreambooth.trains': 'lora', 'output.save_as': 'both' })).toThrow(/output.save_as is for full fine-tunes/);
    const unknown = (key: string) => () => resolveConfig('dreambooth', `${YAML}${key}: 1\n`, {}, 'db.yaml');
    expect(unknown('instance_prompt')).toThrow('db.yaml:7: unknown key instance_prompt (did you mean dreambooth.instance_prompt?)');
    expect(unknown('train_text_encoder')).toThrow('(did you mean dreambooth.train_text_encoder?)');
    expect(unknown('reg_data_dir')).toThrow('(did you mean dreambooth.reg_data_dir?)');
    expect(unknown('sample_batch_size')).toThrow('(did you mean dreambooth.class_images.batch_size?)');
    expect(unknown('learning_rate_te')).toThrow('(did you mean dreambooth.text_encoder_lr?)');
    expect(() => resolveConfig('dreambooth', YAML, { 'dreambooth.class_images.sampler': 'nope' })).toThrow(/dreambooth.class_images.sampler: unknown sampler "nope"/);
  });
});

describe('dreambooth recipe: data and loss', () => {
  let model: LoadedModel;
  beforeAll(async () => {
    model = await loadModel(MODEL);
  });
  afterAll(() => disposeModel(model));

  it('paired (diffusers): each batch is the instance batch then as many class images; loss = mse(instance) + w x mse(class)', async () => {
    const c = cfg(path.join(tmp, 'paired'), { 'dreambooth.prior_loss_weight': 0.5, 'data.cache_latents': false });
    const { lines, ...ctx } = logged();
    const r = await getMethod('dreambooth').create(model, c, new TorchGenerator(7), { ...ctx, stopRequested: () => false });
    try {
      expect(lines).toContain(`class images: 0 found in ${CLASS}, generating 2 (prompt "a photo of a logo"), using 2`);
      expect(lines).toContain('prior preservation (paired, as diffusers): every batch = 2 instance + 2 class images (2 class images, prompt "a photo of a logo"); loss = mse(instance) + 0.5 x mse(class)');
      expect(r.items!.length).toBe(8); // the instance images only: the class images come from the recipe's own loader
      expect(r.items!.every((it) => it.caption === 'a photo of sks logo' && path.dirname(it.path) === LOGO)).toBe(true);
      const loader = new DataLoader(r.items!, loaderOptions(c, 1, undefined));
      const b = await r.nextBatch!(loader);
      expect(b.captions).toEqual(['a photo of sks logo', 'a photo of sks logo', 'a photo of a logo', 'a photo of a logo']);
      expect(b.items.slice(2).map((it) => path.dirname(it.path))).toEqual([CLASS, CLASS]);
      expect(b.pixels!.shape).toEqual([4, 64, 64, 3]);
      const perItem = tf.tensor1d([1, 2, 3, 4]);
      const loss = r.reduceLoss!(perItem, b);
      expect((await loss.data())[0]).toBeCloseTo((1 + 2) / 2 + 0.5 * ((3 + 4) / 2), 6);
      // the class loader's state is checkpointed: restored, it yields the same next class batch
      const saved = r.checkpoint!.json!();
      const next = await r.nextBatch!(loader);
      r.checkpoint!.restore({ json: saved, tensors: new Map() });
      const again = await r.nextBatch!(new DataLoader(r.items!, loaderOptions(c, 1, undefined)));
      expect(again.items.slice(2).map((it) => it.path)).toEqual(next.items.slice(2).map((it) => it.path));
      expect(Buffer.compare(Buffer.from(await again.pixels!.slice(2).data()), Buffer.from(await next.pixels!.slice(2).data()))).toBe(0);
      tf.dispose([perItem, loss, b.pixels!, next.pixels!, again.pixels!]);
    } finally {
      r.dispose();
    }
  });

  it('shuffled (kohya): class images are balanced into the data set, each weighted by prior_loss_weight', async () => {
    const c = cfg(path.join(tmp, 'shuffled'), { 'dreambooth.batching': 'shuffled', 'dreambooth.prior_loss_weight': 0.5 });
    const { lines, ...ctx } = logged();
    const r = await getMethod('dreambooth').create(model, c, new TorchGenerator(7), { ...ctx, stopRequested: () => false });
    try {
      expect(lines).toContain(`class images: 2 found in ${CLASS}, none to generate (prompt "a photo of a logo"), using 2`);
      expect(lines).toContain("prior preservation (shuffled, as kohya): 2 of 2 class images, 8 samples with repeats, mixed into the 8 instance samples; each class sample's loss x 0.5");
      const cls = r.items!.filter((it) => path.dirname(it.path) === CLASS);
      expect(cls.map((it) => [it.caption, it.repeats])).toEqual([['a photo of a logo', 4], ['a photo of a logo', 4]]); // kohya: repeats raised to match 8
      expect(r.nextBatch).toBeUndefined(); // the loop's one loader draws both
      const inst = r.items!.find((it) => path.dirname(it.path) === LOGO)!;
      const batch = { items: [inst, cls[0]!, inst, cls[1]!], captions: [], bucket: [64, 64] as [number, number], epoch: 0, position: 0 };
      const perItem = tf.tensor1d([1, 2, 3, 4]);
      const loss = r.reduceLoss!(perItem, batch);
      expect((await loss.data())[0]).toBeCloseTo((1 + 0.5 * 2 + 3 + 0.5 * 4) / 4, 6);
      tf.dispose([perItem, loss]);
    } finally {
      r.dispose();
    }
  });

  it('kohya reg_data_dir: <repeats>_<class> folders are the class images (captioned by the folder name), nothing generated', async () => {
    const reg = path.join(tmp, 'reg');
    await writeImage(path.join(reg, '3_logo', 'a.png'), 64, 64, 1);
    await writeImage(path.join(reg, '3_logo', 'b.png'), 64, 64, 2);
    const c = cfg(path.join(tmp, 'reg-run'), { 'dreambooth.class_data_dir': null, 'dreambooth.class_prompt': null, 'dreambooth.reg_data_dir': reg, 'dreambooth.batching': 'shuffled' });
    const { lines, ...ctx } = logged();
    const r = await getMethod('dreambooth').create(model, c, new TorchGenerator(7), { ...ctx, stopRequested: () => false });
    try {
      expect(lines).toContain(`class images: 2 found in ${reg} (kohya reg_data_dir: nothing generated), using 2`);
      const cls = r.items!.filter((it) => it.path.startsWith(reg));
      expect(cls.map((it) => [path.basename(it.path), it.caption, it.repeats])).toEqual([['a.png', 'logo', 4], ['b.png', 'logo', 4]]);
    } finally {
      r.dispose();
    }
  });
});

describe('dreambooth training runs', () => {
  it('class images through the method: a run stopped while generating resumes without duplicates; later runs reuse them and say so', async () => {
    const dir = path.join(tmp, 'class-stop');
    const extra = { 'dreambooth.class_data_dir': dir, 'dreambooth.num_class_images': 3, 'dreambooth.class_images.batch_size': 1, 'train.max_steps': 1 };
    let polls = 0;
    const a = logged();
    const first = await train('dreambooth', cfg(path.join(tmp, 'stop-run'), extra), { ...a, interrupt: () => polls++ > 0 });
    expect(first.stopped).toBe('interrupted');
    expect(first.steps).toBe(0);
    expect(a.lines).toContain('class images: stopped after 1 of 3; run again to generate the rest');
    expect((await listImages(dir)).map((f) => path.basename(f))).toEqual([expect.stringMatching(/^0-[0-9a-f]{40}\.png$/)]);
    const b = logged();
    const steps: number[] = [];
    // (the stopped run wrote its resolved config: the loop asks for --overwrite or --resume, as after any early stop)
    const second = await train('dreambooth', cfg(path.join(tmp, 'stop-run'), extra), { ...b, overwrite: true, onStep: (s) => steps.push(s) });
    expect(second.steps).toBe(1);
    expect(b.lines).toContain(`class images: 1 found in ${dir}, generating 2 (prompt "a photo of a logo"), using 3`);
    // the same set an uninterrupted generation makes: indices 0, 1, 2 with the same content
    const whole = path.join(tmp, 'class-whole');
    const m = await loadModel(MODEL);
    try {
      await prepareClassImages(m, { dir: whole, prompt: 'a photo of a logo', count: 3, batchSize: 1, steps: 2, cfg: 3, seed: 0, width: 64, height: 64, quiet: true, log: () => {} });
    } finally {
      disposeModel(m);
    }
    expect((await listImages(dir)).map((f) => path.basename(f))).toEqual((await listImages(whole)).map((f) => path.basename(f)));
    const c = logged();
    await train('dreambooth', cfg(path.join(tmp, 'stop-run'), extra), { ...c, overwrite: true });
    expect(c.lines).toContain(`class images: 3 found in ${dir}, none to generate (prompt "a photo of a logo"), using 3`);
    expect(c.lines.some((l) => l.startsWith('prior preservation (paired, as diffusers): every batch = 2 instance + 2 class images (3 class images'))).toBe(true);
  });

  it('shuffled batching trains through the loop: the class images count in the steps (kohya), with buckets allowed', async () => {
    const a = logged();
    const r = await train('dreambooth', cfg(path.join(tmp, 'shuffled-run'), { 'dreambooth.batching': 'shuffled', 'train.max_steps': 2, 'data.buckets.enabled': true, 'data.buckets.min_side': 64, 'data.buckets.max_side': 128 }), a);
    expect(r.steps).toBe(2);
    expect(r.losses.every(Number.isFinite)).toBe(true);
    expect(a.lines).toContain('steps: 10 images x repeats = 16 samples / batch 2 = 8 batches = 8 steps per epoch; max_steps decides: 2 steps (1 epochs)');
  });

  it('bad input is refused before any step (and before any class image is generated)', async () => {
    const steps: number[] = [];
    const o = { quiet: true, log: () => {}, onStep: (s: number) => steps.push(s) };
    // no instance images
    const empty = path.join(tmp, 'empty');
    mkdirSync(empty, { recursive: true });
    const fresh = path.join(tmp, 'never-made');
    await expect(train('dreambooth', cfg(path.join(tmp, 'bad1'), { 'data.dir': empty, 'dreambooth.class_data_dir': fresh }), o)).rejects.toThrow(
      /^dreambooth instance images \(data\.dir\): no usable training images: looked for .* none found$/,
    );
    expect(existsSync(fresh)).toBe(false);
    // instance images without captions and no instance prompt
    await expect(train('dreambooth', cfg(path.join(tmp, 'bad2'), { 'dreambooth.instance_prompt': null, 'dreambooth.class_data_dir': fresh }), o)).rejects.toThrow(
      `dreambooth.instance_prompt is not set and 8 of 8 instance images have no caption (e.g. ${path.join(LOGO, 'logo_00.png')}): set dreambooth.instance_prompt or give each image a caption file`,
    );
    // prior preservation without a class prompt (the config says so)
    expect(() => cfg(path.join(tmp, 'bad3'), { 'dreambooth.class_prompt': null })).toThrow(/^override dreambooth\.class_prompt: dreambooth\.class_prompt is required with dreambooth\.with_prior_preservation \(e\.g\. "a photo of dog"/);
    expect(() => cfg(path.join(tmp, 'bad3'), { 'dreambooth.with_prior_preservation': false })).toThrow('dreambooth.class_prompt is set but dreambooth.with_prior_preservation is false (no class images are used)');
    expect(() => cfg(path.join(tmp, 'bad3'), { 'data.buckets.enabled': true, 'data.buckets.min_side': 64 })).toThrow(/batching paired puts instance and class images in one batch/);
    expect(() => cfg(path.join(tmp, 'bad3'), { 'dreambooth.stop_text_encoder_training': 5 })).toThrow('dreambooth.stop_text_encoder_training is set but dreambooth.train_text_encoder is false (the text encoder is not trained)');
    // a class folder that cannot be created
    const file = path.join(tmp, 'a-file');
    writeFileSync(file, 'x');
    await expect(train('dreambooth', cfg(path.join(tmp, 'bad4'), { 'dreambooth.class_data_dir': path.join(file, 'class') }), o)).rejects.toThrow(/cannot (create|read) the class image folder .*a-file\/class: (ENOTDIR|EEXIST)/);
    // class images smaller than the training size (generated ones, and a kohya reg_data_dir's)
    const small = path.join(tmp, 'small');
    await writeImage(path.join(small, 'tiny.png'), 32, 32);
    await expect(train('dreambooth', cfg(path.join(tmp, 'bad5'), { 'dreambooth.class_data_dir': small }), o)).rejects.toThrow(
      `class image ${path.join(small, 'tiny.png')} is 32x32, smaller than the training size 64x64: it would be upscaled`,
    );
    const reg = path.join(tmp, 'small-reg');
    await writeImage(path.join(reg, '1_logo', 'tiny.png'), 48, 64);
    await expect(train('dreambooth', cfg(path.join(tmp, 'bad6'), { 'dreambooth.class_data_dir': null, 'dreambooth.reg_data_dir': reg }), o)).rejects.toThrow(
      `class image ${path.join(reg, '1_logo', 'tiny.png')} is 48x64, smaller than the training size 64x64`,
    );
    expect(steps).toEqual([]);
    for (const d of ['bad1', 'bad2', 'bad4', 'bad5', 'bad6']) expect(existsSync(path.join(tmp, d, 'checkpoints'))).toBe(false);
  });

  it('resume is exact (the class loader and the text-encoder stop included); stop_text_encoder_training freezes the text encoder', async () => {
    const extra = { 'dreambooth.train_text_encoder': true, 'dreambooth.stop_text_encoder_training': 1, 'output.save_precision': 'fp32', 'data.cache_latents': false };
    const q = { quiet: true, log: () => {} };
    const straight = path.join(tmp, 'straight');
    const resumed = path.join(tmp, 'resumed');
    const one = path.join(tmp, 'one');
    const counts: number[] = []; // no cache here: a leak-free step keeps the tensor count constant
    await train('dreambooth', cfg(straight, { ...extra, 'train.max_steps': 3 }), { ...q, onStep: () => counts.push(tf.memory().numTensors) });
    expect(counts.length).toBe(3);
    expect(new Set(counts).size).toBe(1);
    await train('dreambooth', cfg(resumed, { ...extra, 'train.max_steps': 2 }), q);
    await train('dreambooth', cfg(resumed, { ...extra, 'train.max_steps': 3 }), { ...q, resume: resumed });
    await train('dreambooth', cfg(one, { ...extra, 'train.max_steps': 1 }), q);
    const [a, b, p] = await Promise.all([straight, resumed, one].map((d) => tensors(path.join(d, 'run.safetensors'))));
    expect([...a.keys()].sort()).toEqual([...b.keys()].sort());
    let te = 0;
    let unetMoved = 0;
    for (const [k, t] of a) {
      expect(Buffer.compare(bytesOf(t), bytesOf(b.get(k)!)), k).toBe(0); // 2 steps + resume 1 == 3 steps
      const sameAsOne = Buffer.compare(bytesOf(t), bytesOf(p.get(k)!)) === 0;
      if (k.startsWith('lora_te_')) {
        te++;
        expect(sameAsOne, k).toBe(true); // trained for 1 step, then frozen
      } else if (k.includes('lora_up') && !sameAsOne) unetMoved++;
    }
    expect(te).toBeGreaterThan(0);
    expect(unetMoved).toBeGreaterThan(0);
  });

  it('exports load in `sdtune sample`: full -> diffusers folder and single file (the same weights), lora -> kohya LoRA with --lora', async () => {
    const q = { quiet: true, log: () => {} };
    const full = path.join(tmp, 'full');
    const lora = path.join(tmp, 'lora');
    const r = await train('dreambooth', cfg(full, { 'dreambooth.trains': 'full', 'train.max_steps': 2, 'train.lr': 1e-3, 'output.save_as': 'both' }), q);
    expect(r.files).toEqual([path.join(full, 'run'), path.join(full, 'run.safetensors')]);
    // (both latent caches, the class loader's included, are freed with the run)
    const before = tf.memory().numTensors;
    const l = await train('dreambooth', cfg(lora, { 'train.max_steps': 3, 'train.lr': 1e-2 }), q);
    expect(tf.memory().numTensors).toBe(before);
    expect(l.files).toEqual([path.join(lora, 'run.safetensors')]);
    const sf = await SafetensorsFile.open(l.files[0]!);
    const meta = sf.metadata;
    await sf.close();
    expect(meta).toMatchObject({ ss_network_dim: '4', ss_prior_loss_weight: '1', ss_num_reg_images: '2', ss_steps: '3' });
    const s = { prompt: 'a photo of sks logo', steps: 2, width: 64, height: 64, seed: 3, quiet: true, log: () => {} };
    const png = (n: string) => path.join(tmp, 'samples', `${n}.png`);
    await sampleToFiles({ ...s, model: MODEL, out: png('base') });
    await sampleToFiles({ ...s, model: path.join(full, 'run'), out: png('folder') });
    await sampleToFiles({ ...s, model: path.join(full, 'run.safetensors'), out: png('single') });
    await sampleToFiles({ ...s, model: MODEL, lora: [{ path: l.files[0]!, weight: 1 }], out: png('lora') });
    const [base, folder, single, withLora] = await Promise.all(['base', 'folder', 'single', 'lora'].map((n) => pixels(png(n))));
    expect(folder.equals(single)).toBe(true);
    expect(folder.equals(base)).toBe(false);
    expect(withLora.equals(base)).toBe(false);
  });
});

describe('sdtune dreambooth (command line)', () => {
  const sdtune = (...args: string[]) => spawnSync(process.execPath, [path.join(ROOT, 'bin/sdtune.js'), ...args], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });

  it('--help lists its flags; the bundled configs/dreambooth.yaml trains and its LoRA samples', async () => {
    const h = sdtune('dreambooth', '--help');
    expect(h.status).toBe(0);
    for (const f of ['--instance-prompt', '--class-prompt', '--class-data-dir', '--num-class-images', '--prior-loss-weight', '--with-prior-preservation', '--batching', '--trains', '--train-text-encoder', '--stop-text-encoder-training', '--reg-data-dir']) {
      expect(h.stdout).toContain(f);
    }
    const c = await loadConfigFile('dreambooth', path.join(ROOT, 'configs/dreambooth.yaml'), {});
    expect(c.dreambooth).toMatchObject({ instance_prompt: 'a sks star', class_prompt: 'a star', num_class_images: 32, batching: 'paired', trains: 'lora' });
    expect(c.model.path).toBe('checkpoints/toy-sd');
    const out = path.join(tmp, 'cli');
    const r = sdtune('dreambooth', '--config', 'configs/dreambooth.yaml', '--output', out, '--max-steps', '2', '--set', 'dreambooth.num_class_images=4', '--set', 'dreambooth.class_images.steps=2', '--set', 'output.eval_every=null', '--set', 'output.eval_prompts=[]');
    expect(r.stderr).toContain(`class images: 0 found in ${path.join(out, 'class_images')}, generating 4 (prompt "a star"), using 4`);
    expect(r.stderr).toContain('prior preservation (paired, as diffusers): every batch = 4 instance + 4 class images');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim().split('\n')).toEqual([path.join(out, 'dreambooth.safetensors')]);
    expect(readdirSync(path.join(out, 'class_images'))).toHaveLength(4);
    const png = path.join(tmp, 'cli-sample.png');
    const s = sdtune('sample', '--model', 'checkpoints/toy-sd', '--lora', path.join(out, 'dreambooth.safetensors'), '--prompt', 'a sks star', '--steps', '2', '--seed', '1', '--out', png);
    expect(s.stderr).not.toMatch(/error/);
    expect(s.status).toBe(0);
    expect(existsSync(png)).toBe(true);
  });
});
