import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { sampleToFiles } from '../../src/infer/sample.js';
import { openCheckpoint } from '../../src/io/checkpoint.js';
import { convertCheckpoint } from '../../src/io/convert.js';
import { disposeModel, inspectModel, loadModel } from '../../src/io/model.js';
import { readImageRgb } from '../../src/io/png.js';
import { SafetensorsFile, writeSafetensors, type WritableTensor } from '../../src/io/safetensors.js';
import { ClipTokenizer } from '../../src/tokenizer/clip.js';
import { STRUCTURAL_FIELDS } from '../../src/models/presets.js';
import { describeGolden, golden } from '../golden.js';

const COMPONENT_FILES = { unet: 'unet/diffusion_pytorch_model.safetensors', vae: 'vae/diffusion_pytorch_model.safetensors', text_encoder: 'text_encoder/model.safetensors' };
const sameBits = (a: Float32Array | Int32Array, b: Float32Array | Int32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

/** Every tensor of `a` equals the one of `b` with the same key (same key set, dtype, shape, bits). */
async function expectSameTensors(a: string, b: string, opts: { dtype?: boolean } = {}) {
  const [fa, fb] = [await SafetensorsFile.open(a), await SafetensorsFile.open(b)];
  try {
    expect(new Set(fa.keys())).toEqual(new Set(fb.keys()));
    for (const k of fa.keys()) {
      const [x, y] = [await fa.read(k), await fb.read(k)];
      expect(x.shape, k).toEqual(y.shape);
      if (opts.dtype !== false) expect(x.dtype, k).toBe(y.dtype);
      expect(sameBits(x.data, y.data), k).toBe(true);
    }
  } finally {
    await fa.close();
    await fb.close();
  }
}
const readJson = async (p: string) => JSON.parse(await readFile(p, 'utf8'));

let tmp: string;
beforeAll(async () => void (tmp = await mkdtemp(path.join(tmpdir(), 'sdtune-convert-'))));
afterAll(async () => rm(tmp, { recursive: true, force: true }));

const TINY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../checkpoints/tiny-sd-v1');
const TOKENIZER_FILES = ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json'];

describe('convert keeps the tokenizer (bundled tiny model)', () => {
  const sample = (model: string, out: string) =>
    sampleToFiles({ model, prompt: 'a red star', negativePrompt: 'blurry', seed: 3, steps: 2, cfg: 2, sampler: 'euler', width: 64, height: 64, out, quiet: true, log: () => {} });

  it('folder -> single file -> folder: the tokenizer travels in the metadata and both outputs sample like the source', async () => {
    const single = path.join(tmp, 'tiny1.safetensors');
    const back = path.join(tmp, 'tiny1-back');
    const r1 = await convertCheckpoint(TINY, single);
    expect(r1).toMatchObject({ tokenizer: path.join(TINY, 'tokenizer'), notes: [] });
    const f = await SafetensorsFile.open(single);
    const md = f.metadata;
    await f.close();
    // exactly the tokenizer files, verbatim, as plain string values
    expect(Object.keys(md).filter((k) => k.startsWith('sdtune_tokenizer/')).sort()).toEqual(TOKENIZER_FILES.map((n) => `sdtune_tokenizer/${n}`));
    for (const n of TOKENIZER_FILES) expect(md[`sdtune_tokenizer/${n}`]).toBe(await readFile(path.join(TINY, 'tokenizer', n), 'utf8'));
    const r2 = await convertCheckpoint(single, back);
    expect(r2.tokenizer).toBe(`embedded in ${single}`);
    expect((await readdir(path.join(back, 'tokenizer'))).sort()).toEqual(TOKENIZER_FILES);
    for (const n of TOKENIZER_FILES) expect(await readFile(path.join(back, 'tokenizer', n))).toEqual(await readFile(path.join(TINY, 'tokenizer', n)));

    const ref = await sample(TINY, path.join(tmp, 'ref.png'));
    for (const [m, png] of [[single, 'single.png'], [back, 'back.png']]) {
      const r = await sample(m, path.join(tmp, png));
      expect(r.files).toEqual([path.join(tmp, png)]);
      expect((await readImageRgb(r.files[0])).data).toEqual((await readImageRgb(ref.files[0])).data);
    }
  });

  it('a single file alone in a folder loads its embedded tokenizer (same ids as the folder tokenizer), with a note', async () => {
    const single = path.join(tmp, 'tiny2.safetensors');
    await convertCheckpoint(TINY, single);
    const alone = path.join(tmp, 'alone');
    await mkdir(alone);
    await copyFile(single, path.join(alone, 'model.safetensors'));
    const m = await loadModel(path.join(alone, 'model.safetensors'), { components: ['text_encoder'] });
    try {
      const ref = await ClipTokenizer.fromDir(path.join(TINY, 'tokenizer'));
      const text = 'a photo of an astronaut riding a horse';
      expect(Array.from(m.tokenizer!.encode(text).inputIds)).toEqual(Array.from(ref.encode(text).inputIds));
      expect([m.tokenizer!.bosTokenId, m.tokenizer!.eosTokenId]).toEqual([5698, 5699]); // from the embedded tokenizer_config.json
      expect(m.notes).toContain('tokenizer: the one embedded in the file');
    } finally {
      disposeModel(m);
    }
    expect((await inspectModel(path.join(alone, 'model.safetensors'))).tokenizer).toBe(`embedded in ${path.join(alone, 'model.safetensors')}`);
  });

  it('a single file without metadata or tokenizer nearby: the error names the file and --tokenizer DIR; a folder named like it is found', async () => {
    const single = path.join(tmp, 'tiny3.safetensors');
    await convertCheckpoint(TINY, single);
    // a foreign file: the same tensors, no __metadata__ (as other tools write it); configs from a folder without tokenizer/
    const dir = path.join(tmp, 'foreign');
    const configs = path.join(tmp, 'foreign-configs');
    for (const c of ['unet', 'vae', 'text_encoder']) {
      await mkdir(path.join(configs, c), { recursive: true });
      await copyFile(path.join(TINY, c, 'config.json'), path.join(configs, c, 'config.json'));
    }
    await mkdir(dir);
    const src = await SafetensorsFile.open(single);
    const tensors = new Map<string, WritableTensor>();
    for (const k of src.keys()) {
      const t = await src.read(k);
      tensors.set(k, { shape: t.shape, data: t.data, dtype: t.dtype });
    }
    await src.close();
    const foreign = path.join(dir, 'foreign.safetensors');
    await writeSafetensors(foreign, tensors);
    const err = await loadModel(foreign, { configDir: configs, components: ['text_encoder'] }).catch((e) => e);
    expect(err).toBeInstanceOf(SdtuneError);
    expect(err.kind).toBe('usage');
    expect(err.message).toMatch(new RegExp(`^${foreign.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: no tokenizer found .*pass --tokenizer DIR`));
    // convert says the output has no tokenizer
    const r = await convertCheckpoint(foreign, path.join(tmp, 'foreign-back'), { configDir: configs });
    expect(r.tokenizer).toBeNull();
    expect(r.notes).toEqual([expect.stringMatching(/no tokenizer found .* --tokenizer DIR/)]);
    // a diffusers folder named like the file, beside it, provides the tokenizer
    await mkdir(path.join(dir, 'foreign'));
    await cpDir(path.join(TINY, 'tokenizer'), path.join(dir, 'foreign', 'tokenizer'));
    const m = await loadModel(foreign, { configDir: configs, components: ['text_encoder'] });
    expect(m.tokenizer!.bosTokenId).toBe(5698);
    disposeModel(m);
  });
});

async function cpDir(from: string, to: string) {
  await mkdir(to, { recursive: true });
  for (const n of await readdir(from)) await copyFile(path.join(from, n), path.join(to, n));
}

describeGolden('convert (golden tiny-sd)', () => {
  it('diffusers -> single-file: the converter key set, bit-identical to tiny-sd.safetensors, configs in the metadata', async () => {
    const out = path.join(tmp, 'a.safetensors');
    const progress: number[] = [];
    const r = await convertCheckpoint(golden('tiny-sd'), out, { onProgress: (d, t) => progress.push(d / t) });
    expect(r).toMatchObject({ layout: 'single-file', tensors: 980 });
    expect(progress).toHaveLength(980);
    expect(progress.at(-1)).toBe(1);
    await expectSameTensors(out, golden('tiny-sd.safetensors'));
    const f = await SafetensorsFile.open(out);
    const configs = JSON.parse(f.metadata.sdtune_configs);
    await f.close();
    expect(Object.keys(configs).sort()).toEqual(['scheduler', 'text_encoder', 'unet', 'vae']);
    expect(configs.unet).toEqual(await readJson(golden('tiny-sd', 'unet', 'config.json')));

    // ... and our loader restores the exact configs without --config (heads included)
    const s = await openCheckpoint(out);
    expect(s.components.text_encoder!.config).toEqual(await readJson(golden('tiny-sd', 'text_encoder', 'config.json')));
    expect(s.schedulerConfig).toEqual(await readJson(golden('tiny-sd', 'scheduler', 'scheduler_config.json')));
    await s.close();
  });

  it('single-file -> diffusers: bit-identical to the folder, configs equal, tokenizer copied', async () => {
    const single = path.join(tmp, 'b.safetensors');
    await convertCheckpoint(golden('tiny-sd'), single);
    const out = path.join(tmp, 'b-diffusers');
    const r = await convertCheckpoint(single, out, { tokenizerDir: golden('tiny-sd', 'tokenizer') });
    expect(r).toMatchObject({ layout: 'diffusers', tensors: 980 });
    for (const f of Object.values(COMPONENT_FILES)) await expectSameTensors(path.join(out, f), golden('tiny-sd', f));
    for (const c of ['unet', 'vae', 'text_encoder']) expect(await readJson(path.join(out, c, 'config.json'))).toEqual(await readJson(golden('tiny-sd', c, 'config.json')));
    expect((await readJson(path.join(out, 'model_index.json')))._class_name).toBe('StableDiffusionPipeline');
    expect(await readJson(path.join(out, 'scheduler', 'scheduler_config.json'))).toEqual(await readJson(golden('tiny-sd', 'scheduler', 'scheduler_config.json')));
    expect((await readdir(path.join(out, 'tokenizer'))).sort()).toEqual((await readdir(golden('tiny-sd', 'tokenizer'))).sort());
    expect(await readFile(path.join(out, 'tokenizer', 'merges.txt'))).toEqual(await readFile(golden('tiny-sd', 'tokenizer', 'merges.txt')));
    expect((await readdir(tmp)).filter((n) => n.startsWith('.'))).toEqual([]); // no temp folders left behind
  });

  it('the golden single file (diffusers converter output) -> diffusers with --config: bit-identical to the folder', async () => {
    const out = path.join(tmp, 'c-diffusers');
    await convertCheckpoint(golden('tiny-sd.safetensors'), out, { configDir: golden('tiny-sd') });
    for (const f of Object.values(COMPONENT_FILES)) await expectSameTensors(path.join(out, f), golden('tiny-sd', f));
    const s = await openCheckpoint(out);
    const d = await openCheckpoint(golden('tiny-sd'));
    for (const c of ['unet', 'vae', 'text_encoder'] as const)
      for (const field of STRUCTURAL_FIELDS[c]) expect(s.components[c]!.config[field]).toEqual(d.components[c]!.config[field]);
    expect(s.tokenizerDir).toBe(path.join(out, 'tokenizer'));
    await s.close();
    await d.close();
  });

  it('--half writes F16 equal to the golden fp16 single file, and an F16 diffusers folder', async () => {
    const out = path.join(tmp, 'half.safetensors');
    await convertCheckpoint(golden('tiny-sd'), out, { half: true, to: 'single-file' });
    await expectSameTensors(out, golden('tiny-sd-fp16.safetensors'));
    const dir = path.join(tmp, 'half-diffusers');
    await convertCheckpoint(golden('tiny-sd'), dir, { half: true, to: 'diffusers' });
    const s = await openCheckpoint(dir);
    expect(s.dtype).toBe('float16');
    expect(s.components.text_encoder!.config.dtype).toBe('float16');
    await s.close();
  });

  it('an inpainting UNet alone converts to a single file and back', async () => {
    const single = path.join(tmp, 'inpaint.safetensors');
    const r = await convertCheckpoint(golden('tiny-sd-inpaint'), single);
    expect(r.tensors).toBe(684);
    const s = await openCheckpoint(single);
    expect(s).toMatchObject({ variant: 'inpaint', layout: 'single-file' });
    await s.close();
    const back = path.join(tmp, 'inpaint-diffusers');
    await convertCheckpoint(single, back);
    await expectSameTensors(path.join(back, COMPONENT_FILES.unet), golden('tiny-sd-inpaint', COMPONENT_FILES.unet));
    expect((await readJson(path.join(back, 'model_index.json')))._class_name).toBe('StableDiffusionInpaintPipeline');
  });

  it('refuses to overwrite a non-empty output and checks the output kind', async () => {
    const dir = path.join(tmp, 'occupied');
    await mkdir(dir);
    await writeFile(path.join(dir, 'keep.txt'), 'x');
    const err = await convertCheckpoint(golden('tiny-sd.safetensors'), dir, { configDir: golden('tiny-sd') }).catch((e) => e);
    expect(err).toBeInstanceOf(SdtuneError);
    expect(err.kind).toBe('usage');
    expect(err.message).toMatch(/not empty; refusing to overwrite/);
    expect(await readdir(dir)).toEqual(['keep.txt']);
    const file = path.join(tmp, 'occupied.safetensors');
    await writeFile(file, 'x');
    await expect(convertCheckpoint(golden('tiny-sd'), file)).rejects.toMatchObject({ kind: 'usage' });
    await expect(convertCheckpoint(golden('tiny-sd'), path.join(tmp, 'folder'), { to: 'single-file' })).rejects.toThrow(/must be a \.safetensors path/);
    const empty = path.join(tmp, 'empty');
    await mkdir(empty);
    await convertCheckpoint(golden('tiny-sd.safetensors'), empty, { configDir: golden('tiny-sd') }); // an empty folder is fine
    expect((await readdir(empty)).sort()).toEqual(['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']);
  });
});
