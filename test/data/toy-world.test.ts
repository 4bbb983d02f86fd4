// The toy world (shared/toyworld.md) as a data source: the images, captions and labels, determinism, options, the
// folder writer and `sdtune toy-world`, and the toy vocabulary (every world word one token).
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { scanDataset } from '../../src/data/dataset.js';
import { TOY_MAX_LENGTH, toyVocabulary, writeToyVocabulary } from '../../src/data/toy-vocab.js';
import {
  TOY_BASE_COLOURS, TOY_BASE_SHAPES, TOY_POSITION_PHRASE, TOY_RGB, TOY_WORDS, parseToyPrompt, renderToyImage, shapeCoverage,
  toyWorldImages, toyWorldStream, writeToyWorld,
} from '../../src/data/toy-world.js';
import { readImageRgb } from '../../src/io/png.js';
import { ClipTokenizer } from '../../src/tokenizer/clip.js';

const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/sdtune.js');
const sdtune = (...args: string[]) => {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
};
let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(tmpdir(), 'sdtune-toy-'));
});
afterAll(() => rm(tmp, { recursive: true, force: true }));

const CAPTION = /^a (?:(small|large) )?(red|green|blue|yellow|purple) (circle|square|triangle|star|heart)(?: (on the left|in the center|on the right))?$/;

describe('toy world images', () => {
  const items = toyWorldImages(2000, { seed: 7 });

  it('captions follow the grammar and agree with the labels; size word and position phrase each appear about half the time', () => {
    let sizeWords = 0;
    let phrases = 0;
    for (const { caption, labels } of items) {
      const m = CAPTION.exec(caption);
      expect(m, caption).not.toBeNull();
      if (m![1]) expect(m![1]).toBe(labels.size), sizeWords++;
      expect(m![2]).toBe(labels.colour);
      expect(m![3]).toBe(labels.shape);
      if (m![4]) expect(m![4]).toBe(TOY_POSITION_PHRASE[labels.position]), phrases++;
    }
    // binomial(2000, 0.5): sd 22, so +- 100 is > 4 sd
    expect(Math.abs(sizeWords - 1000)).toBeLessThan(100);
    expect(Math.abs(phrases - 1000)).toBeLessThan(100);
    // 4 colours x 4 shapes x 3 size variants x 4 position variants = 192 captions, all reached
    expect(new Set(items.map((x) => x.caption)).size).toBe(192);
  });

  it('draws only the base palette by default, every combination, with sizes, positions and jitter in range', () => {
    const seen = new Set(items.map((x) => `${x.labels.colour} ${x.labels.shape}`));
    expect(seen.size).toBe(16);
    for (const { labels: l } of items) {
      expect(TOY_BASE_COLOURS).toContain(l.colour);
      expect(TOY_BASE_SHAPES).toContain(l.shape);
      const r0 = l.size === 'small' ? 5.5 : 9;
      expect(l.radius).toBeGreaterThanOrEqual(r0 * 0.9);
      expect(l.radius).toBeLessThanOrEqual(r0 * 1.1);
      expect(Math.abs(l.cx - { left: 10, center: 16, right: 22 }[l.position])).toBeLessThanOrEqual(1.5);
      expect(Math.abs(l.cy - 16)).toBeLessThanOrEqual(2.5);
      l.rgb.forEach((v, c) => expect(Math.abs(v - TOY_RGB[l.colour][c]!)).toBeLessThanOrEqual(15));
    }
    // the jitter really is spread over [-15, 15]
    const dr = items.map((x) => x.labels.rgb[0] - TOY_RGB[x.labels.colour][0]);
    expect(Math.min(...dr)).toBe(-15);
    expect(Math.max(...dr)).toBe(15);
  });

  it('is deterministic from the seed, and a different seed gives different images', () => {
    const again = toyWorldImages(50, { seed: 7 });
    for (let i = 0; i < 50; i++) {
      expect(again[i]!.caption).toBe(items[i]!.caption);
      expect(Buffer.from(again[i]!.pixels).equals(Buffer.from(items[i]!.pixels))).toBe(true);
    }
    const other = toyWorldImages(50, { seed: 8 });
    expect(other.filter((x, i) => Buffer.from(x.pixels).equals(Buffer.from(items[i]!.pixels))).length).toBe(0);
    // the stream is endless and the same as the array
    const s = toyWorldStream({ seed: 7 });
    expect(s.next().value.caption).toBe(items[0]!.caption);
  });

  it('draws one anti-aliased shape on white: ink area matches the shape, edge pixels keep the hue', () => {
    const rgb = [220, 35, 35] as const;
    const img = renderToyImage('circle', rgb, 16.3, 15.8, 8);
    let ink = 0;
    let partial = 0;
    for (let p = 0; p < 32 * 32; p++) {
      const [r, g, b] = [img[3 * p]!, img[3 * p + 1]!, img[3 * p + 2]!];
      // every pixel is white mixed with the colour: g == b, and the mix fraction from both channels agrees
      expect(g).toBe(b);
      const a = (255 - g) / (255 - 35);
      expect(Math.abs((255 - r) / (255 - 220) - a)).toBeLessThan(0.2);
      ink += a;
      if (a > 0.02 && a < 0.98) partial++;
    }
    expect(Math.abs(ink - Math.PI * 64) / (Math.PI * 64)).toBeLessThan(0.01);
    expect(partial).toBeGreaterThan(30); // the rim is anti-aliased, not a hard edge
    // coverage is exact area in the limit: a unit square cell half covered by a square's edge
    const sq = shapeCoverage('square', 16, 16, 10 / 0.85, { supersample: 8 }); // half side 10: covers [6, 26)
    expect(sq[16 * 32 + 6]).toBe(1);
    expect(sq[16 * 32 + 5]).toBe(0);
    const half = shapeCoverage('square', 16.5, 16, 10 / 0.85, { supersample: 8 }); // covers [6.5, 26.5)
    expect(half[16 * 32 + 6]).toBe(0.5);
  });

  it('includes the held-out concepts on request, restricts to given colours/shapes, captions with a custom word', () => {
    const all = toyWorldImages(400, { seed: 1, include: ['purple', 'heart'] });
    expect(all.some((x) => x.labels.colour === 'purple')).toBe(true);
    expect(all.some((x) => x.labels.shape === 'heart')).toBe(true);
    expect(new Set(all.map((x) => x.labels.colour)).size).toBe(5);
    const hearts = toyWorldImages(40, { seed: 2, shapes: ['heart'], colours: ['red', 'purple'] });
    expect(new Set(hearts.map((x) => x.labels.shape))).toEqual(new Set(['heart']));
    expect(new Set(hearts.map((x) => x.labels.colour))).toEqual(new Set(['red', 'purple']));
    const sks = toyWorldImages(20, { seed: 3, colours: ['green'], shapes: ['star'], word: 'sks', sizeWordProbability: 0, positionPhraseProbability: 0 });
    expect(new Set(sks.map((x) => x.caption))).toEqual(new Set(['a sks']));
    expect(sks.every((x) => x.labels.colour === 'green' && x.labels.shape === 'star')).toBe(true);
    const phrased = toyWorldImages(50, { seed: 3, word: 'sks' });
    expect(phrased.every((x) => /^a (?:small |large )?sks(?: on the left| in the center| on the right)?$/.test(x.caption))).toBe(true);
    // the word option leaves the images alone: the stream stays aligned
    expect(Buffer.from(phrased[0]!.pixels).equals(Buffer.from(toyWorldImages(1, { seed: 3 })[0]!.pixels))).toBe(true);
  });

  it('refuses unknown concepts and bad options with one clear message', () => {
    expect(() => toyWorldImages(1, { include: ['pink'] })).toThrow(/cannot include "pink"; the held-out concepts are purple, heart/);
    expect(() => toyWorldImages(1, { colours: ['teal'] })).toThrow(/unknown colour "teal"/);
    expect(() => toyWorldImages(1, { shapes: [] })).toThrow(/list of shapes is empty/);
    expect(() => toyWorldImages(1, { word: 'two words' })).toThrow(/one word/);
    expect(() => toyWorldImages(1, { sizeWordProbability: 2 })).toThrow(/sizeWordProbability must be in \[0, 1\]/);
    expect(() => toyWorldStream({ seed: 1.5 })).toThrow(/seed must be an integer/);
  });

  it('parses the colour and shape a prompt names', () => {
    expect(parseToyPrompt('a large purple heart on the right')).toEqual({ colour: 'purple', shape: 'heart' });
    expect(parseToyPrompt('A RED circle')).toEqual({ colour: 'red', shape: 'circle' });
    expect(parseToyPrompt('a sks')).toEqual({ colour: undefined, shape: undefined });
  });
});

describe('toy world as a dataset folder', () => {
  it('writes PNG + caption files the dataset scanner reads, plus labels.jsonl; refuses a non-empty folder', async () => {
    const dir = path.join(tmp, 'world');
    await writeToyWorld(dir, 6, { seed: 5, include: ['heart'], quiet: true });
    const names = (await readdir(dir)).sort();
    expect(names).toEqual([...[0, 1, 2, 3, 4, 5].flatMap((i) => [`0000${i}.png`, `0000${i}.txt`]), 'labels.jsonl'].sort());
    const expected = toyWorldImages(6, { seed: 5, include: ['heart'] });
    const items = await scanDataset(dir, { captionExtension: '.txt', repeats: 1 });
    expect(items.map((x) => x.caption)).toEqual(expected.map((x) => x.caption));
    expect(items.every((x) => x.width === 32 && x.height === 32)).toBe(true);
    const png = await readImageRgb(path.join(dir, '00002.png'));
    expect(Buffer.from(png.data).equals(Buffer.from(expected[2]!.pixels))).toBe(true);
    const rows = (await readFile(path.join(dir, 'labels.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
    expect(rows[3]).toMatchObject({ file_name: '00003.png', caption: expected[3]!.caption, colour: expected[3]!.labels.colour, shape: expected[3]!.labels.shape });
    await expect(writeToyWorld(dir, 2, { quiet: true })).rejects.toThrow(/is not empty; choose another folder or pass --overwrite/);
    await writeToyWorld(dir, 2, { seed: 9, quiet: true, overwrite: true });
    expect((await readdir(dir)).length).toBe(5);
    expect((await readdir(tmp)).filter((n) => n.includes('.tmp-'))).toEqual([]); // no staging folder left behind
  });

  it('sdtune toy-world writes the folder; bad flags are one line with exit code 2', async () => {
    const dir = path.join(tmp, 'cli');
    const r = sdtune('toy-world', '--out', dir, '--count', '3', '--seed', '4', '--include', 'purple,heart', '--shapes', 'heart');
    expect(r.code, r.err).toBe(0);
    expect(r.out).toMatch(/wrote 3 images/);
    const want = toyWorldImages(3, { seed: 4, include: ['purple', 'heart'], shapes: ['heart'] });
    for (let i = 0; i < 3; i++) expect((await readFile(path.join(dir, `0000${i}.txt`), 'utf8')).trim()).toBe(want[i]!.caption);
    const again = sdtune('toy-world', '--out', dir, '--count', '3');
    expect(again.code).toBe(2);
    expect(again.err).toMatch(/^error: toy world: .* is not empty/m);
    const bad = sdtune('toy-world', '--out', path.join(tmp, 'bad'), '--count', '3', '--include', 'pink');
    expect(bad.code).toBe(2);
    expect(bad.err.trim()).toBe('error: toy world: cannot include "pink"; the held-out concepts are purple, heart');
  });
});

describe('toy vocabulary', () => {
  it('CLIP byte-level BPE: 512 byte symbols, merges, BOS/EOS; every world word one token through the ordinary tokenizer', async () => {
    const dir = path.join(tmp, 'tokenizer');
    const model = await writeToyVocabulary(dir);
    expect(await readdir(dir)).toEqual(expect.arrayContaining(['vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json']));
    expect(model.merges.length).toBe(63);
    expect(model.eosId + 1).toBe(577); // 512 + 63 merges + 2 specials (toyworld.md's word list gave 583)
    const tok = await ClipTokenizer.fromDir(dir);
    expect(tok.vocabSize).toBe(577);
    expect(tok.maxLength).toBe(TOY_MAX_LENGTH);
    expect(tok.padTokenId).toBe(tok.eosTokenId);
    expect(tok.bosTokenId).toBe(model.bosId);
    for (const w of TOY_WORDS) expect(tok.tokenize(w), w).toEqual([`${w}</w>`]);
    const enc = tok.encode('a small yellow triangle on the right');
    expect(Array.from(enc.inputIds)).toEqual([model.bosId, ...'a small yellow triangle on the right'.split(' ').map((w) => model.vocab[`${w}</w>`]!), ...Array(4).fill(model.eosId)]);
    expect(enc.truncated).toBe(false);
    // a word outside the world still tokenizes (bytes), it is just not one token
    expect(tok.tokenize('dog').length).toBeGreaterThan(1);
    // deterministic: the same files every time
    const again = path.join(tmp, 'tokenizer2');
    await writeToyVocabulary(again);
    for (const f of ['vocab.json', 'merges.txt']) expect(await readFile(path.join(again, f), 'utf8')).toBe(await readFile(path.join(dir, f), 'utf8'));
    expect(toyVocabulary().merges).toEqual(model.merges);
  });
});
