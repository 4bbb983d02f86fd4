/**
 * CLIP's byte-level BPE, a line-by-line port of the slow transformers CLIPTokenizer (`bytes_to_unicode`, the split
 * regex, `bpe()` with its `</w>` end-of-word suffix and its word cache). Input text must already be normalised
 * (see normalize.ts).
 */

/** GPT-2's reversible byte -> printable character table (bytes that are already printable map to themselves). */
export function bytesToUnicode(): string[] {
  const table: string[] = new Array(256);
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let n = 0;
  for (let b = 0; b < 256; b++) table[b] = String.fromCharCode(printable(b) ? b : 256 + n++);
  return table;
}

/**
 * CLIP's pre-tokenizer regex (re.IGNORECASE), with `\s` spelt as the Unicode White_Space property, which is what the
 * Python `regex` module's `\s` matches.
 */
export const CLIP_SPLIT_RE =
  /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\p{White_Space}\p{L}\p{N}]+/giu;

/** The end-of-word suffix carried by the last symbol of every word. */
export const END_OF_WORD = '</w>';

/** The slow tokenizer keeps at most this many merges (`split("\n")[1 : 49152 - 256 - 2 + 1]`). */
export const MAX_CLIP_MERGES = 49152 - 256 - 2;

/**
 * Parse merges.txt the way the slow tokenizer does: trim, drop the `#version` header, keep at most MAX_CLIP_MERGES
 * lines; a line that is not exactly two symbols can never match a pair and is skipped.
 */
export function parseMerges(text: string, maxMerges = MAX_CLIP_MERGES): Array<[string, string]> {
  const lines = text.trim().split('\n');
  const start = lines[0]?.startsWith('#version') ? 1 : 0;
  const merges: Array<[string, string]> = [];
  for (const line of lines.slice(start, start + maxMerges)) {
    const parts = line.trim().split(/\s+/);
    if (parts.length === 2) merges.push(parts as [string, string]);
  }
  return merges;
}

const BYTE_TABLE = bytesToUnicode();
const utf8 = new TextEncoder();
const CACHE_LIMIT = 100_000;

/** Byte-level BPE with merge ranks and a word cache (the `bpe()` of the slow CLIPTokenizer). */
export class ClipBpe {
  private readonly ranks = new Map<string, number>();
  private cache = new Map<string, string[]>();

  /** Ranks are the merges' order: a lower rank merges first. */
  constructor(merges: ReadonlyArray<readonly [string, string]>) {
    merges.forEach(([a, b], i) => {
      const key = `${a} ${b}`; // symbols never contain a space (the byte table maps 0x20 to 'Ġ')
      if (!this.ranks.has(key)) this.ranks.set(key, i);
    });
  }

  /** Number of distinct merges. */
  get size(): number {
    return this.ranks.size;
  }

  /** Split normalised text into words, map each word's UTF-8 bytes through the byte table, BPE each word. */
  tokenize(normalized: string): string[] {
    const out: string[] = [];
    for (const m of normalized.matchAll(CLIP_SPLIT_RE)) {
      let word = '';
      for (const b of utf8.encode(m[0])) word += BYTE_TABLE[b];
      for (const t of this.bpe(word)) out.push(t);
    }
    return out;
  }

  /** BPE of one byte-encoded word: repeatedly merge every occurrence of the lowest-ranked adjacent pair. */
  bpe(token: string): string[] {
    // The slow tokenizer pre-seeds its cache so the two special tokens come out whole and without `</w>`.
    if (token === '<|startoftext|>' || token === '<|endoftext|>') return [token];
    const cached = this.cache.get(token);
    if (cached) return cached;
    let word = Array.from(token);
    if (word.length === 0) return [];
    word[word.length - 1] += END_OF_WORD;
    while (word.length > 1) {
      let best = Infinity;
      let first = '';
      let second = '';
      for (let i = 0; i + 1 < word.length; i++) {
        const r = this.ranks.get(`${word[i]} ${word[i + 1]}`);
        if (r !== undefined && r < best) {
          best = r;
          first = word[i]!;
          second = word[i + 1]!;
        }
      }
      if (best === Infinity) break;
      const merged: string[] = [];
      for (let i = 0; i < word.length; ) {
        if (word[i] === first && i + 1 < word.length && word[i + 1] === second) {
          merged.push(first + second);
          i += 2;
        } else {
          merged.push(word[i++]!);
        }
      }
      word = merged;
    }
    if (this.cache.size >= CACHE_LIMIT) this.cache = new Map();
    this.cache.set(token, word);
    return word;
  }
}
