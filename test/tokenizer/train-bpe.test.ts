import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inspectModel, loadModel, disposeModel, type LoadedModel } from '../../src/io/model.js';
import { clipText } from '../../src/models/clip-text.js';
import { unet } from '../../src/models/unet.js';
import { vaeDecode } from '../../src/models/vae.js';
import { ClipTokenizer } from '../../src/tokenizer/clip.js';
import {
  CLIP_BOS, CLIP_EOS, baseVocabulary, clipTokenizerFiles, countWords, mergesText, trainBpe, transformersJson, wordSymbols,
} from '../../src/tokenizer/train-bpe.js';
import { TINY_CORPUS, TINY_MODEL_DIR, makeTinyModel, trainTinyVocabulary } from '../../scripts/make-tiny-model.js';

// Sennrich et al.'s example corpus; the merges below are worked out by hand in the comments.
const SENNRICH = new Map([['low', 5], ['lower', 2], ['newest', 6], ['widest', 3]]);
const SENNRICH_MERGES = [
  'e s', // 9, ties with "s t</w>" (9): "e" sorts first
  'es t</w>', // 9
  'l o', // 7
  'e w', // 6, ties with "n e" and "w est</w>": "e" < "n" < "w"
  'ew est</w>', // 6, ties with "n ew": "ew" < "n"
  'n ewest</w>', // 6
  'lo w</w>', // 5
  'd est</w>', // 3, ties with "i d" and "w i"
  'i dest</w>', // 3
  'w idest</w>', // 3
  'e r</w>', // 2, ties with "lo w" and "w e"
  'lo w', // 2, ties with "w er</w>"
  'low er</w>', // 2
];

describe('trainBpe', () => {
  it('learns the hand-checked merges of a tiny corpus, ties broken by symbol order', () => {
    const m = trainBpe(SENNRICH, { minFrequency: 1 });
    expect(m.merges.map((p) => p.join(' '))).toEqual(SENNRICH_MERGES);
    // frequency 2 is still >= minFrequency 2 (the default); 3 stops before "e r</w>"
    expect(trainBpe(SENNRICH).merges.length).toBe(13);
    expect(trainBpe(SENNRICH, { minFrequency: 3 }).merges.map((p) => p.join(' '))).toEqual(SENNRICH_MERGES.slice(0, 10));
    expect(trainBpe(SENNRICH, { maxMerges: 4 }).merges.map((p) => p.join(' '))).toEqual(SENNRICH_MERGES.slice(0, 4));
  });

  it("lays out the vocabulary like CLIP's: bytes, bytes with </w>, merges, then the two special tokens", () => {
    const m = trainBpe(SENNRICH, { minFrequency: 1 });
    // the ids CLIP's own vocab.json gives these base tokens
    expect(m.vocab['!']).toBe(0);
    expect(m.vocab['a']).toBe(64);
    expect(m.vocab['Ġ']).toBe(220); // the space byte
    expect(m.vocab['!</w>']).toBe(256);
    expect(m.vocab['a</w>']).toBe(320);
    expect(m.vocab['es']).toBe(512);
    expect(m.vocab['lower</w>']).toBe(524);
    expect([m.bosId, m.eosId]).toEqual([525, 526]);
    expect([m.vocab[CLIP_BOS], m.vocab[CLIP_EOS]]).toEqual([525, 526]);
    expect(Object.values(m.vocab).sort((a, b) => a - b)).toEqual([...Array(527).keys()]);
    expect(baseVocabulary()).toHaveLength(512);
  });

  it('does not depend on the order of the word table', () => {
    const a = trainBpe(SENNRICH, { minFrequency: 1 });
    const b = trainBpe([...SENNRICH].reverse(), { minFrequency: 1 });
    expect(b.merges).toEqual(a.merges);
    expect(transformersJson(b.vocab)).toBe(transformersJson(a.vocab));
  });

  it('splits words as CLIP does, bytes through the byte table', () => {
    const c = countWords('# a comment line\nA photo of a {}.\nthe  Photo, it\'s café 42');
    expect(Object.fromEntries(c)).toEqual({ a: 2, photo: 2, of: 1, '{}.': 1, the: 1, ',': 1, it: 1, "'s": 1, café: 1, '4': 1, '2': 1 });
    expect(wordSymbols('café')).toEqual(['c', 'a', 'f', 'Ã', '©</w>']);
    expect(wordSymbols('a')).toEqual(['a</w>']);
  });

  it('writes files in transformers\' format', () => {
    expect(mergesText([['a', 'b'], ['ab', 'c</w>']])).toBe('#version: 0.2\na b\nab c</w>\n');
    // Python sorts "0" between "!" and "b"; a JS object would put it first
    expect(transformersJson({ b: 1, '0': [2, { y: null, x: true }], '!': {} })).toBe(
      '{\n  "!": {},\n  "0": [\n    2,\n    {\n      "x": true,\n      "y": null\n    }\n  ],\n  "b": 1\n}\n',
    );
    const files = clipTokenizerFiles(trainBpe(SENNRICH));
    expect(Object.keys(files).sort()).toEqual(['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']);
    const cfg = JSON.parse(files['tokenizer_config.json']!);
    expect(cfg.added_tokens_decoder['525'].content).toBe(CLIP_BOS);
    expect(cfg.added_tokens_decoder['526'].content).toBe(CLIP_EOS);
    expect([cfg.pad_token, cfg.unk_token, cfg.model_max_length]).toEqual([CLIP_EOS, CLIP_EOS, 77]);
  });

  it('round-trips through ClipTokenizer.fromDir', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'sdtune-bpe-'));
    try {
      for (const [name, text] of Object.entries(clipTokenizerFiles(trainBpe(SENNRICH, { minFrequency: 1 })))) await writeFile(path.join(dir, name), text);
      const tok = await ClipTokenizer.fromDir(dir);
      expect(tok.tokenize('Lower newest LOW widest')).toEqual(['lower</w>', 'newest</w>', 'low</w>', 'widest</w>']);
      expect(tok.tokenize('lowest')).toEqual(['low', 'est</w>']);
      const e = tok.encode('lower');
      expect(Array.from(e.inputIds.slice(0, 4))).toEqual([525, 524, 526, 526]);
      expect([tok.bosTokenId, tok.eosTokenId, tok.padTokenId, tok.maxLength, tok.vocabSize]).toEqual([525, 526, 526, 77, 527]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

const TOKENIZER_DIR = path.join(TINY_MODEL_DIR, 'tokenizer');

describe('the bundled vocabulary (checkpoints/tiny-sd-v1/tokenizer)', () => {
  let tok: ClipTokenizer;
  beforeAll(async () => {
    tok = await ClipTokenizer.fromDir(TOKENIZER_DIR);
  });

  it('is what the trainer makes from scripts/tiny-vocab-corpus.txt today', async () => {
    const files = clipTokenizerFiles(await trainTinyVocabulary());
    for (const [name, text] of Object.entries(files)) expect(await readFile(path.join(TOKENIZER_DIR, name), 'utf8'), name).toBe(text);
  });

  it('makes every corpus word one token, and frequent prompt words single tokens with </w>', async () => {
    const words = countWords(await readFile(TINY_CORPUS, 'utf8'));
    const split = [...words.keys()].filter((w) => tok.tokenize(w).length !== 1);
    expect(split).toEqual([]);
    // ids are dense: 512 byte tokens + one per merge + 2 specials
    const merges = (await readFile(path.join(TOKENIZER_DIR, 'merges.txt'), 'utf8')).trim().split('\n').length - 1;
    expect(tok.vocabSize).toBe(512 + merges + 2);
    expect(tok.size).toBe(tok.vocabSize);
    expect(tok.tokenize('A photo of a red circle, in the outlined style')).toEqual(
      ['a</w>', 'photo</w>', 'of</w>', 'a</w>', 'red</w>', 'circle</w>', ',</w>', 'in</w>', 'the</w>', 'outlined</w>', 'style</w>'],
    );
    for (const w of ['square', 'triangle', 'logo', 'star', 'ring', 'rendering', 'painting', 'watercolor', 'cinematic'])
      expect(tok.tokenize(w)).toEqual([`${w}</w>`]);
  });

  it('still spells out unseen words as pieces that concatenate back', () => {
    const pieces = tok.tokenize('xylophonically');
    expect(pieces.length).toBeGreaterThan(1);
    expect(pieces.join('')).toBe('xylophonically</w>');
    expect(tok.encodeIds('zqxjv').every((id) => id !== tok.unkTokenId)).toBe(true); // bytes always exist
  });
});

describe('the bundled model (checkpoints/tiny-sd-v1)', () => {
  let m: LoadedModel;
  beforeAll(async () => {
    m = await loadModel(TINY_MODEL_DIR);
  });
  afterAll(() => m && disposeModel(m));

  it('is exactly what scripts/make-tiny-model.ts builds (regenerated, compared byte for byte)', async () => {
    const out = path.join(await mkdtemp(path.join(tmpdir(), 'sdtune-tiny-')), 'tiny-sd-v1');
    try {
      const r = await makeTinyModel(out);
      const bundled = await listFiles(TINY_MODEL_DIR);
      expect(Object.keys(r.files)).toEqual(bundled);
      for (const f of bundled) expect((await readFile(path.join(out, f))).equals(await readFile(path.join(TINY_MODEL_DIR, f))), f).toBe(true);
      const total = Object.values(r.files).reduce((a, b) => a + b, 0);
      expect(total).toBeLessThan(6.5e6);
    } finally {
      await rm(path.dirname(out), { recursive: true, force: true });
    }
  });

  it('loads strictly and inspects as an SD v1 diffusers folder', async () => {
    const r = await inspectModel(TINY_MODEL_DIR);
    expect([r.layout, r.variant, r.dtype]).toEqual(['diffusers', 'v1', 'float16']);
    expect(r.scheduler._class_name).toBe('PNDMScheduler');
    expect(r.notes).toEqual([]);
    expect(m.unet!.config.down_block_types).toEqual(['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D']);
    expect(m.unet!.config.up_block_types).toEqual(['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']);
    expect(m.unet!.config.cross_attention_dim).toBe(m.textEncoder!.config.hidden_size);
    expect(m.unet!.config.sample_size).toBe(8);
    const te = m.textEncoder!.config;
    expect([te.vocab_size, te.bos_token_id, te.eos_token_id, te.pad_token_id]).toEqual([
      m.tokenizer!.vocabSize, m.tokenizer!.bosTokenId, m.tokenizer!.eosTokenId, m.tokenizer!.eosTokenId,
    ]);
  });

  it('runs the text encoder, one UNet step on 8x8 latents and the VAE decoder', () => {
    tf.tidy(() => {
      const ids = tf.tensor2d(m.tokenizer!.encode('a red circle').inputIds, [1, 77], 'int32');
      const ctx = clipText(m.textEncoder!.params, m.textEncoder!.config, ids).hidden;
      expect(ctx.shape).toEqual([1, 77, 32]);
      const eps = unet(m.unet!.params, m.unet!.config, tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 1), 999, ctx);
      expect(eps.shape).toEqual([1, 8, 8, 4]);
      expect(Number.isFinite(eps.abs().max().dataSync()[0])).toBe(true);
      const img = vaeDecode(m.vae!.params, m.vae!.config, tf.div(eps, m.vae!.config.scaling_factor) as tf.Tensor4D);
      expect(img.shape).toEqual([1, 64, 64, 3]);
    });
  });
});

/** Relative paths of every file under a folder, sorted as makeTinyModel lists them. */
async function listFiles(root: string, dir = root): Promise<string[]> {
  const out: string[] = [];
  for (const e of (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1))) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...(await listFiles(root, p)));
    else out.push(path.relative(root, p));
  }
  return out;
}
