// The toy model builder (random weights, toyworld.md's sizes, the toy vocabulary) and `sdtune eval` on it: the
// machinery (prompts x seeds through the pipeline, judges, table, JSON, contact sheet) and its refusals. A random
// model draws noise, so accuracy is not asserted; the counts and that each verdict is the judges' on the image are.
import { spawnSync } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TOY_WORDS } from '../../src/data/toy-world.js';
import { buildToyModel, makeToyModel } from '../../src/data/toy-model.js';
import { ClipTokenizer } from '../../src/tokenizer/clip.js';
import { assertToyModel, evalPrompts, evaluateModel, formatEvalTable } from '../../src/eval/evaluate.js';
import { judgeToyImage } from '../../src/eval/judges.js';
import { generate, toUint8 } from '../../src/infer/pipeline.js';
import { disposeModel, inspectModel, loadModel, type LoadedModel } from '../../src/io/model.js';
import { readImageRgb } from '../../src/io/png.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TINY = path.join(ROOT, 'checkpoints/tiny-sd-v1');
const BIN = path.join(ROOT, 'bin/sdtune.js');
let tmp: string;
let modelDir: string;
let built: Awaited<ReturnType<typeof makeToyModel>>;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(tmpdir(), 'sdtune-eval-'));
  modelDir = path.join(tmp, 'toy-sd');
  built = await makeToyModel(modelDir);
});
afterAll(() => rm(tmp, { recursive: true, force: true }));

describe('toy model builder', () => {
  it("writes a diffusers folder with toyworld.md's sizes, parameter counts and the toy vocabulary (max length 12)", async () => {
    // toyworld.md: VAE 0.95 M, text encoder 0.11 M, UNet 1.49 M, total 2.55 M
    expect(built.params).toEqual({ vae: 954_567, text_encoder: 104_768, unet: 1_489_028 });
    const r = await inspectModel(modelDir);
    expect(r.layout).toBe('diffusers');
    expect(r.components.unet!.config).toMatchObject({ block_out_channels: [32, 64, 64], layers_per_block: 1, attention_head_dim: 4, cross_attention_dim: 64, sample_size: 8 });
    expect(r.components.vae!.config).toMatchObject({ block_out_channels: [32, 64, 64], layers_per_block: 1, norm_num_groups: 8, latent_channels: 4 });
    expect(r.components.text_encoder!.config).toMatchObject({ hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, max_position_embeddings: 12, vocab_size: 577 });
    const m = await loadModel(modelDir);
    try {
      expect(m.tokenizer!.maxLength).toBe(12);
      for (const w of TOY_WORDS) expect(m.tokenizer!.tokenize(w)).toHaveLength(1);
      assertToyModel(m); // passes
      const g = await generate(m, { prompt: 'a large purple heart on the right', steps: 2, seed: 3, sampler: 'ddim', cfg: 3 });
      expect([g.images[0]!.width, g.images[0]!.height]).toEqual([32, 32]); // 8x8 latents, 4 pixels per latent
    } finally {
      disposeModel(m);
    }
    await expect(makeToyModel(modelDir)).rejects.toThrow(/exists|not empty/);
  });

  it("a tokenizer without model_max_length takes the text encoder's 12 positions; a longer window is refused", async () => {
    const bare = path.join(tmp, 'bare-tokenizer');
    await mkdir(bare);
    for (const f of ['vocab.json', 'merges.txt']) await copyFile(path.join(modelDir, 'tokenizer', f), path.join(bare, f));
    const m = await loadModel(modelDir, { tokenizerDir: bare, components: ['text_encoder'] });
    expect(m.tokenizer!.maxLength).toBe(12);
    disposeModel(m);
    await expect(loadModel(modelDir, { tokenizerDir: path.join(TINY, 'tokenizer'), components: ['text_encoder'] })).rejects.toThrow(
      /the tokenizer's model_max_length is 77 but the text encoder has 12 positions/,
    );
  });
});

describe('evaluateModel', () => {
  it('samples 2 prompts x 2 seeds, judges each image, reports counts, and writes eval.json and the contact sheet', async () => {
    const out = path.join(tmp, 'eval');
    const before = tf.memory().numTensors;
    const { report, images } = await evaluateModel({ model: modelDir, prompts: ['a red circle', 'a sks => green star'], seeds: 2, seed: 5, steps: 2, cfg: 3, out, quiet: true });
    expect(tf.memory().numTensors).toBe(before); // the model was loaded and disposed, nothing leaked
    expect(report.seeds).toEqual([5, 6]);
    expect(report).toMatchObject({ sampler: 'DDIM', steps: 2, cfg: 3 });
    expect(report.prompts.map((p) => [p.prompt, p.expected, p.total])).toEqual([
      ['a red circle', { colour: 'red', shape: 'circle' }, 2],
      ['a sks', { colour: 'green', shape: 'star' }, 2],
    ]);
    expect(report.overall.total).toBe(4);
    // each verdict is what the judges say about the returned image, and the counts follow from the verdicts
    report.prompts.forEach((p, i) => {
      p.samples.forEach((s, k) => {
        const v = judgeToyImage({ data: images[i]![k]!, width: 32, height: 32 });
        expect([s.colour, s.shape]).toEqual([v.colour.colour, v.shape.shape]);
        expect(s.correct).toBe(s.colour === p.expected.colour && s.shape === p.expected.shape);
      });
      expect(p.correct).toBe(p.samples.filter((s) => s.correct).length);
      expect(p.colourCorrect).toBe(p.samples.filter((s) => s.colour === p.expected.colour).length);
      expect(p.accuracy).toBe(p.correct / 2);
    });
    expect(report.overall.correct).toBe(report.prompts[0]!.correct + report.prompts[1]!.correct);
    // the images are the pipeline's: seed 6 sampled alone gives image [1][1]
    const m: LoadedModel = await loadModel(modelDir);
    try {
      const alone = await generate(m, { prompt: 'a sks', steps: 2, cfg: 3, seed: 6, sampler: 'ddim' });
      expect(Buffer.from(toUint8(alone.images[0]!)).equals(Buffer.from(images[1]![1]!))).toBe(true);
    } finally {
      disposeModel(m);
    }
    // eval.json is the report; the contact sheet is rows = prompts, cols = seeds, each image 2x in a 2 px frame
    expect(JSON.parse(await readFile(path.join(out, 'eval.json'), 'utf8'))).toEqual(JSON.parse(JSON.stringify(report)));
    const sheet = await readImageRgb(path.join(out, 'contact-sheet.png'));
    const cell = 64 + 4;
    expect([sheet.width, sheet.height]).toEqual([2 * cell + 3 * 2, 2 * cell + 3 * 2]);
    const at = (x: number, y: number) => Array.from(sheet.data.subarray((y * sheet.width + x) * 3, (y * sheet.width + x) * 3 + 3));
    const x0 = 2 + (cell + 2) + 2, y0 = 2 + (cell + 2) + 2; // image [1][1]: gap, first cell, gap, frame
    for (const [i, j] of [[0, 0], [10, 7], [31, 31]]) {
      expect(at(x0 + 2 * j, y0 + 2 * i)).toEqual(Array.from(images[1]![1]!.subarray((i * 32 + j) * 3, (i * 32 + j) * 3 + 3)));
    }
    expect(at(x0 - 1, y0 - 1)).toEqual(report.prompts[1]!.samples[1]!.correct ? [40, 170, 60] : [210, 40, 40]);
    const table = formatEvalTable(report);
    expect(table.split('\n')).toHaveLength(4);
    expect(table).toMatch(/^a sks +\d\/2 /m);
    expect(table).toMatch(/overall: \d\/4 = /);
    // an existing report is not replaced unless asked
    await expect(evaluateModel({ model: modelDir, prompts: ['a red circle'], seeds: 1, steps: 1, out, quiet: true })).rejects.toThrow(/eval\.json already exists; choose another --out folder or pass --overwrite/);
  });

  it('refuses a model that is not the toy world (the bundled tiny SD) with the reason', async () => {
    await expect(evaluateModel({ model: TINY, prompts: ['a red circle'], seeds: 1, steps: 1, quiet: true })).rejects.toThrow(
      /tiny-sd-v1 is not a toy-world model \(it samples 64x64 images, not 32x32\): the judges only know the toy world/,
    );
    const r = spawnSync(process.execPath, [BIN, 'eval', '--model', TINY, '--prompts', 'a red circle', '--steps', '1', '--out', path.join(tmp, 'x')], { encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
    expect(r.status).toBe(6);
    expect(r.stderr.trim().split('\n').pop()).toMatch(/^error: .*is not a toy-world model .*the judges only know the toy world/);
    // 32x32, but a tokenizer without the world's words
    const m = buildToyModel();
    try {
      const other = await ClipTokenizer.fromDir(path.join(TINY, 'tokenizer'), { maxLength: 12 });
      const missing = TOY_WORDS.filter((w) => other.tokenize(w).length !== 1);
      expect(missing.length).toBeGreaterThan(0);
      expect(() => assertToyModel({ ...m, tokenizer: other })).toThrow(new RegExp(`its tokenizer splits the world's words \\(${missing[0]}`));
    } finally {
      disposeModel(m);
    }
  });

  it('parses prompts and grids; prompts naming no colour or shape are a clear error', () => {
    expect(evalPrompts(['a large purple heart on the right', 'a sks => green star', 'a blue thing'])).toEqual([
      { prompt: 'a large purple heart on the right', expected: { colour: 'purple', shape: 'heart' } },
      { prompt: 'a sks', expected: { colour: 'green', shape: 'star' } },
      { prompt: 'a blue thing', expected: { colour: 'blue' } },
    ]);
    const grid = evalPrompts([], 'colours x shapes');
    expect(grid).toHaveLength(16);
    expect(grid[5]).toEqual({ prompt: 'a green square', expected: { colour: 'green', shape: 'square' } });
    expect(evalPrompts([], 'red,purple x heart').map((p) => p.prompt)).toEqual(['a red heart', 'a purple heart']);
    expect(() => evalPrompts(['a dog'])).toThrow(/prompt "a dog" names no toy-world colour \(red, green, blue, yellow, purple\) or shape/);
    expect(() => evalPrompts([])).toThrow(/give prompts/);
    expect(() => evalPrompts([], 'red x dog')).toThrow(/unknown shape "dog"/);
    expect(() => evalPrompts([], 'red')).toThrow(/a grid is "COLOURS x SHAPES"/);
  });
});
