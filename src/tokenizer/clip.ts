/**
 * The CLIP tokenizer of Stable Diffusion, with exact parity with the slow transformers CLIPTokenizer (ftfy installed):
 * added/special tokens are split out of the raw text first (case-sensitive, longest match), every other chunk is
 * normalised (normalize.ts: ftfy subset, whitespace collapse, lower-case), split with CLIP's regex and byte-level BPE'd
 * (bpe.ts). `encode` gives BOS + ids + EOS truncated to maxLength and padded with the pad token, as
 * `tokenizer(text, padding="max_length", max_length=77, truncation=True)` does.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError } from '../errors.js';
import { ClipBpe, parseMerges } from './bpe.js';
import { clipNormalize } from './normalize.js';

export interface ClipTokenizerOptions {
  /** Default: id of the config's bos_token, `<|startoftext|>` (49406). */
  bosTokenId?: number;
  /** Default: id of the config's eos_token, `<|endoftext|>` (49407). */
  eosTokenId?: number;
  /** Default: id of the config's pad_token (SD v1 `<|endoftext|>` = eos; SD 2 `!` = 0), else eos. */
  padTokenId?: number;
  /** Default: the config's model_max_length, else defaultMaxLength. */
  maxLength?: number;
  /** The window when neither maxLength nor the config's model_max_length gives one (default 77; a model loader passes
   *  its text encoder's max_position_embeddings). */
  defaultMaxLength?: number;
}

export interface Encoded {
  /** BOS + ids + EOS, truncated and padded to maxLength. */
  inputIds: Int32Array;
  /** 1 on BOS..EOS, 0 on padding. */
  attentionMask: Int32Array;
  /** tokens lost to truncation */
  truncated: boolean;
  /** length before truncation incl. BOS/EOS */
  untruncatedLength: number;
}

/** Special token strings as found in tokenizer_config.json / special_tokens_map.json (defaults: CLIP's). */
export interface ClipSpecialTokens {
  bos?: string;
  eos?: string;
  pad?: string;
  unk?: string;
  /** Extra added tokens with fixed ids (tokenizer_config.json `added_tokens_decoder`, added_tokens.json). */
  added?: Array<{ content: string; id: number }>;
  maxLength?: number;
}

const DEFAULT_MAX_LENGTH = 77;

async function readText(file: string, what: string, optional = false): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (optional && code === 'ENOENT') return undefined;
    const why = code === 'ENOENT' ? 'not found' : `unreadable (${code ?? (e as Error).message})`;
    throw new SdtuneError('file', `tokenizer ${what} ${file}: ${why}`);
  }
}

function parseJson(text: string, file: string, what: string): unknown {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new SdtuneError('format', `tokenizer ${what} ${file}: invalid JSON (${(e as Error).message})`);
  }
}

function parseVocab(text: string, file: string): Record<string, number> {
  const json = parseJson(text, file, 'vocabulary');
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new SdtuneError('format', `tokenizer vocabulary ${file}: expected a JSON object {token: id}`);
  }
  for (const [token, id] of Object.entries(json)) {
    if (!Number.isInteger(id) || (id as number) < 0) {
      throw new SdtuneError('format', `tokenizer vocabulary ${file}: id of ${JSON.stringify(token)} is not a non-negative integer`);
    }
  }
  return json as Record<string, number>;
}

/** An optional JSON object file: undefined when absent, an error when present but malformed. */
function parseOptionalJson(text: string | undefined, file: string, what: string): Record<string, unknown> | undefined {
  if (text === undefined) return undefined;
  const json = parseJson(text, file, what);
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new SdtuneError('format', `tokenizer ${what} ${file}: expected a JSON object`);
  }
  return json as Record<string, unknown>;
}

/**
 * The files of a saved CLIPTokenizer that this tokenizer reads (vocab.json and merges.txt required), with what
 * each is called in messages. A single-file checkpoint written by sdtune carries exactly these (convert.ts).
 */
export const TOKENIZER_FILES = {
  'vocab.json': 'vocabulary',
  'merges.txt': 'merges',
  'tokenizer_config.json': 'config',
  'special_tokens_map.json': 'special tokens map',
  'added_tokens.json': 'added tokens',
} as const;
export type TokenizerFileName = keyof typeof TOKENIZER_FILES;

/** A special token entry is either a string or an AddedToken dict {content, ...}. */
function tokenContent(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') {
    return (v as { content: string }).content;
  }
  return undefined;
}

/** Special tokens from transformers' saved files; special_tokens_map.json wins over tokenizer_config.json, as in HF. */
function specialsFromConfig(
  config: Record<string, unknown> | undefined,
  map: Record<string, unknown> | undefined,
  addedJson: Record<string, unknown> | undefined,
): ClipSpecialTokens {
  const pick = (key: string) => tokenContent(map?.[key]) ?? tokenContent(config?.[key]);
  const added: Array<{ content: string; id: number }> = [];
  const decoder = config?.added_tokens_decoder;
  if (decoder && typeof decoder === 'object') {
    for (const [id, tok] of Object.entries(decoder as Record<string, unknown>)) {
      const content = tokenContent(tok);
      if (content !== undefined && /^\d+$/.test(id)) added.push({ content, id: Number(id) });
    }
  }
  for (const [content, id] of Object.entries(addedJson ?? {})) {
    if (Number.isInteger(id)) added.push({ content, id: id as number });
  }
  const mml = config?.model_max_length;
  const maxLength = typeof mml === 'number' && Number.isInteger(mml) && mml >= 2 && mml <= 1_000_000 ? mml : undefined;
  return { bos: pick('bos_token'), eos: pick('eos_token'), pad: pick('pad_token'), unk: pick('unk_token'), added, maxLength };
}

export class ClipTokenizer {
  /** Entries of vocab.json (added tokens not counted), like transformers' `vocab_size`. */
  readonly vocabSize: number;
  readonly bosTokenId: number;
  readonly eosTokenId: number;
  readonly padTokenId: number;
  readonly unkTokenId: number;
  readonly maxLength: number;

  private readonly vocab: Map<string, number>;
  private readonly idToVocab = new Map<number, string>();
  private readonly bpe: ClipBpe;
  /** Tokens matched verbatim on the raw text before normalisation (special tokens + added tokens). */
  private readonly added = new Map<string, number>();
  private readonly addedById = new Map<number, string>();
  /** Added tokens grouped by first character, longest first, for the left-to-right split. */
  private readonly addedByFirst = new Map<string, string[]>();
  private nextId: number;

  /** Reads vocab.json + merges.txt, and the pad/special tokens from tokenizer_config.json / special_tokens_map.json if present. */
  static async fromDir(dir: string, opts: ClipTokenizerOptions = {}): Promise<ClipTokenizer> {
    const texts: Partial<Record<TokenizerFileName, string>> = {};
    for (const [name, what] of Object.entries(TOKENIZER_FILES) as [TokenizerFileName, string][]) {
      const t = await readText(path.join(dir, name), what, true); // a missing required file: fromTexts says so, in order
      if (t !== undefined) texts[name] = t;
    }
    return ClipTokenizer.fromTexts(texts, (name) => path.join(dir, name), opts);
  }

  /**
   * The same from file contents held in memory (e.g. embedded in a checkpoint's metadata); `where(name)` names a
   * file in messages. vocab.json and merges.txt are required.
   */
  static fromTexts(
    texts: Partial<Record<TokenizerFileName, string>>,
    where: (name: TokenizerFileName) => string,
    opts: ClipTokenizerOptions = {},
  ): ClipTokenizer {
    const required = (name: 'vocab.json' | 'merges.txt') => {
      const text = texts[name];
      if (text === undefined) throw new SdtuneError('file', `tokenizer ${TOKENIZER_FILES[name]} ${where(name)}: not found`);
      return text;
    };
    const vocab = parseVocab(required('vocab.json'), where('vocab.json'));
    const merges = parseMerges(required('merges.txt'));
    const json = (name: Exclude<TokenizerFileName, 'vocab.json' | 'merges.txt'>) => parseOptionalJson(texts[name], where(name), TOKENIZER_FILES[name]);
    const specials = specialsFromConfig(json('tokenizer_config.json'), json('special_tokens_map.json'), json('added_tokens.json'));
    return new ClipTokenizer(vocab, merges, opts, specials);
  }

  /** Reads a vocab.json + merges.txt pair with CLIP's default special tokens (pad = eos). */
  static async fromFiles(vocabPath: string, mergesPath: string, opts: ClipTokenizerOptions = {}): Promise<ClipTokenizer> {
    return new ClipTokenizer(parseVocab((await readText(vocabPath, 'vocabulary'))!, vocabPath), parseMerges((await readText(mergesPath, 'merges'))!), opts);
  }

  /** Builds a tokenizer from in-memory data (vocab {token: id}, merges in rank order). */
  constructor(
    vocab: Record<string, number>,
    merges: ReadonlyArray<readonly [string, string]>,
    opts: ClipTokenizerOptions = {},
    specials: ClipSpecialTokens = {},
  ) {
    this.vocab = new Map(Object.entries(vocab));
    this.vocabSize = this.vocab.size;
    for (const [t, id] of this.vocab) if (!this.idToVocab.has(id)) this.idToVocab.set(id, t);
    this.bpe = new ClipBpe(merges);
    let maxId = -1;
    for (const id of this.vocab.values()) maxId = Math.max(maxId, id);
    this.nextId = Math.max(this.vocabSize, maxId + 1);

    const bos = specials.bos ?? '<|startoftext|>';
    const eos = specials.eos ?? '<|endoftext|>';
    const unk = specials.unk ?? '<|endoftext|>';
    const pad = specials.pad ?? eos;
    for (const { content, id } of specials.added ?? []) this.register(content, id);
    // transformers registers every special token as an added token (matched verbatim, never BPE'd).
    for (const t of [bos, eos, unk, pad]) if (!this.added.has(t)) this.register(t, this.vocab.get(t) ?? this.nextId);

    const idOf = (option: number | undefined, token: string, role: string): number => {
      const id = option ?? this.tokenToId(token);
      if (id === undefined || !Number.isInteger(id) || id < 0) {
        throw new SdtuneError('format', `tokenizer: no id for the ${role} token ${JSON.stringify(token)}`);
      }
      return id;
    };
    this.bosTokenId = idOf(opts.bosTokenId, bos, 'bos');
    this.eosTokenId = idOf(opts.eosTokenId, eos, 'eos');
    this.unkTokenId = idOf(undefined, unk, 'unk');
    this.padTokenId = opts.padTokenId ?? this.tokenToId(pad) ?? this.eosTokenId;
    this.maxLength = opts.maxLength ?? specials.maxLength ?? opts.defaultMaxLength ?? DEFAULT_MAX_LENGTH;
    if (!Number.isInteger(this.maxLength) || this.maxLength < 2) {
      throw new SdtuneError('usage', `tokenizer: maxLength must be an integer >= 2 (room for BOS and EOS), got ${this.maxLength}`);
    }
  }

  /** Total number of ids including added tokens, like `len(tokenizer)` in transformers. */
  get size(): number {
    return this.nextId;
  }

  private register(content: string, id: number): void {
    if (content.length === 0) throw new SdtuneError('usage', 'tokenizer: an added token cannot be empty');
    this.added.set(content, id);
    if (!this.addedById.has(id)) this.addedById.set(id, content);
    this.nextId = Math.max(this.nextId, id + 1);
    const first = content[0]!;
    const list = [...(this.addedByFirst.get(first) ?? []), content].sort((a, b) => b.length - a.length);
    this.addedByFirst.set(first, list);
  }

  /** Raw text -> chunks, each either an added token (verbatim, case-sensitive) or text to normalise and BPE. */
  private splitAdded(text: string): Array<{ text: string; added: boolean }> {
    const out: Array<{ text: string; added: boolean }> = [];
    let start = 0;
    for (let i = 0; i < text.length; ) {
      const match = this.addedByFirst.get(text[i]!)?.find((t) => text.startsWith(t, i));
      if (match === undefined) {
        i++;
        continue;
      }
      if (i > start) out.push({ text: text.slice(start, i), added: false });
      out.push({ text: match, added: true });
      i += match.length;
      start = i;
    }
    if (start < text.length) out.push({ text: text.slice(start), added: false });
    return out;
  }

  /** BPE token strings of a text, no BOS/EOS (e.g. ["a</w>", "photo</w>"]); added tokens come out verbatim. */
  tokenize(text: string): string[] {
    const out: string[] = [];
    for (const chunk of this.splitAdded(text)) {
      if (chunk.added) out.push(chunk.text);
      else for (const t of this.bpe.tokenize(clipNormalize(chunk.text))) out.push(t);
    }
    return out;
  }

  /** ids, no BOS/EOS, no truncation; tokens missing from the vocabulary map to the unk id, as in transformers. */
  encodeIds(text: string): number[] {
    return this.tokenize(text).map((t) => this.tokenToId(t) ?? this.unkTokenId);
  }

  /** BOS + ids + EOS, truncated (keeping BOS, the first maxLength-2 ids and EOS) and padded to maxLength. */
  encode(text: string): Encoded {
    const ids = this.encodeIds(text);
    const room = this.maxLength - 2;
    const kept = ids.length > room ? ids.slice(0, room) : ids;
    const inputIds = new Int32Array(this.maxLength).fill(this.padTokenId);
    const attentionMask = new Int32Array(this.maxLength);
    inputIds[0] = this.bosTokenId;
    inputIds.set(kept, 1);
    inputIds[kept.length + 1] = this.eosTokenId;
    attentionMask.fill(1, 0, kept.length + 2);
    return { inputIds, attentionMask, truncated: ids.length > room, untruncatedLength: ids.length + 2 };
  }

  /** Token string of an id (added tokens included), undefined if unknown. */
  idToToken(id: number): string | undefined {
    return this.addedById.get(id) ?? this.idToVocab.get(id);
  }

  /** Id of a token string (added tokens first, then the vocabulary), undefined if unknown. */
  tokenToId(token: string): number | undefined {
    return this.added.get(token) ?? this.vocab.get(token);
  }

  /**
   * Register added tokens (textual-inversion placeholders like "<my-logo>"): matched verbatim and case-sensitively on
   * the raw text before normalisation, as transformers' CLIPTokenizer does (it has no do_lower_case). New tokens get
   * ids size, size+1, ... (vocabSize onward for SD); a token already known keeps its id but is matched verbatim from
   * now on. Returns the ids.
   */
  addTokens(tokens: string[]): number[] {
    return tokens.map((t) => {
      const known = this.tokenToId(t);
      const id = known ?? this.nextId;
      if (!this.added.has(t)) this.register(t, id);
      return id;
    });
  }
}
