// Textual-inversion embeddings: parity with diffusers' load_textual_inversion on the golden tiny-sd (A1111 and
// diffusers files), and file round trips / errors / tokenizer extension on tiny data (runs on a fresh clone).
import * as tf from '@tensorflow/tfjs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Embedding, applyEmbeddings, readEmbedding, writeEmbeddingA1111, writeEmbeddingDiffusers } from '../../src/adapters/embeddings.js';
import { SdtuneError } from '../../src/errors.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { randomParams } from '../../src/models/build.js';
import { clipText, clipTextParamShapes } from '../../src/models/clip-text.js';
import { clipTextConfig } from '../../src/models/configs.js';
import { type ParamTree, disposeParams, flattenParams } from '../../src/models/params.js';
import { ClipTokenizer } from '../../src/tokenizer/clip.js';
import { atolOf, caseTensors, describeGolden, golden, goldenCase } from '../golden.js';
import { maxAbsDiff } from '../helpers.js';

const TABLE = 'text_model.embeddings.token_embedding.weight';
const table = (p: ParamTree) => flattenParams(p).get(TABLE)!;

describeGolden('textual inversion vs diffusers (tiny-sd)', () => {
  let m: LoadedModel;
  beforeAll(async () => {
    m = await loadModel(golden('tiny-sd'), { components: ['text_encoder'] });
  });
  afterAll(() => disposeModel(m));

  for (const name of ['textual_inversion_a1111', 'textual_inversion_diffusers']) {
    it(`${name}: ids, rewritten prompt, new rows and text-encoder output`, async () => {
      const c = goldenCase(name) as ReturnType<typeof goldenCase> & { embedding_file: string; prompt: string; converted_prompt: string; new_token_ids: number[]; vocab_size_after: number };
      const ref = await caseTensors(name);
      const { params, config } = m.textEncoder!;
      const tok = await ClipTokenizer.fromDir(golden('tiny-sd', 'tokenizer')); // fresh: applying adds tokens
      const e = await readEmbedding(golden(c.embedding_file), { token: '<my-token>', expectedDim: config.hidden_size });
      expect(e.format).toBe(name.endsWith('a1111') ? 'a1111' : 'diffusers');
      const old = table(params);
      const oldData = (old.dataSync() as Float32Array).slice();
      const before = tf.memory().numTensors;

      const { ids, rewritePrompt, restore } = applyEmbeddings(params, tok, [e]);
      expect(ids.get('<my-token>')).toEqual(c.new_token_ids);
      expect(tok.size).toBe(c.vocab_size_after);
      const prompt = rewritePrompt(c.prompt);
      expect(prompt).toBe(c.converted_prompt);
      const enc = tok.encode(prompt);
      expect(Array.from(enc.inputIds)).toEqual(Array.from(ref.get('input_ids')!.data));
      // the grown table: old rows bitwise unchanged, new rows = the file's vectors = the reference rows
      const grown = table(params);
      expect(grown.shape).toEqual([c.vocab_size_after, config.hidden_size]);
      const g = grown.dataSync() as Float32Array;
      expect(Buffer.from(g.slice(0, oldData.length).buffer).equals(Buffer.from(oldData.buffer))).toBe(true);
      expect(Array.from(g.slice(oldData.length))).toEqual(Array.from(ref.get('new_token_embedding_rows')!.data));

      const idsT = tf.tensor2d(enc.inputIds, [1, 77], 'int32');
      const out = clipText(params, config, idsT);
      const hidden = out.hidden.dataSync();
      const err = Math.max(maxAbsDiff(hidden, ref.get('last_hidden_state')!.data), maxAbsDiff(hidden, ref.get('prompt_embeds')!.data));
      console.log(`${name}: text encoder max abs err ${err.toExponential(2)} (atol ${atolOf(name)})`);
      expect(err).toBeLessThanOrEqual(atolOf(name));
      tf.dispose([idsT, out.hidden, out.hiddenRaw, out.pooled]);

      restore();
      expect(table(params)).toBe(old);
      expect(tf.memory().numTensors).toBe(before);
    });
  }
});

// ---- tiny data --------------------------------------------------------------------------------------------------

const CLIP = clipTextConfig({ hidden_size: 8, intermediate_size: 12, num_hidden_layers: 1, num_attention_heads: 2, vocab_size: 100, max_position_embeddings: 12, eos_token_id: 99, bos_token_id: 98, pad_token_id: 99 });
/** 98 one-letter-ish words + BOS/EOS: enough for prompts like "a b <t> c". */
function tinyTokenizer(): ClipTokenizer {
  const vocab: Record<string, number> = {};
  for (let i = 0; i < 98; i++) vocab[i < 26 ? `${String.fromCharCode(97 + i)}</w>` : `x${i}`] = i;
  vocab['<|startoftext|>'] = 98;
  vocab['<|endoftext|>'] = 99;
  return new ClipTokenizer(vocab, [], { maxLength: 12 });
}
const vec = (n: number, dim: number, base: number) => ({ shape: [n, dim] as [number, number], data: Float32Array.from({ length: n * dim }, (_, i) => base + i / 8) });

describe('embeddings on tiny data', () => {
  let dir: string;
  let params: ParamTree;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'sdtune-emb-'));
    params = randomParams(clipTextParamShapes(CLIP), 3);
  });
  afterAll(async () => {
    disposeParams(params);
    await rm(dir, { recursive: true, force: true });
  });
  const file = (n: string) => path.join(dir, n);
  const err = async (p: Promise<unknown>) => {
    const e = await p.then(() => undefined, (x: unknown) => x);
    expect(e).toBeInstanceOf(SdtuneError);
    return e as SdtuneError;
  };

  it('A1111 round trip: emb_params [n,dim], name/step metadata, token = file stem unless given', async () => {
    const e: Embedding = { token: 'my-style', vectors: vec(3, 8, 1), path: '', format: 'a1111', step: 1500 };
    await writeEmbeddingA1111(file('my-style.safetensors'), e);
    const f = await SafetensorsFile.open(file('my-style.safetensors'));
    expect(f.keys()).toEqual(['emb_params']);
    expect(f.info('emb_params')).toMatchObject({ dtype: 'F32', shape: [3, 8] });
    expect(f.metadata).toEqual({ name: 'my-style', step: '1500' });
    await f.close();
    const back = await readEmbedding(file('my-style.safetensors'), { expectedDim: 8 });
    expect(back).toEqual({ ...e, path: file('my-style.safetensors') });
    expect((await readEmbedding(file('my-style.safetensors'), { token: '<s>' })).token).toBe('<s>');
  });

  it('diffusers round trip: {token: [dim]} for one vector, [n,dim] for more', async () => {
    const one: Embedding = { token: '<cat-toy>', vectors: vec(1, 8, 2), path: '', format: 'diffusers' };
    await writeEmbeddingDiffusers(file('learned_embeds.safetensors'), one);
    const f = await SafetensorsFile.open(file('learned_embeds.safetensors'));
    expect(f.info('<cat-toy>').shape).toEqual([8]);
    await f.close();
    expect(await readEmbedding(file('learned_embeds.safetensors'))).toEqual({ ...one, path: file('learned_embeds.safetensors') });
    const two = { ...one, vectors: vec(2, 8, 3) };
    await writeEmbeddingDiffusers(file('two.safetensors'), two);
    expect((await readEmbedding(file('two.safetensors'))).vectors).toEqual(two.vectors);
  });

  it('refuses SDXL, other widths, non-embeddings and unknown file types', async () => {
    const t = (shape: number[]) => ({ shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) });
    await writeSafetensors(file('xl.safetensors'), { clip_l: t([2, 768]), clip_g: t([2, 1280]) });
    expect((await err(readEmbedding(file('xl.safetensors')))).kind).toBe('unsupported');
    const wide = await err(readEmbedding(file('my-style.safetensors'), { expectedDim: 768 }));
    expect([wide.kind, wide.message]).toEqual(['format', expect.stringMatching(/my-style\.safetensors.*width 8.*width 768/)]);
    await writeSafetensors(file('two-keys.safetensors'), { a: t([8]), b: t([8]) });
    expect((await err(readEmbedding(file('two-keys.safetensors')))).message).toMatch(/not a textual-inversion embedding/);
    expect((await err(readEmbedding(file('x.onnx')))).kind).toBe('unsupported'); // pickles (.pt/.bin) are read as data: test/io/pickle.test.ts
  });

  it('applyEmbeddings extends tokenizer and table, rewrites prompts, restores without leaks, re-applies', () => {
    const tok = tinyTokenizer();
    const old = table(params);
    const oldData = (old.dataSync() as Float32Array).slice();
    const before = tf.memory().numTensors;
    const a: Embedding = { token: '<a>', vectors: vec(2, 8, 5), path: 'a', format: 'a1111' };
    const b: Embedding = { token: '<b>', vectors: vec(1, 8, 7), path: 'b', format: 'diffusers' };
    const applied = applyEmbeddings(params, tok, [a, b]);
    expect([...applied.ids]).toEqual([['<a>', [100, 101]], ['<b>', [102]]]);
    expect(applied.rewritePrompt('a <a> b <b> <a>')).toBe('a <a> <a>_1 b <b> <a> <a>_1');
    expect(applied.rewritePrompt('c d')).toBe('c d');
    expect(applied.usedIn('x <b> y')).toEqual([b]);
    expect(applied.usedIn('c', 'neg <a>, <b>')).toEqual([a, b]);
    expect(applied.usedIn('<A> <B> a b')).toEqual([]); // added tokens match exactly, case included
    expect(Array.from(tok.encode(applied.rewritePrompt('a <a> b')).inputIds.slice(0, 6))).toEqual([98, 0, 100, 101, 1, 99]);
    const g = table(params).dataSync() as Float32Array;
    expect(table(params).shape).toEqual([103, 8]);
    expect(Array.from(g.slice(0, 800))).toEqual(Array.from(oldData));
    expect(Array.from(g.slice(800))).toEqual([...a.vectors.data, ...b.vectors.data]);
    // the text encoder reads the new rows
    const ids = tf.tensor2d([[98, 100, 101, 102, 99, 99]], [1, 6], 'int32');
    const o = clipText(params, CLIP, ids);
    expect(o.hidden.shape).toEqual([1, 6, 8]);
    tf.dispose([ids, o.hidden, o.hiddenRaw, o.pooled]);
    // applying on top of the grown table: the tokens are now in the vocabulary
    expect(() => applyEmbeddings(params, tok, [a])).toThrow(/already in the tokenizer vocabulary/);
    applied.restore();
    expect(table(params)).toBe(old);
    expect(tf.memory().numTensors).toBe(before);
    // after restore the tokens are still known to the tokenizer but have no row: re-applying reuses their ids
    const again = applyEmbeddings(params, tok, [b]);
    expect(again.ids.get('<b>')).toEqual([102]);
    expect(table(params).shape).toEqual([103, 8]);
    again.restore();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('applyEmbeddings refuses vocabulary tokens, duplicate tokens and other widths before changing anything', () => {
    const tok = tinyTokenizer();
    const old = table(params);
    const e = (token: string, n = 1, dim = 8): Embedding => ({ token, vectors: vec(n, dim, 0), path: `${token}.safetensors`, format: 'a1111' });
    expect(() => applyEmbeddings(params, tok, [e('a</w>')])).toThrow(/already in the tokenizer vocabulary/);
    expect(() => applyEmbeddings(params, tok, [e('<x>', 2), e('<x>_1')])).toThrow(/given by two embeddings/);
    expect(() => applyEmbeddings(params, tok, [e('<y>', 1, 4)])).toThrow(/width 4.*width 8/);
    expect(tok.size).toBe(100);
    expect(table(params)).toBe(old);
  });
});
