// A1111 prompt editing, alternation, AND and extra-network tags: the schedules of A1111's own doctests
// (modules/prompt_parser.py, v1.10), plus edge cases of the grammar.
import { describe, expect, it } from 'vitest';
import {
  MAX_PROMPT_NESTING,
  hypernetFromTag,
  loraFromTag,
  parseExtraNetworks,
  promptSchedule,
  scheduleIndexAt,
  splitAnd,
} from '../../src/tokenizer/prompt-schedule.js';

const g = (p: string, steps = 10, legacy = false) => promptSchedule(p, steps, { legacy }).map((e) => [e.end, e.text]);

describe('promptSchedule (get_learned_conditioning_prompt_schedules)', () => {
  it("A1111's doctests, 10 steps", () => {
    expect(g('test')).toEqual([[10, 'test']]);
    expect(g('a [b:3]')).toEqual([[3, 'a '], [10, 'a b']]);
    expect(g('a [b: 3]')).toEqual([[3, 'a '], [10, 'a b']]);
    expect(g('a [[[b]]:2]')).toEqual([[2, 'a '], [10, 'a [[b]]']]);
    expect(g('[(a:2):3]')).toEqual([[3, ''], [10, '(a:2)']]);
    expect(g('a [b : c : 1] d')).toEqual([[1, 'a b  d'], [10, 'a  c  d']]);
    expect(g('a[b:[c:d:2]:1]e')).toEqual([[1, 'abe'], [2, 'ace'], [10, 'ade']]);
    expect(g('a [unbalanced')).toEqual([[10, 'a [unbalanced']]);
    expect(g('a [b:.5] c')).toEqual([[5, 'a  c'], [10, 'a b c']]);
    // A1111's doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"); its grammar under lark
    // 1.3.1 rejects the `|` outside an alternation and keeps the prompt as it is, as we do
    expect(g('a [{b|d{:.5] c')).toEqual([[10, 'a [{b|d{:.5] c']]);
    expect(g('((a][:b:c [d:3]')).toEqual([[3, '((a][:b:c '], [10, '((a][:b:c d']]);
    expect(g('[a|(b:1.1)]')).toEqual(Array.from({ length: 10 }, (_, i) => [i + 1, i % 2 ? '(b:1.1)' : 'a']));
    expect(g('[fe|]male')).toEqual(Array.from({ length: 10 }, (_, i) => [i + 1, i % 2 ? 'male' : 'female']));
    expect(g('[fe|||]male')).toEqual(Array.from({ length: 10 }, (_, i) => [i + 1, i % 4 ? 'male' : 'female']));
  });

  it('the example at the top of prompt_parser.py (100 steps)', () => {
    const p = 'fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]';
    expect(g(p, 100)).toEqual([
      [25, 'fantasy landscape with a mountain and an oak in foreground shoddy'],
      [50, 'fantasy landscape with a lake and an oak in foreground in background shoddy'],
      [60, 'fantasy landscape with a lake and an oak in foreground in background masterful'],
      [75, 'fantasy landscape with a lake and an oak in background masterful'],
      [100, 'fantasy landscape with a lake and a christmas tree in background masterful'],
    ]);
  });

  it('`when`: a number with a point is a fraction, without one a step; clamped to the steps; < 1 adds no change', () => {
    expect(g('[a:b:0.5]', 30)).toEqual([[15, 'a'], [30, 'b']]);
    expect(g('[a:b:0.55]', 30)).toEqual([[16, 'a'], [30, 'b']]); // int(16.5)
    expect(g('[a:b:12]', 30)).toEqual([[12, 'a'], [30, 'b']]);
    expect(g('[a:b:50]', 30)).toEqual([[30, 'a']]); // min(steps, 50): never switches
    expect(g('[a:b:1.5]', 30)).toEqual([[30, 'a']]); // 1.5·30 clamps to 30 (current A1111); the legacy rule says step 1
    expect(g('[a:b:1.5]', 30, true)).toEqual([[1, 'a'], [30, 'b']]);
    expect(g('[a:b:0]', 30)).toEqual([[30, 'b']]); // 0: `from` is never used
    expect(g('[a:b:-3]', 30)).toEqual([[30, 'b']]);
    expect(g('[a:b:1e1]', 30)).toEqual([[10, 'a'], [30, 'b']]); // lark SIGNED_NUMBER, no point: a step
    expect(g('[a:b:0.5]', 1)).toEqual([[1, 'b']]); // int(0.5) = 0
    expect(g('[a::0.5] c', 4)).toEqual([[2, 'a c'], [4, ' c']]);
  });

  it('what does not parse stays literal: top-level |, a trailing backslash, malformed brackets', () => {
    expect(g('a | b [c:d:2]')).toEqual([[10, 'a | b [c:d:2]']]); // `|` outside a group fails the whole parse
    expect(g('[c:d:2] \\')).toEqual([[10, '[c:d:2] \\']]);
    expect(g('[a:b] [c:d:2]')).toEqual([[2, '[a:b] c'], [10, '[a:b] d']]); // [a:b] is not a group: its brackets are text
    expect(g('(a:b:c) [c:d:2]')).toEqual([[2, '(a:b:c) c'], [10, '(a:b:c) d']]);
    expect(g('\\[c:d:2\\]')).toEqual([[10, '\\[c:d:2\\]']]); // escaped brackets are plain text
    expect(g('[x:(a:b:c):2]')).toEqual([[10, '[x:(a:b:c):2]']]); // a bad group inside fails the outer one
  });

  it('emphasis, alternation and editing nest; alternation inside editing', () => {
    expect(g('(a [b|c]:1.2)', 3)).toEqual([[1, '(a b:1.2)'], [2, '(a c:1.2)'], [3, '(a b:1.2)']]);
    expect(g('[[x|y]:z:2]', 4)).toEqual([[1, 'x'], [2, 'y'], [3, 'z'], [4, 'z']]);
  });

  it('linear time on hostile input; deep nesting is refused with a clear error', () => {
    const many = '[('.repeat(20_000) + 'x';
    expect(() => g(many)).toThrow(/nest deeper than/);
    const wide = '[a:b:2] '.repeat(20_000) + '(x ['.repeat(50) + '|';
    expect(g(wide)).toEqual([[10, wide]]);
    const flat = '[a|b]'.repeat(5_000);
    expect(g(flat, 3).map((e) => (e[1] as string).length)).toEqual([5_000, 5_000, 5_000]);
    expect(() => g('('.repeat(MAX_PROMPT_NESTING) + 'x' + ')'.repeat(MAX_PROMPT_NESTING))).not.toThrow();
  });

  it('scheduleIndexAt: the first entry with end >= the 0-based sampler call (A1111 reconstruct_cond_batch)', () => {
    const s = promptSchedule('[a:b:0.5]', 10); // [[5, a], [10, b]]
    expect(Array.from({ length: 10 }, (_, i) => s[scheduleIndexAt(s, i)]!.text).join('')).toBe('aaaaaabbbb');
    const alt = promptSchedule('[a|b]', 6);
    expect(Array.from({ length: 6 }, (_, i) => alt[scheduleIndexAt(alt, i)]!.text).join('')).toBe('aababa');
    expect(scheduleIndexAt(s, 11)).toBe(0); // past the end: the first entry, as A1111
  });
});

describe('splitAnd (get_multicond_prompt_list)', () => {
  it('weights, spaces, no AND, AND inside words', () => {
    expect(splitAnd('a cat :1.2 AND a dog :0.8')).toEqual([{ text: 'a cat', weight: 1.2 }, { text: ' a dog', weight: 0.8 }]);
    expect(splitAnd('a cat AND a dog')).toEqual([{ text: 'a cat', weight: 1 }, { text: ' a dog', weight: 1 }]);
    expect(splitAnd('plain prompt  ')).toEqual([{ text: 'plain prompt', weight: 1 }]);
    expect(splitAnd('ratio 16:9')).toEqual([{ text: 'ratio 16', weight: 9 }]); // A1111 reads a trailing :number as a weight
    expect(splitAnd('ANDROID and BAND')).toEqual([{ text: 'ANDROID and BAND', weight: 1 }]);
    expect(splitAnd('x: -.5 ')).toEqual([{ text: 'x', weight: -0.5 }]);
    expect(splitAnd('(a:1.2)')).toEqual([{ text: '(a:1.2)', weight: 1 }]);
    expect(splitAnd('a:1.2.3')).toEqual([{ text: 'a:1.2.3', weight: 1 }]);
    expect(splitAnd('a ANDb AND c:2')).toEqual([{ text: 'a ANDb', weight: 1 }, { text: ' c', weight: 2 }]);
    expect(splitAnd('')).toEqual([{ text: '', weight: 1 }]);
  });
});

describe('extra-network tags (extra_networks.parse_prompt)', () => {
  it('removes every <kind:args> and returns them in order', () => {
    const r = parseExtraNetworks('a <lora:cat:0.7> photo<hypernet:anime>, <lora:b:0.5:0.25> <notatag> <x:> <lora:te=0.3:unet=2:c>');
    expect(r.text).toBe('a  photo,  <notatag> <x:> ');
    expect(r.tags.map((t) => [t.kind, t.items])).toEqual([
      ['lora', ['cat', '0.7']],
      ['hypernet', ['anime']],
      ['lora', ['b', '0.5', '0.25']],
      ['lora', ['te=0.3', 'unet=2', 'c']],
    ]);
    expect(loraFromTag(r.tags[3]!)).toMatchObject({ name: 'c', te: 0.3, unet: 2 }); // named items are not positional
  });

  it('LoRA multipliers as A1111 reads them', () => {
    const lora = (p: string) => {
      const { name, te, unet } = loraFromTag(parseExtraNetworks(p).tags[0]!);
      return [name, te, unet];
    };
    expect(lora('<lora:cat>')).toEqual(['cat', 1, 1]);
    expect(lora('<lora:cat:0.7>')).toEqual(['cat', 0.7, 0.7]);
    expect(lora('<lora:cat:0.7:0.2>')).toEqual(['cat', 0.7, 0.2]);
    expect(lora('<lora:cat:te=0.5>')).toEqual(['cat', 0.5, 0.5]);
    expect(lora('<lora:cat:unet=0.5>')).toEqual(['cat', 1, 0.5]);
    expect(lora('<lora:cat:1: 0.25 :te=0>')).toEqual(['cat', 0, 0.25]);
    expect(() => lora('<lora:cat:abc>')).toThrow(/<lora:cat:abc>: the text-encoder multiplier "abc" is not a number/);
    expect(() => lora('<lora:cat:1:1:8>')).toThrow(/dyn/);
    expect(() => lora('<lora:te=1>')).toThrow(/no LoRA name/);
    const h = hypernetFromTag(parseExtraNetworks('<hypernet:anime:0.6>').tags[0]!);
    expect([h.name, h.strength]).toEqual(['anime', 0.6]);
    expect(hypernetFromTag(parseExtraNetworks('<hypernet:anime>').tags[0]!).strength).toBe(1);
  });

  it('linear on many "<" without ">"', () => {
    const s = '<a:'.repeat(50_000);
    expect(parseExtraNetworks(s)).toEqual({ text: s, tags: [] });
  });
});
