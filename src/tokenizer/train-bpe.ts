/**
 * A small, exact byte-level BPE trainer that writes CLIP's tokenizer format (what bpe.ts / clip.ts read), used to
 * build the bundled tiny model's vocabulary from our own word corpus.
 *
 * Words are pre-tokenized as CLIP does it (clipNormalize, then CLIP's split regex); each word becomes its UTF-8 bytes
 * through GPT-2's byte table with `</w>` on the last symbol. Training is classic BPE over the word-frequency table:
 * repeatedly merge the adjacent symbol pair with the highest total count (count = sum of the frequencies of the words
 * it occurs in, once per occurrence), every occurrence in every word, left to right. Ties go to the pair that sorts
 * first (first symbol, then second, by UTF-16 code units), so the result depends only on the corpus and the options.
 *
 * The vocabulary is CLIP's: the 256 byte symbols in code-point order, the same 256 with `</w>`, one entry per merge
 * result in merge order (a result already in the vocabulary keeps its first id, so ids stay dense), then
 * `<|startoftext|>` and `<|endoftext|>`.
 */
import { CLIP_SPLIT_RE, END_OF_WORD, bytesToUnicode } from './bpe.js';
import { clipNormalize } from './normalize.js';

/** CLIP's begin-of-text token, the first entry after the merges. */
export const CLIP_BOS = '<|startoftext|>';
/** CLIP's end-of-text token (eos, pad and unk in SD v1), the last entry of the vocabulary. */
export const CLIP_EOS = '<|endoftext|>';

/** When training stops. */
export interface TrainBpeOptions {
  /** Stop after this many merges (default: no limit). */
  maxMerges?: number;
  /** Stop when the best pair occurs fewer times than this (default 2; 1 merges until every word is one symbol). */
  minFrequency?: number;
}

/** A trained BPE: what vocab.json and merges.txt hold, plus the special ids. */
export interface BpeModel {
  /** Merges in rank order (line order of merges.txt). */
  merges: Array<[string, string]>;
  /** token -> id, CLIP's layout (see the module comment). */
  vocab: Record<string, number>;
  /** id of `<|startoftext|>` */
  bosId: number;
  /** id of `<|endoftext|>` (also eos, pad and unk in SD v1) */
  eosId: number;
}

const BYTE_TABLE = bytesToUnicode();
const utf8 = new TextEncoder();

/** Word frequencies of a text, split exactly as CLIP's tokenizer splits it (comment lines starting with `#` skipped). */
export function countWords(text: string, counts = new Map<string, number>()): Map<string, number> {
  for (const line of text.split('\n')) {
    if (line.trimStart().startsWith('#')) continue;
    for (const m of clipNormalize(line).matchAll(CLIP_SPLIT_RE)) {
      const w = m[0];
      if (w === CLIP_BOS || w === CLIP_EOS) continue;
      counts.set(w, (counts.get(w) ?? 0) + 1);
    }
  }
  return counts;
}

/** A word as byte symbols with `</w>` on the last one (what ClipBpe.bpe starts from). */
export function wordSymbols(word: string): string[] {
  const s = Array.from(utf8.encode(word), (b) => BYTE_TABLE[b]!);
  if (s.length) s[s.length - 1] += END_OF_WORD;
  return s;
}

/** The 512 base tokens in CLIP's order: byte symbols by code point, then each with `</w>`. */
export function baseVocabulary(): string[] {
  const bytes = [...BYTE_TABLE].sort((a, b) => a.charCodeAt(0) - b.charCodeAt(0));
  return [...bytes, ...bytes.map((s) => s + END_OF_WORD)];
}

// ---- a max-heap of (count, first, second) with lazy invalidation ------------------------------------------------
interface Entry {
  count: number;
  a: string;
  b: string;
}
/** true when x should be merged before y: higher count, then smaller first symbol, then smaller second symbol. */
const before = (x: Entry, y: Entry) => x.count > y.count || (x.count === y.count && (x.a < y.a || (x.a === y.a && x.b < y.b)));

class PairHeap {
  private readonly h: Entry[] = [];
  push(e: Entry): void {
    const h = this.h;
    let i = h.push(e) - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }
  peek(): Entry | undefined {
    return this.h[0];
  }
  pop(): void {
    const h = this.h;
    const last = h.pop()!;
    if (!h.length) return;
    h[0] = last;
    for (let i = 0; ; ) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < h.length && before(h[l]!, h[m]!)) m = l;
      if (r < h.length && before(h[r]!, h[m]!)) m = r;
      if (m === i) break;
      [h[i], h[m]] = [h[m]!, h[i]!];
      i = m;
    }
  }
}

/** Merge every occurrence of (a, b) in a symbol list, left to right (as ClipBpe.bpe does). */
function mergePair(word: string[], a: string, b: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < word.length; ) {
    if (word[i] === a && i + 1 < word.length && word[i + 1] === b) {
      out.push(a + b);
      i += 2;
    } else out.push(word[i++]!);
  }
  return out;
}

/** Train CLIP-format BPE on a word-frequency table (words as CLIP's regex yields them); see the module comment. */
export function trainBpe(words: ReadonlyMap<string, number> | Iterable<[string, number]>, opts: TrainBpeOptions = {}): BpeModel {
  const maxMerges = opts.maxMerges ?? Infinity;
  const minFrequency = Math.max(1, opts.minFrequency ?? 2);
  // Sorted so that nothing (not even Map insertion order) depends on how the table was built.
  const table = [...words].filter(([w, n]) => w.length > 0 && n > 0).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0));
  const syms = table.map(([w]) => wordSymbols(w));
  const freq = table.map(([, n]) => n);

  const counts = new Map<string, number>();
  const where = new Map<string, Set<number>>();
  const heap = new PairHeap();
  const key = (a: string, b: string) => `${a} ${b}`; // symbols never contain a space (0x20 maps to 'Ġ')
  const account = (w: number, sign: 1 | -1, touched: Set<string>) => {
    const s = syms[w]!;
    for (let i = 0; i + 1 < s.length; i++) {
      const k = key(s[i]!, s[i + 1]!);
      counts.set(k, (counts.get(k) ?? 0) + sign * freq[w]!);
      if (sign > 0) {
        let set = where.get(k);
        if (!set) where.set(k, (set = new Set()));
        set.add(w);
      } else where.get(k)?.delete(w);
      touched.add(k);
    }
  };
  const publish = (touched: Set<string>) => {
    for (const k of touched) {
      const c = counts.get(k)!;
      if (c <= 0) {
        counts.delete(k);
        where.delete(k);
      } else {
        const sp = k.indexOf(' ');
        heap.push({ count: c, a: k.slice(0, sp), b: k.slice(sp + 1) });
      }
    }
  };
  const all = new Set<string>();
  for (let w = 0; w < syms.length; w++) account(w, 1, all);
  publish(all);

  const merges: Array<[string, string]> = [];
  while (merges.length < maxMerges) {
    const top = heap.peek();
    if (!top) break;
    const k = key(top.a, top.b);
    if (counts.get(k) !== top.count) {
      heap.pop(); // stale: the pair's count changed (a fresh entry was pushed) or it is gone
      continue;
    }
    if (top.count < minFrequency) break;
    heap.pop();
    merges.push([top.a, top.b]);
    const touched = new Set<string>();
    for (const w of [...where.get(k)!]) {
      account(w, -1, touched);
      syms[w] = mergePair(syms[w]!, top.a, top.b);
      account(w, 1, touched);
    }
    publish(touched);
  }

  const tokens = baseVocabulary();
  for (const [a, b] of merges) tokens.push(a + b);
  const vocab: Record<string, number> = Object.create(null); // no prototype: any token string is a plain key
  let next = 0;
  for (const t of tokens) if (!Object.hasOwn(vocab, t)) vocab[t] = next++;
  const bosId = next++;
  const eosId = next++;
  vocab[CLIP_BOS] = bosId;
  vocab[CLIP_EOS] = eosId;
  return { merges, vocab, bosId, eosId };
}

/**
 * JSON as transformers writes tokenizer files (`json.dumps(v, indent=2, sort_keys=True, ensure_ascii=False) + "\n"`).
 * Serialised by hand: a JS object would put integer-like keys ("0".."9") first, Python sorts them among the others.
 */
export function transformersJson(v: unknown): string {
  const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
  const dump = (x: unknown, pad: string): string => {
    const inner = pad + '  ';
    if (Array.isArray(x)) return x.length ? `[\n${x.map((y) => inner + dump(y, inner)).join(',\n')}\n${pad}]` : '[]';
    if (x !== null && typeof x === 'object') {
      const entries = Object.entries(x as Record<string, unknown>).sort(([a], [b]) => cmp(a, b));
      return entries.length ? `{\n${entries.map(([k, y]) => `${inner}${JSON.stringify(k)}: ${dump(y, inner)}`).join(',\n')}\n${pad}}` : '{}';
    }
    return JSON.stringify(x);
  };
  return dump(v, '') + '\n';
}

/** merges.txt as CLIPTokenizer.save_vocabulary writes it: `#version: 0.2` header, one `a b` line per merge. */
export function mergesText(merges: ReadonlyArray<readonly [string, string]>): string {
  return ['#version: 0.2', ...merges.map(([a, b]) => `${a} ${b}`)].join('\n') + '\n';
}

/** transformers' AddedToken dict for a special token, as it appears in the saved files. */
const addedToken = (content: string) => ({ content, lstrip: false, normalized: true, rstrip: false, single_word: false });

/**
 * The files of a transformers CLIPTokenizer folder as SD v1 ships it (pad = unk = eos = `<|endoftext|>`):
 * vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.
 */
export function clipTokenizerFiles(model: BpeModel, opts: { modelMaxLength?: number } = {}): Record<string, string> {
  const tokenizerConfig = {
    added_tokens_decoder: {
      [String(model.bosId)]: { ...addedToken(CLIP_BOS), special: true },
      [String(model.eosId)]: { ...addedToken(CLIP_EOS), special: true },
    },
    bos_token: CLIP_BOS,
    clean_up_tokenization_spaces: false,
    eos_token: CLIP_EOS,
    errors: 'replace',
    extra_special_tokens: {},
    model_max_length: opts.modelMaxLength ?? 77,
    pad_token: CLIP_EOS,
    tokenizer_class: 'CLIPTokenizer',
    unk_token: CLIP_EOS,
  };
  const specialTokensMap = { bos_token: addedToken(CLIP_BOS), eos_token: addedToken(CLIP_EOS), pad_token: CLIP_EOS, unk_token: addedToken(CLIP_EOS) };
  return {
    'merges.txt': mergesText(model.merges),
    'special_tokens_map.json': transformersJson(specialTokensMap),
    'tokenizer_config.json': transformersJson(tokenizerConfig),
    'vocab.json': transformersJson(model.vocab),
  };
}
