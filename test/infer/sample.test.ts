// `sdtune sample` end to end: the library call with LoRAs and embeddings against the reference images, and the
// command line itself writing PNGs that carry A1111's parameters.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { writeEmbeddingA1111, writeEmbeddingDiffusers } from '../../src/adapters/embeddings.js';
import { sampleToFiles } from '../../src/infer/sample.js';
import { parseInfotext, readImageRgb, readPngText } from '../../src/io/png.js';
import { caseTensors, describeGolden, golden, goldenCase } from '../golden.js';
import { maxAbsDiff } from '../helpers.js';

const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/sdtune.js');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-sample-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const TINY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../checkpoints/tiny-sd-v1');

describe('embeddings at sample time (bundled tiny model)', () => {
  const vectors = (n: number, seed: number) => ({ shape: [n, 32] as [number, number], data: Float32Array.from({ length: n * 32 }, (_, i) => Math.sin(seed + i) * 0.02) });
  const sha12 = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex').slice(0, 12);

  it('names the embeddings the prompts use, warns about an unused one, and writes A1111 "TI hashes" of the used ones', async () => {
    const logo = path.join(tmp, 'my-logo.safetensors'); // A1111 form: the prompt word is the file name
    const neg = path.join(tmp, 'bad-hands.diffusers.safetensors'); // diffusers form: the token is its key
    const unused = path.join(tmp, 'unused.safetensors');
    await writeEmbeddingA1111(logo, { token: '<my-logo>', vectors: vectors(2, 1), path: logo, format: 'a1111' });
    await writeEmbeddingDiffusers(neg, { token: '<bad-hands>', vectors: vectors(1, 2), path: neg, format: 'diffusers' });
    await writeEmbeddingA1111(unused, { token: 'unused', vectors: vectors(1, 3), path: unused, format: 'a1111' });
    const lines: string[] = [];
    const out = path.join(tmp, 'ti-used.png');
    await sampleToFiles({
      model: TINY, prompt: 'a photo of my-logo, (my-logo:1.2)', negativePrompt: '<bad-hands>, blurry', seed: 1, steps: 1, cfg: 2, sampler: 'euler',
      width: 64, height: 64, embedding: [{ path: logo }, { path: neg }, { path: unused }], out, quiet: true, log: (l) => lines.push(l),
    });
    expect(lines).toEqual([
      'embeddings used: my-logo (2 vectors), <bad-hands> (1 vector)',
      expect.stringMatching(/^warning: embedding .*unused\.safetensors is loaded as "unused", but "unused" occurs in neither the prompt nor the negative prompt/),
    ]);
    const p = parseInfotext((await readPngText(out)).parameters);
    expect(p.tiHashes).toEqual({ 'my-logo': sha12(logo), '<bad-hands>': sha12(neg) });
    expect(p.raw['TI hashes']).toBe(`my-logo: ${sha12(logo)}, <bad-hands>: ${sha12(neg)}`);
    expect(p.prompt).toBe('a photo of my-logo, (my-logo:1.2)'); // the prompt as written, not the rewritten one

    // no embedding in the prompts: no "used" line, no TI hashes
    lines.length = 0;
    const none = path.join(tmp, 'ti-none.png');
    await sampleToFiles({ model: TINY, prompt: 'a star', seed: 1, steps: 1, cfg: 1, width: 64, height: 64, embedding: [{ path: logo }], out: none, quiet: true, log: (l) => lines.push(l) });
    expect(lines).toEqual([expect.stringMatching(/^warning: embedding .*my-logo\.safetensors is loaded as "my-logo"/)]);
    expect(parseInfotext((await readPngText(none)).parameters).tiHashes).toBeUndefined();
  });
});

const BASE = { model: '', prompt: 'a photo of an astronaut riding a horse', negativePrompt: 'blurry', seed: 0, steps: 10, cfg: 7.5, sampler: 'pndm', width: 64, height: 64, quiet: true };

describeGolden('sample with adapters vs diffusers', () => {
  for (const [label, scale, png] of [['1.0', 1, 'lora_kohya_scale1p0'], ['0.5', 0.5, 'lora_kohya_scale0p5']] as const) {
    for (const file of ['lora/tiny_lora_kohya.safetensors', 'lora/diffusers_format/pytorch_lora_weights.safetensors']) {
      it(`LoRA ${path.basename(file)} at ${label}: image and PNG`, async () => {
        const out = path.join(tmp, `lora-${label}-${path.basename(file)}.png`);
        await sampleToFiles({ ...BASE, model: golden('tiny-sd'), lora: [{ path: golden(file), weight: scale }], out });
        const ref = await readImageRgb(golden('cases', `${png}.png`));
        const ours = await readImageRgb(out);
        expect(maxAbsDiff(ours.data, ref.data)).toBeLessThanOrEqual(1);
        const text = parseInfotext((await readPngText(out)).parameters);
        expect(Object.values(text.loraHashes ?? {})).toEqual([expect.stringMatching(/^[0-9a-f]{12}$/)]);
      });
    }
  }

  for (const [kind, file, token] of [['a1111', 'textual_inversion/my-token-a1111.safetensors', '<my-token>'], ['diffusers', 'textual_inversion/my-token-diffusers.safetensors', undefined]] as const) {
    it(`textual inversion (${kind} file): image`, async () => {
      const c = goldenCase(`textual_inversion_${kind}`);
      const ref = await caseTensors(`textual_inversion_${kind}`);
      const out = path.join(tmp, `ti-${kind}.png`);
      await sampleToFiles({ ...BASE, model: golden('tiny-sd'), prompt: c.prompt as string, embedding: [{ path: golden(file), token }], out });
      const ours = await readImageRgb(out);
      const refPng = await readImageRgb(golden('cases', `ti_${kind}.png`));
      expect(maxAbsDiff(ours.data, refPng.data)).toBeLessThanOrEqual(1);
      // the float image within the case tolerance (8-bit rounding adds at most 0.5/255)
      const refImg = ref.get('image')!.data;
      expect(maxAbsDiff(Float32Array.from(ours.data, (v) => v / 255), refImg)).toBeLessThanOrEqual((c.tolerance as { atol_image: number }).atol_image + 0.5 / 255);
    });
  }

  it('the command line: one PNG equal to the reference, A1111 parameters, batch into a folder with NNNNN-SEED names', () => {
    const out = path.join(tmp, 'cli.png');
    const run = (...args: string[]) => spawnSync(process.execPath, [BIN, 'sample', '--model', golden('tiny-sd'), '--prompt', BASE.prompt, '--negative-prompt', 'blurry', '--width', '64', '--height', '64', ...args], { encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
    const r = run('--seed', '0', '--steps', '10', '--cfg', '7.5', '--sampler', 'Euler a', '--out', out);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/backend: wasm/);
    return (async () => {
      const ours = await readImageRgb(out);
      const ref = await readImageRgb(golden('cases', 'pipe_txt2img_euler_a.png'));
      expect(maxAbsDiff(ours.data, ref.data)).toBeLessThanOrEqual(1);
      const p = parseInfotext((await readPngText(out)).parameters);
      expect(p.prompt).toBe(BASE.prompt);
      expect(p.negativePrompt).toBe('blurry');
      expect(p.sampler).toBe('Euler a');
      expect(p.seed).toBe(0);
      expect(p.steps).toBe(10);
      expect([p.width, p.height]).toEqual([64, 64]);
      expect(p.raw['Model hash']).toMatch(/^[0-9a-f]{10}$/);
      const dir = path.join(tmp, 'batch');
      const b = run('--seed', '5', '--steps', '2', '--batch-size', '2', '--n-iter', '2', '--out', dir);
      expect(b.status, b.stderr).toBe(0);
      expect(readdirSync(dir).sort()).toEqual(['00000-5.png', '00001-6.png', '00002-7.png', '00003-8.png']);
      const bad = run('--sampler', 'heun', '--out', path.join(tmp, 'bad.png'));
      expect(bad.status).toBe(2);
      expect(bad.stderr).toMatch(/error: .*heun.*euler_a/s);
      const size = run('--width', '60', '--out', path.join(tmp, 'bad.png'));
      expect(size.stderr).toMatch(/multiple of 8/);
    })();
  });
});
