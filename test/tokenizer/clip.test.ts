import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { ClipTokenizer } from '../../src/tokenizer/clip.js';
import { clipNormalize, fixText } from '../../src/tokenizer/normalize.js';
import { HAVE_GOLDEN, describeGolden, golden, goldenCase } from '../golden.js';

/** Reads one int32 tensor from a safetensors file (8-byte LE header length, JSON header, data). */
function readI32(file: string, name: string): Int32Array {
  const buf = readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const entry = header[name];
  if (!entry) throw new Error(`${name} not in ${file}`);
  expect(entry.dtype).toBe('I32');
  const [begin, end] = entry.data_offsets;
  const bytes = buf.subarray(8 + n + begin, 8 + n + end);
  return new Int32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

// A tiny vocabulary: every char of CHARS alone and with </w>, a few merged symbols, the two CLIP special tokens.
const CHARS = ['l', 'o', 'w', 'e', 'r', 'n', 's', 't', 'a', '!'];
const VOCAB: Record<string, number> = {};
CHARS.forEach((c, i) => {
  VOCAB[c] = 2 * i;
  VOCAB[`${c}</w>`] = 2 * i + 1;
});
Object.assign(VOCAB, { lo: 20, low: 21, 'low</w>': 22, 'er</w>': 23, 'lower</w>': 24, 're</w>': 25, er: 26 });
Object.assign(VOCAB, { '<|startoftext|>': 27, '<|endoftext|>': 28 });
// Rank order matters: "r e</w>" (1) beats "e r" (6), so "ere" -> e + re</w>, not er + e</w>.
const MERGES = ['#version: 0.2', 'l o', 'r e</w>', 'e r</w>', 'lo w', 'lo w</w>', 'low er</w>', 'e r'].join('\n');
const BOS = 27;
const EOS = 28;
const id = (t: string) => VOCAB[t]!;

describe('ClipTokenizer on a tiny vocabulary', () => {
  let dir: string;
  let tok: ClipTokenizer;
  beforeAll(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'sdtune-tok-'));
    writeFileSync(path.join(dir, 'vocab.json'), JSON.stringify(VOCAB));
    writeFileSync(path.join(dir, 'merges.txt'), MERGES + '\n');
    tok = await ClipTokenizer.fromFiles(path.join(dir, 'vocab.json'), path.join(dir, 'merges.txt'), { maxLength: 8 });
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('applies merges by rank, with </w> on the last symbol', () => {
    expect(tok.tokenize('lower')).toEqual(['lower</w>']);
    expect(tok.tokenize('low')).toEqual(['low</w>']);
    expect(tok.tokenize('ere')).toEqual(['e', 're</w>']);
    expect(tok.tokenize('lowest')).toEqual(['low', 'e', 's', 't</w>']);
    expect(tok.tokenize('a')).toEqual(['a</w>']);
    expect(tok.tokenize('  LOWER!\n low ')).toEqual(['lower</w>', '!</w>', 'low</w>']);
    expect(tok.tokenize('')).toEqual([]);
  });

  it('maps tokens to ids and back; unknown BPE symbols become unk (= eos)', () => {
    expect(tok.vocabSize).toBe(29);
    expect(tok.encodeIds('lower low')).toEqual([id('lower</w>'), id('low</w>')]);
    expect(tok.encodeIds('z')).toEqual([EOS]);
    expect(tok.tokenToId('er')).toBe(26);
    expect(tok.idToToken(24)).toBe('lower</w>');
    expect(tok.idToToken(999)).toBeUndefined();
    expect([tok.bosTokenId, tok.eosTokenId, tok.padTokenId, tok.maxLength]).toEqual([BOS, EOS, EOS, 8]);
  });

  it('pads with the pad token and masks the padding', () => {
    const e = tok.encode('lower low');
    expect([...e.inputIds]).toEqual([BOS, id('lower</w>'), id('low</w>'), EOS, EOS, EOS, EOS, EOS]);
    expect([...e.attentionMask]).toEqual([1, 1, 1, 1, 0, 0, 0, 0]);
    expect([e.truncated, e.untruncatedLength]).toEqual([false, 4]);
    const empty = tok.encode('');
    expect([...empty.inputIds.slice(0, 3)]).toEqual([BOS, EOS, EOS]);
    expect([...empty.attentionMask.slice(0, 3)]).toEqual([1, 1, 0]);
  });

  it('truncates to BOS + first maxLength-2 tokens + EOS', async () => {
    const t5 = await ClipTokenizer.fromFiles(path.join(dir, 'vocab.json'), path.join(dir, 'merges.txt'), { maxLength: 5 });
    const fits = t5.encode('low low low');
    expect([...fits.inputIds]).toEqual([BOS, 22, 22, 22, EOS]);
    expect([fits.truncated, fits.untruncatedLength]).toEqual([false, 5]);
    const cut = t5.encode('low lower low ere');
    expect([...cut.inputIds]).toEqual([BOS, 22, 24, 22, EOS]);
    expect([...cut.attentionMask]).toEqual([1, 1, 1, 1, 1]);
    expect([cut.truncated, cut.untruncatedLength]).toEqual([true, 7]);
  });

  it('matches added tokens verbatim and case-sensitively, with new ids from vocabSize', async () => {
    const t = await ClipTokenizer.fromFiles(path.join(dir, 'vocab.json'), path.join(dir, 'merges.txt'));
    expect(t.addTokens(['<my-logo>'])).toEqual([29]);
    expect(t.addTokens(['<x>', 'low</w>', '<my-logo>'])).toEqual([30, 22, 29]);
    expect(t.size).toBe(31);
    expect(t.tokenize('a<my-logo>lower <x>')).toEqual(['a</w>', '<my-logo>', 'lower</w>', '<x>']);
    expect(t.encodeIds('a <my-logo> lower')).toEqual([id('a</w>'), 29, id('lower</w>')]);
    expect(t.tokenize('<MY-LOGO>')).not.toContain('<my-logo>');
    expect(t.tokenToId('<my-logo>')).toBe(29);
    expect(t.idToToken(30)).toBe('<x>');
    // special tokens are added tokens too: they come out whole, and never get </w>
    expect(t.tokenize('low<|endoftext|>')).toEqual(['low</w>', '<|endoftext|>']);
  });

  it('takes the pad token and max length from tokenizer_config.json', async () => {
    const d = mkdtempSync(path.join(tmpdir(), 'sdtune-tok-'));
    try {
      writeFileSync(path.join(d, 'vocab.json'), JSON.stringify(VOCAB));
      writeFileSync(path.join(d, 'merges.txt'), MERGES);
      writeFileSync(path.join(d, 'tokenizer_config.json'), JSON.stringify({ pad_token: '!', model_max_length: 6 }));
      const t = await ClipTokenizer.fromDir(d);
      expect([t.padTokenId, t.maxLength]).toEqual([id('!'), 6]);
      expect([...t.encode('low').inputIds]).toEqual([BOS, 22, EOS, id('!'), id('!'), id('!')]);
      expect(t.encode('low').inputIds.length).toBe(6);
      expect((await ClipTokenizer.fromDir(d, { padTokenId: 0, maxLength: 4 })).encode('').inputIds).toEqual(
        Int32Array.from([BOS, EOS, 0, 0]),
      );
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  });

  it('reports a missing vocabulary or merges file with its path', async () => {
    const missing = path.join(dir, 'nope', 'vocab.json');
    const err = await ClipTokenizer.fromFiles(missing, path.join(dir, 'merges.txt')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SdtuneError);
    expect((err as SdtuneError).kind).toBe('file');
    expect((err as SdtuneError).message).toContain(missing);
    const emptyDir = mkdtempSync(path.join(tmpdir(), 'sdtune-tok-'));
    try {
      await expect(ClipTokenizer.fromDir(emptyDir)).rejects.toThrow(path.join(emptyDir, 'vocab.json'));
      writeFileSync(path.join(emptyDir, 'vocab.json'), '{"a": 0}');
      await expect(ClipTokenizer.fromDir(emptyDir)).rejects.toThrow(path.join(emptyDir, 'merges.txt'));
      writeFileSync(path.join(emptyDir, 'vocab.json'), '[1, 2]');
      await expect(ClipTokenizer.fromDir(emptyDir)).rejects.toMatchObject({ kind: 'format' });
      // in-memory files (a checkpoint's embedded tokenizer) are named by the caller
      expect(() => ClipTokenizer.fromTexts({ 'vocab.json': '{"a</w>": 0}' }, (n) => `m.safetensors (embedded ${n})`)).toThrow('tokenizer merges m.safetensors (embedded merges.txt): not found');
    } finally {
      rmSync(emptyDir, { recursive: true, force: true });
    }
  });
});

describe('CLIP text normalisation (ftfy subset)', () => {
  it('unescapes HTML entities unless the line contains <', () => {
    expect(fixText('html &amp; entities &lt;3')).toBe('html & entities <3');
    expect(fixText('&amp;lt;3 &EACUTE;t&eacute; &#x41;&#66; &#150; &apos;')).toBe("<3 Été AB \u2013 '");
    expect(fixText('<b>&amp;</b>')).toBe('<b>&amp;</b>');
    expect(fixText('a &amp;\n<b> &amp;\n&amp;')).toBe('a &\n<b> &amp;\n&amp;');
    expect(fixText('&checkmark; &bogus; &#59;')).toBe('&checkmark; &bogus; &#59;');
  });

  it('uncurls quotes, spells out ligatures, narrows full-width forms, drops controls, NFC', () => {
    expect(fixText('\u201cit\u2019s\u201d \ufb01ne \uff21\uff22\uff23\u3000x')).toBe('"it\'s" fine ABC x');
    expect(fixText('\u001b[31mred\u001b[0m a\u0000b\ufeff e\u0301 \u0096')).toBe('red ab \u00e9 \u2013');
    expect(fixText('a\r\nb\u2028c')).toBe('a\nb\nc');
  });

  it('collapses Unicode whitespace, trims and lower-cases', () => {
    expect(clipNormalize('  A\t\n B\u00a0\u2003C  ')).toBe('a b c');
    expect(clipNormalize('Caf\u00c9')).toBe('caf\u00e9');
  });
});

describeGolden('ClipTokenizer parity with the slow transformers CLIPTokenizer', () => {
  interface Prompt {
    i: number;
    prompt: string;
    tokens: string[];
    untruncated_len: number;
    truncated: boolean;
  }
  // read at collection time for it.each; without ../shared the suite is skipped and must still collect
  const c = (HAVE_GOLDEN ? goldenCase('tokenizer') : { prompts: [], special_tokens: {} }) as {
    prompts: Prompt[];
    special_tokens: Record<string, number>;
  };
  const file = golden('cases', 'tokenizer.safetensors');
  let tok: ClipTokenizer;
  beforeAll(async () => {
    tok = await ClipTokenizer.fromFiles(golden('clip-tokenizer', 'vocab.json'), golden('clip-tokenizer', 'merges.txt'));
  });

  it('has the SD v1 special tokens', () => {
    expect(tok.vocabSize).toBe(49408);
    expect([tok.bosTokenId, tok.eosTokenId, tok.padTokenId, tok.maxLength]).toEqual([
      c.special_tokens.bos,
      c.special_tokens.eos,
      c.special_tokens.pad,
      c.special_tokens.model_max_length,
    ]);
  });

  it.each(c.prompts.map((p) => [p.i, p] as const))('prompt %i', (_i, p) => {
    // the expected list holds BOS + tokens + EOS, cut short (without EOS) for the truncated prompt
    const expected = p.tokens.filter((t) => t !== '<|startoftext|>' && t !== '<|endoftext|>');
    const tokens = tok.tokenize(p.prompt);
    if (p.truncated) expect(tokens.slice(0, expected.length)).toEqual(expected);
    else expect(tokens).toEqual(expected);
    expect(tokens.length + 2).toBe(p.untruncated_len);
    const e = tok.encode(p.prompt);
    expect(e.inputIds).toEqual(readI32(file, `input_ids_${p.i}`));
    expect(e.attentionMask).toEqual(readI32(file, `attention_mask_${p.i}`));
    expect([e.untruncatedLength, e.truncated]).toEqual([p.untruncated_len, p.truncated]);
  });

  it('reads the same special tokens from a transformers-saved SD v1 folder', async () => {
    const t = await ClipTokenizer.fromDir(golden('tiny-sd', 'tokenizer'));
    expect([t.bosTokenId, t.eosTokenId, t.padTokenId, t.maxLength]).toEqual([49406, 49407, 49407, 77]);
    expect(t.encode(c.prompts[0]!.prompt).inputIds).toEqual(readI32(file, 'input_ids_0'));
  });

  it('uses pad "!" (id 0) for the SD 2 tokenizer', async () => {
    const t = await ClipTokenizer.fromDir(golden('tiny-sd2-depth', 'tokenizer'));
    expect(t.padTokenId).toBe(0);
    expect(t.tokenToId('!')).toBe(0);
    const e = t.encode('a cat');
    expect([...e.inputIds.slice(0, 5)]).toEqual([49406, 320, 2368, 49407, 0]);
    expect(e.inputIds[76]).toBe(0);
  });
});
