import * as tf from '@tensorflow/tfjs';
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { ClipTokenizer } from '../../src/tokenizer/clip.js';
import { parseMerges } from '../../src/tokenizer/bpe.js';
import { applyEmphasis, chunkPrompt, hasPromptSyntax, padChunks, parsePromptAttention } from '../../src/tokenizer/prompt.js';
import { caseTensors, describeGolden, golden, goldenCase } from '../golden.js';

// Tiny vocabulary, no merges: every single letter is a word ("a</w>"), so a prompt of n letters is n tokens.
const LETTERS = 'abcdefghijklmnopqrstuvwxyz'.split('');
const VOCAB: Record<string, number> = {};
LETTERS.forEach((c, i) => {
  VOCAB[c] = 2 * i;
  VOCAB[`${c}</w>`] = 2 * i + 1;
});
Object.assign(VOCAB, { ',</w>': 52, '<|startoftext|>': 53, '<|endoftext|>': 54, '!</w>': 55 });
const [BOS, EOS, COMMA] = [53, 54, 52];
const tok = new ClipTokenizer(VOCAB, []);
const id = (c: string) => VOCAB[`${c}</w>`]!;
const words = (c: string, n: number) => Array(n).fill(c).join(' ');
/** ids of a chunk without BOS and padding */
const body = (ids: Int32Array, length: number) => [...ids.slice(1, 1 + length)];

describe('parsePromptAttention (A1111 docstring and spec §9.1 examples)', () => {
  it.each([
    ['normal text', [['normal text', 1]]],
    ['an (important) word', [['an ', 1], ['important', 1.1], [' word', 1]]],
    ['a (b:1.5) c', [['a ', 1], ['b', 1.5], [' c', 1]]],
    ['(a: 1.3 )', [['a', 1.3]]],
    ['((x))', [['x', 1.1 * 1.1]]],
    ['[x]', [['x', 1 / 1.1]]],
    ['[[x]]', [['x', 1 / 1.1 / 1.1]]],
    ['\\(x\\)', [['(x)', 1]]],
    ['\\(literal\\]', [['(literal]', 1]]],
    ['(unbalanced', [['unbalanced', 1.1]]],
    ['unbalanced)] x', [['unbalanced)] x', 1]]],
    ['(unnecessary)(parens)', [['unnecessaryparens', 1.1]]],
    ['a BREAK b', [['a', 1], ['BREAK', -1], ['b', 1]]],
    ['a BREAKING b', [['a BREAKING b', 1]]],
    ['(a BREAK b)', [['a', 1.1], ['BREAK', -1.1], ['b', 1.1]]],
    ['x:y', [['x:y', 1]]],
    ['', [['', 1]]],
    [
      'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).',
      [['a ', 1], ['house', 1.5730000000000004], [' ', 1.1], ['on', 1], [' a ', 1.1], ['hill', 0.55], [', sun, ', 1.1], ['sky', 1.4641000000000006], ['.', 1.1]],
    ],
  ] as [string, [string, number][]][])('%j', (text, expected) => {
    expect(parsePromptAttention(text)).toEqual(expected);
  });

  it('rejects a weight Python float() would reject', () => {
    expect(() => parsePromptAttention('(a:1.2.3)')).toThrow(SdtuneError);
  });

  it('hasPromptSyntax: true only when parsing changes something', () => {
    expect(hasPromptSyntax('a photo, of: a cat')).toBe(false);
    expect(hasPromptSyntax('a ] b')).toBe(false); // unmatched closer is plain text
    expect(hasPromptSyntax('')).toBe(false);
    for (const t of ['(a)', '[a]', '(a:1.2)', '\\(a\\)', 'a BREAK b', '(a']) expect(hasPromptSyntax(t)).toBe(true);
  });
});

describe('chunkPrompt (A1111 tokenize_line)', () => {
  it('a prompt of <= 75 tokens without syntax gives exactly the diffusers ids, weights all 1', () => {
    for (const text of ['a b c', 'a, b! c', words('q', 75), '  x   y\nz ', '']) {
      const chunks = chunkPrompt(tok, text);
      expect(chunks).toHaveLength(1);
      expect([...chunks[0]!.ids]).toEqual([...tok.encode(text).inputIds]);
      expect([...chunks[0]!.weights]).toEqual(Array(77).fill(1));
    }
    const empty = chunkPrompt(tok, '')[0]!;
    expect([empty.ids[0], empty.ids[1], empty.ids[76], empty.length]).toEqual([BOS, EOS, EOS, 0]);
  });

  it('per-token weights, 1.0 on BOS/EOS/padding', () => {
    const [c] = chunkPrompt(tok, 'a (b:1.5) [c]');
    expect(body(c!.ids, 3)).toEqual([id('a'), id('b'), id('c')]);
    expect([...c!.weights.slice(0, 6)]).toEqual([1, 1, 1.5, Math.fround(1 / 1.1), 1, 1]);
    expect(c!.length).toBe(3);
  });

  it('BREAK starts a new chunk', () => {
    const chunks = chunkPrompt(tok, 'a BREAK b');
    expect(chunks.map((c) => body(c.ids, c.length))).toEqual([[id('a')], [id('b')]]);
    expect(chunkPrompt(tok, 'BREAK a')).toHaveLength(2); // A1111: a leading BREAK yields an empty first chunk
  });

  it('75 tokens fit one chunk; 76 and 100 need two', () => {
    expect(chunkPrompt(tok, words('a', 75))).toHaveLength(1);
    expect(chunkPrompt(tok, words('a', 76)).map((c) => c.length)).toEqual([75, 1]);
    const chunks = chunkPrompt(tok, words('a', 100));
    expect(chunks.map((c) => c.length)).toEqual([75, 25]);
    for (const c of chunks) expect([c.ids[0], c.ids[c.length + 1], c.ids.length, c.weights.length]).toEqual([BOS, EOS, 77, 77]);
  });

  it('comma back-off: words after a comma within 20 tokens of the end move to the next chunk', () => {
    const text = `${words('a', 70)}, ${words('b', 10)}`;
    const [c0, c1] = chunkPrompt(tok, text);
    expect(c0!.length).toBe(71);
    expect(body(c0!.ids, 71)).toEqual([...Array(70).fill(id('a')), COMMA]);
    expect([...c0!.ids.slice(72)]).toEqual(Array(5).fill(EOS));
    expect(body(c1!.ids, c1!.length)).toEqual(Array(10).fill(id('b')));
    // comma 25 tokens back (> 20): plain split at 75
    const far = chunkPrompt(tok, `${words('a', 50)}, ${words('b', 30)}`);
    expect(far.map((c) => c.length)).toEqual([75, 6]);
    // disabled
    expect(chunkPrompt(tok, text, { commaBacktrack: 0 }).map((c) => c.length)).toEqual([75, 6]);
  });

  it('relocated tokens keep their weights', () => {
    const [c0, c1] = chunkPrompt(tok, `${words('a', 70)}, (${words('b', 10)}:1.5)`);
    expect(c0!.length).toBe(71);
    expect([...c1!.weights.slice(1, 11)]).toEqual(Array(10).fill(1.5));
  });

  it('uses the pad id after the first EOS when pad != eos (A1111 process_tokens, SD 2)', () => {
    const sd2 = new ClipTokenizer(VOCAB, [], { padTokenId: 55 });
    const [c] = chunkPrompt(sd2, 'a b');
    expect([...c!.ids.slice(0, 6)]).toEqual([BOS, id('a'), id('b'), EOS, 55, 55]);
    expect([...c!.ids]).toEqual([...sd2.encode('a b').inputIds]);
  });

  it('textual-inversion placeholders: n slots of id 0, a fix, never straddling chunks', () => {
    const emb = { embeddings: [{ name: 'x y', vectors: 3 }] };
    const [c] = chunkPrompt(tok, 'a (x y:1.2) b', emb);
    expect(body(c!.ids, c!.length)).toEqual([id('a'), 0, 0, 0, id('b')]);
    expect([...c!.weights.slice(2, 5)]).toEqual(Array(3).fill(Math.fround(1.2)));
    expect(c!.fixes).toEqual([{ position: 2, name: 'x y', vectors: 3 }]);
    const [d0, d1] = chunkPrompt(tok, `${words('a', 73)} x y`, emb);
    expect([d0!.length, d0!.fixes.length, d1!.length]).toEqual([73, 0, 3]);
    expect(d1!.fixes).toEqual([{ position: 1, name: 'x y', vectors: 3 }]);
  });
});

describe('padChunks', () => {
  it('appends empty-prompt chunks to the shorter list', () => {
    const a = chunkPrompt(tok, words('a', 100));
    const b = chunkPrompt(tok, 'b');
    const [pa, pb] = padChunks(a, b, tok);
    expect([pa.length, pb.length]).toEqual([2, 2]);
    expect(pa).toEqual(a);
    expect(pb[0]).toEqual(b[0]);
    expect(pb[1]).toEqual(chunkPrompt(tok, '')[0]);
    const [qa, qb] = padChunks(b, a, tok);
    expect([qa.length, qb.length]).toEqual([2, 2]);
  });
});

describe('applyEmphasis ("Original": multiply, then restore the mean)', () => {
  const z = tf.randomNormal([2, 154, 8], 0.3, 1, 'float32', 7) as tf.Tensor3D;

  it('all-ones weights are the identity, bit for bit', () => {
    const out = applyEmphasis(z, tf.ones([2, 154]) as tf.Tensor2D);
    expect(Buffer.from((out.dataSync() as Float32Array).buffer).equals(Buffer.from((z.dataSync() as Float32Array).buffer))).toBe(true);
  });

  it('scales tokens and restores each chunk mean (over B, 77, C)', () => {
    const w = tf.randomUniform([2, 154], 0.5, 1.5, 'float32', 3) as tf.Tensor2D;
    const out = applyEmphasis(z, w);
    for (const k of [0, 1]) {
      const zk = z.slice([0, 77 * k, 0], [2, 77, 8]);
      const ok = out.slice([0, 77 * k, 0], [2, 77, 8]);
      expect(ok.mean().dataSync()[0]).toBeCloseTo(zk.mean().dataSync()[0]!, 5);
      // out = z * w * c with one constant c per chunk
      const ratio = ok.div(zk.mul(w.slice([0, 77 * k], [2, 77]).expandDims(2))).dataSync();
      for (const r of ratio) expect(r).toBeCloseTo(ratio[0]!, 4);
    }
  });

  it('a chunk whose mean is exactly 0 stays finite (no 0/0 rescale)', () => {
    // per-token zero mean, as a final layer norm without bias gives: the chunk mean is exactly 0
    const zm = tf.tensor3d(Float32Array.from({ length: 2 * 154 * 8 }, (_, i) => (i % 2 ? -1 : 2) * (1 + (i % 5))).map((v, i, a) => (i % 2 ? -a[i - 1] : v)), [2, 154, 8]);
    const w = tf.fill([2, 154], 1.1) as tf.Tensor2D;
    const out = applyEmphasis(zm, w).dataSync();
    expect(out.every(Number.isFinite)).toBe(true);
    expect(out[0]).toBeCloseTo(zm.dataSync()[0] * 1.1, 5);
  });

  it('rejects mismatched shapes', () => {
    expect(() => applyEmphasis(z, tf.ones([2, 77]) as tf.Tensor2D)).toThrow(SdtuneError);
    expect(() => applyEmphasis(z.slice([0, 0, 0], [2, 100, 8]), tf.ones([2, 100]) as tf.Tensor2D)).toThrow(SdtuneError);
  });
});

describeGolden('chunkPrompt with the real CLIP vocabulary', () => {
  const vocab = JSON.parse(readFileSync(golden('clip-tokenizer', 'vocab.json'), 'utf8')) as Record<string, number>;
  const clip = new ClipTokenizer(vocab, parseMerges(readFileSync(golden('clip-tokenizer', 'merges.txt'), 'utf8')));

  it('matches the diffusers ids of every golden prompt without syntax (first chunk = truncated ids)', async () => {
    const t = await caseTensors('tokenizer');
    const prompts = goldenCase('tokenizer').prompts as Array<{ i: number; prompt: string; truncated: boolean }>;
    let checked = 0;
    for (const { i, prompt, truncated } of prompts) {
      if (hasPromptSyntax(prompt)) continue;
      const chunks = chunkPrompt(clip, prompt);
      expect([...chunks[0]!.ids], prompt).toEqual([...t.get(`input_ids_${i}`)!.data]);
      if (!truncated) expect(chunks, prompt).toHaveLength(1);
      else expect(chunks.length).toBeGreaterThan(1);
      expect(chunks.every((c) => c.weights.every((w) => w === 1))).toBe(true);
      checked++;
    }
    expect(checked).toBeGreaterThan(10);
  });

  it('comma is ",</w>" = 267; weighted golden prompt', () => {
    expect(clip.tokenToId(',</w>')).toBe(267);
    const [c] = chunkPrompt(clip, 'masterpiece, best quality, (highly detailed:1.2), [background], 8k uhd');
    const ids = [...c!.ids.slice(1, 1 + c!.length)];
    expect(ids.map((i) => clip.idToToken(i))).toEqual(
      ['masterpiece</w>', ',</w>', 'best</w>', 'quality</w>', ',</w>', 'highly</w>', 'detailed</w>', ',</w>', 'background</w>', ',</w>', '8</w>', 'k</w>', 'u', 'hd</w>'],
    );
    expect([...c!.weights.slice(6, 8)]).toEqual([Math.fround(1.2), Math.fround(1.2)]);
    expect(c!.weights[9]).toBe(Math.fround(1 / 1.1));
  });

  it('A1111 TI placeholders sit where diffusers put the new token ids (textual_inversion_a1111 case)', async () => {
    expect(clip.encodeIds('<my-token>')).toEqual([283, 607, 268, 17134, 285]);
    const ref = [...(await caseTensors('textual_inversion_a1111')).get('input_ids')!.data];
    const [c] = chunkPrompt(clip, goldenCase('textual_inversion_a1111').prompt as string, { embeddings: [{ name: '<my-token>', vectors: 2 }] });
    expect(c!.fixes).toEqual([{ position: 4, name: '<my-token>', vectors: 2 }]);
    expect([...c!.ids]).toEqual(ref.map((v, i) => (i === 4 || i === 5 ? 0 : v)));
    expect(ref.slice(4, 6)).toEqual([49408, 49409]);
  });
});
