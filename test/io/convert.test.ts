import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { openCheckpoint } from '../../src/io/checkpoint.js';
import { convertCheckpoint } from '../../src/io/convert.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
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
