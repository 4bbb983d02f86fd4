/**
 * PNG output with A1111's "parameters" text (spec samplers.md §10): the infotext format (processing.create_infotext,
 * infotext_utils.quote / parse_generation_parameters), the tEXt/iTXt chunk PIL writes, and image reading via sharp.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { crc32, inflateSync } from 'node:zlib';
import sharp from 'sharp';
import { SdtuneError } from '../errors.js';
import { writeFileAtomic, type AtomicOptions } from '../runtime/atomic.js';

export interface GenerationParams {
  prompt: string;
  negativePrompt?: string;
  steps: number;
  /** A1111 display name: "Euler a", "DPM++ 2M", ... */
  sampler: string;
  /** A1111 >= 1.9 "Schedule type": "Automatic", "Karras", ... */
  scheduleType?: string;
  cfgScale: number;
  seed: number;
  width: number;
  height: number;
  /** first 10 hex of the checkpoint's SHA-256 (hashes.ts modelHash) */
  modelHash?: string;
  modelName?: string;
  /** alias -> 12-hex LoRA hash (hashes.ts loraHash) */
  loraHashes?: Record<string, string>;
  /** embedding name (its prompt word) -> 12-hex hash of the file (hashes.ts embeddingHash), for the embeddings the prompts use */
  tiHashes?: Record<string, string>;
  clipSkip?: number;
  denoisingStrength?: number;
  /**
   * the hypernetwork used (A1111 before 1.0 wrote "Hypernet: name, Hypernet hash: <8-hex legacy hash>,
   * Hypernet strength: s"; today's A1111 still reads these keys back as the prompt tag <hypernet:name:s>)
   */
  hypernet?: { name: string; hash?: string; strength: number };
  /** further "Key: value" pairs, written after the known ones in insertion order */
  extra?: Record<string, string | number>;
  /** e.g. "sdtune 0.1.0"; written last */
  version?: string;
}

/** Python str() of a number: shortest round-trip digits, exponent form below 1e-4 written as 1e-05. */
const pyStr = (v: number) =>
  Number.isInteger(v) || v === 0 || Math.abs(v) >= 1e-4 ? String(v) : v.toExponential().replace(/e([+-])(\d)$/, (_, s, d) => `e${s}0${d}`);

/** A1111 infotext_utils.quote: JSON-encode values containing `,`, `:` or a newline (json.dumps(ensure_ascii=False)). */
function quote(v: string | number): string {
  const s = typeof v === 'number' ? pyStr(v) : v;
  return /[,:\n]/.test(s) ? JSON.stringify(s) : s;
}

/** A1111 create_infotext: prompt, optional "Negative prompt:" line, then the "Key: value, ..." line, in A1111's key order. */
export function formatInfotext(p: GenerationParams): string {
  const noSep = (s: string) => s.replace(/[,:]/g, '');
  // "name: hash, name2: hash" (A1111 networks.py "Lora hashes", sd_hijack_clip.py "TI hashes")
  const hashList = (h: Record<string, string> | undefined) =>
    h && Object.keys(h).length > 0 ? Object.entries(h).map(([name, hash]) => `${noSep(name)}: ${hash}`).join(', ') : undefined;
  const params: [string, string | number | undefined][] = [
    ['Steps', p.steps],
    ['Sampler', p.sampler],
    ['Schedule type', p.scheduleType],
    ['CFG scale', p.cfgScale],
    ['Seed', p.seed],
    ['Size', `${p.width}x${p.height}`],
    ['Model hash', p.modelHash],
    ['Model', p.modelName === undefined ? undefined : noSep(p.modelName)],
    ['Hypernet', p.hypernet?.name],
    ['Hypernet hash', p.hypernet?.hash],
    // a Python float: 1 is "1.0"
    ['Hypernet strength', p.hypernet === undefined ? undefined : Number.isInteger(p.hypernet.strength) ? p.hypernet.strength.toFixed(1) : p.hypernet.strength],
    ['Denoising strength', p.denoisingStrength],
    ['Clip skip', p.clipSkip !== undefined && p.clipSkip > 1 ? p.clipSkip : undefined],
    ['Lora hashes', hashList(p.loraHashes)],
    ['TI hashes', hashList(p.tiHashes)],
    ...Object.entries(p.extra ?? {}),
    ['Version', p.version],
  ];
  const line = params
    .filter((kv): kv is [string, string | number] => kv[1] !== undefined)
    .map(([k, v]) => (k === v ? k : `${k}: ${quote(v)}`))
    .join(', ');
  const neg = p.negativePrompt ? `\nNegative prompt: ${p.negativePrompt}` : '';
  return `${p.prompt}${neg}\n${line}`.trim();
}

// A1111 infotext_utils.re_param, as a JS regex (Python `\w` is Unicode-aware):
//   /\s*([\p{L}\p{N}_][\p{L}\p{N}_ \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/gu
// is matched by a linear scanner (infotextPairs): the regex backtracks quadratically on a long run of key
// characters without a colon (40,000 letters took 22.5 s). test/io/png.test.ts checks both agree.
const WORD = /[\p{L}\p{N}_]/uy; // a key's first character
const KEY_RUN = /[\p{L}\p{N}_ \-/]*/uy; // the key characters
const NON_KEY_RUN = /[^\p{L}\p{N}_ \-/]*/uy;
const SPACES = /\s*/y;
const RE_SIZE = /^(\d+)x(\d+)$/;
const LINE_END = new Set(['\n', '\r', '\u2028', '\u2029']); // what `.` does not match

/** Length of the match of sticky `re` at `i`. */
function runEnd(re: RegExp, s: string, i: number): number {
  re.lastIndex = i;
  re.exec(s);
  return re.lastIndex;
}

/**
 * Every (key, value) that `s.matchAll(re_param)` yields, in one linear pass. A match is: the first position q with
 * a word character, followed by one or more key characters and then ':' (so the key is the whole key-character run
 * from q); spaces; then a JSON-like quoted value ending in `"` directly before `,` or the end, or else everything up
 * to the next ','.
 */
export function infotextPairs(s: string): [string, string][] {
  const out: [string, string][] = [];
  let i = 0;
  while (i < s.length) {
    // 1. the key: scan key-character runs from i; in a run ending at ':', its first word character not last in the run
    let key = -1;
    let colon = -1;
    for (let p = i; p < s.length && key < 0; ) {
      const e = runEnd(KEY_RUN, s, p);
      if (e === p) {
        p = runEnd(NON_KEY_RUN, s, p);
        continue;
      }
      if (s[e] === ':') {
        for (let q = p; q < e; q += (s.codePointAt(q)! > 0xffff ? 2 : 1)) {
          WORD.lastIndex = q;
          if (!WORD.test(s)) continue;
          if (WORD.lastIndex < e) [key, colon] = [q, e];
          break; // the first word character decides: a later one starts a shorter key of the same run
        }
      }
      p = e;
    }
    if (key < 0) break;
    // 2. the value
    const v = runEnd(SPACES, s, colon + 1);
    let end = -1;
    if (s[v] === '"') {
      let j = v + 1;
      while (j < s.length && s[j] !== '"') {
        if (s[j] !== '\\') j++;
        else if (j + 1 < s.length && !LINE_END.has(s[j + 1]!)) j += 2;
        else break;
      }
      if (j > v + 1 && s[j] === '"' && (j + 1 === s.length || s[j + 1] === ',')) end = j + 1;
    }
    if (end < 0) {
      end = s.indexOf(',', v);
      if (end < 0) end = s.length;
    }
    out.push([s.slice(key, colon), s.slice(v, end)]);
    i = end < s.length ? end + 1 : end; // past the ','
  }
  return out;
}

/** A1111 parse_generation_parameters; `raw` is its result dict (Prompt, Negative prompt, Size-1/Size-2, "Clip skip" defaulting to "1"). */
export function parseInfotext(text: string): GenerationParams & { raw: Record<string, string> } {
  const lines = text.trim().split('\n');
  const last = lines.pop() ?? '';
  let pairs = infotextPairs(last);
  if (pairs.length < 3) {
    pairs = [];
    lines.push(last); // fewer than 3 "Key: value" pairs: not a parameter line
  }
  let prompt = '';
  let negative = '';
  let inNegative = false;
  for (let line of lines) {
    line = line.trim();
    if (line.startsWith('Negative prompt:')) {
      inNegative = true;
      line = line.slice(16).trim();
    }
    if (inNegative) negative += (negative === '' ? '' : '\n') + line;
    else prompt += (prompt === '' ? '' : '\n') + line;
  }
  const raw: Record<string, string> = { Prompt: prompt, 'Negative prompt': negative };
  for (const [k, value] of pairs) {
    let v = value;
    if (v === '') continue; // A1111's v[0] raises IndexError on an empty value: the key is skipped
    if (v.length >= 2 && v.startsWith('"') && v.endsWith('"')) {
      try {
        v = JSON.parse(v) as string;
      } catch {
        /* A1111 unquote keeps the text as is */
      }
    }
    const m = RE_SIZE.exec(v);
    if (m) {
      raw[`${k}-1`] = m[1]!;
      raw[`${k}-2`] = m[2]!;
    } else raw[k] = v;
  }
  raw['Clip skip'] ??= '1'; // missing Clip skip means 1 (A1111)

  const num = (k: string, dflt: number) => {
    const n = raw[k] === undefined || raw[k].trim() === '' ? NaN : Number(raw[k]);
    return Number.isFinite(n) ? n : dflt;
  };
  const opt = (k: string) => (raw[k] === undefined ? undefined : num(k, NaN));
  const known = new Set(['Prompt', 'Negative prompt', 'Steps', 'Sampler', 'Schedule type', 'CFG scale', 'Seed', 'Size-1', 'Size-2',
    'Model hash', 'Model', 'Denoising strength', 'Clip skip', 'Lora hashes', 'TI hashes', 'Version', 'Hypernet', 'Hypernet hash', 'Hypernet strength']);
  const extra = Object.fromEntries(Object.entries(raw).filter(([k]) => !known.has(k)));
  const hashList = (v: string | undefined) => {
    if (v === undefined) return undefined;
    const out: Record<string, string> = {};
    for (const part of v.split(',')) {
      const i = part.indexOf(':');
      if (i > 0) out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
    }
    return out;
  };
  // Defaults for absent fields are A1111's txt2img UI defaults (raw tells what the text really had).
  return {
    prompt,
    negativePrompt: negative,
    steps: num('Steps', 20),
    sampler: raw.Sampler ?? 'Euler a',
    scheduleType: raw['Schedule type'],
    cfgScale: num('CFG scale', 7),
    seed: num('Seed', -1),
    width: num('Size-1', 512),
    height: num('Size-2', 512),
    modelHash: raw['Model hash'],
    modelName: raw.Model,
    loraHashes: hashList(raw['Lora hashes']),
    tiHashes: hashList(raw['TI hashes']),
    clipSkip: num('Clip skip', 1),
    denoisingStrength: opt('Denoising strength'),
    // A1111 parse_generation_parameters: a missing strength is 1.0
    hypernet: raw.Hypernet === undefined ? undefined : { name: raw.Hypernet, hash: raw['Hypernet hash'], strength: num('Hypernet strength', 1) },
    extra: Object.keys(extra).length > 0 ? extra : undefined,
    version: raw.Version,
    raw,
  };
}

// ---- PNG chunks ----------------------------------------------------------------------------------------------------

const SIGNATURE = Uint8Array.of(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a);
/** length (BE) + type + data + CRC-32 over type+data. */
function chunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, data.length);
  out.set(Buffer.from(type, 'latin1'), 4);
  out.set(data, 8);
  dv.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

/** PIL PngInfo.add_text: tEXt (keyword NUL latin-1 text) when the text is latin-1, else iTXt (uncompressed, no language, UTF-8). */
function textChunk(keyword: string, text: string): Uint8Array {
  const key = Buffer.from(keyword, 'latin1');
  // eslint-disable-next-line no-control-regex
  if (/^[\u0000-\u00ff]*$/.test(text)) return chunk('tEXt', Buffer.concat([key, Uint8Array.of(0), Buffer.from(text, 'latin1')]));
  return chunk('iTXt', Buffer.concat([key, Uint8Array.of(0, 0, 0, 0, 0), Buffer.from(text, 'utf8')]));
}

interface Chunk {
  type: string;
  start: number; // offset of the length field
  data: Uint8Array;
}

/** Split a PNG into chunks (signature, framing and CRCs checked); errors name the file. */
function parseChunks(buf: Uint8Array, file: string): Chunk[] {
  const bad = (why: string) => new SdtuneError('format', `${file}: ${why}`);
  if (buf.length < 8 || !SIGNATURE.every((b, i) => buf[i] === b)) throw bad('not a PNG file (bad signature)');
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const chunks: Chunk[] = [];
  for (let off = 8; ; ) {
    if (off + 12 > buf.length) throw bad(`truncated PNG (chunk header at byte ${off} is cut off, no IEND)`);
    const len = dv.getUint32(off);
    const type = Buffer.from(buf.subarray(off + 4, off + 8)).toString('latin1');
    if (!/^[A-Za-z]{4}$/.test(type)) throw bad(`corrupt PNG (invalid chunk type at byte ${off})`);
    if (off + 12 + len > buf.length) throw bad(`truncated PNG (${type} chunk at byte ${off} needs ${len} bytes)`);
    if (crc32(buf.subarray(off + 4, off + 8 + len)) !== dv.getUint32(off + 8 + len)) throw bad(`corrupt PNG (CRC mismatch in ${type} at byte ${off})`);
    chunks.push({ type, start: off, data: buf.subarray(off + 8, off + 8 + len) });
    off += 12 + len;
    if (type === 'IEND') return chunks;
  }
}

/** Write an RGB PNG (uint8 HxWx3) atomically, with the A1111 "parameters" text chunk placed before the first IDAT. */
export async function writePng(path: string, rgb: Uint8Array, width: number, height: number, parameters?: string, opts: AtomicOptions = {}): Promise<void> {
  if (!(width > 0 && height > 0 && Number.isInteger(width) && Number.isInteger(height)) || rgb.length !== width * height * 3) {
    throw new SdtuneError('usage', `writePng ${path}: expected ${width}x${height}x3 = ${width * height * 3} bytes of RGB, got ${rgb.length}`);
  }
  // sharp cannot write arbitrary tEXt/iTXt chunks, so the chunk is spliced into its output.
  const png = await sharp(Buffer.from(rgb.buffer, rgb.byteOffset, rgb.byteLength), { raw: { width, height, channels: 3 } }).png().toBuffer();
  if (parameters === undefined) return writeFileAtomic(path, png, opts);
  const idat = parseChunks(png, path).find((c) => c.type === 'IDAT')!.start;
  await writeFileAtomic(path, [png.subarray(0, idat), textChunk('parameters', parameters), png.subarray(idat)], opts);
}

/** Bounds on the text read from a PNG from a stranger: A1111 parameters are a few KB and ComfyUI's workflow JSON
 *  well under 1 MiB, while a zTXt/iTXt chunk of a few MB can inflate to GBs (a zip bomb). */
export const MAX_TEXT_CHUNK = 4 << 20;
export const MAX_TEXT_TOTAL = 16 << 20;
const TEXT_TYPES = new Set(['tEXt', 'zTXt', 'iTXt']);
const READ_WINDOW = 1 << 20;

/** Positioned reads through a 1 MiB window, so a file of many tiny chunks costs few system calls. */
function windowedReader(fh: FileHandle, size: number) {
  let win = Buffer.alloc(0);
  let start = 0;
  /** `n` bytes at `pos` (the caller checked they are in the file); valid after later calls too. */
  return async (pos: number, n: number): Promise<Buffer> => {
    if (pos < start || pos + n > start + win.length) {
      win = Buffer.alloc(Math.min(Math.max(n, READ_WINDOW), size - pos));
      start = pos;
      for (let off = 0; off < win.length; ) {
        const { bytesRead } = await fh.read(win, off, win.length - off, pos + off);
        if (bytesRead === 0) throw new Error(`file shrank while reading at byte ${pos + off}`);
        off += bytesRead;
      }
    }
    return win.subarray(pos - start, pos - start + n);
  };
}

/** Inflate a zTXt/iTXt body, refusing more than `limit` bytes of text. */
function inflateText(file: string, body: Uint8Array, limit: number, type: string, key: string): Buffer {
  try {
    return inflateSync(body, { maxOutputLength: limit });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ERR_BUFFER_TOO_LARGE') throw e;
    const what = limit < MAX_TEXT_CHUNK ? `leaves the PNG's text over ${MAX_TEXT_TOTAL.toLocaleString('en-US')} bytes in all` : `inflates to more than ${limit.toLocaleString('en-US')} bytes`;
    throw new SdtuneError('format', `${file}: ${type} chunk ${JSON.stringify(key.slice(0, 80))} ${what}, the limit for PNG text (a zip bomb?)`);
  }
}

/**
 * All text chunks of a PNG (tEXt, zTXt, iTXt) as keyword -> text (a repeated keyword: the last wins, as PIL). The
 * file is walked chunk by chunk with every CRC checked, holding only text chunks in memory; each text is limited to
 * MAX_TEXT_CHUNK bytes (compressed ones inflate at most that far) and all of them to MAX_TEXT_TOTAL.
 */
export async function readPngText(path: string): Promise<Record<string, string>> {
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    throw new SdtuneError('file', `${path}: cannot read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  const bad = (why: string) => new SdtuneError('format', `${path}: ${why}`);
  const out: Record<string, string> = {};
  const latin1 = (b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('latin1');
  let total = 0;
  try {
    const { size } = await fh.stat();
    const readAt = windowedReader(fh, size);
    const head = size >= 8 ? await readAt(0, 8) : Buffer.alloc(0);
    if (head.length < 8 || !SIGNATURE.every((b, i) => head[i] === b)) throw bad('not a PNG file (bad signature)');
    for (let off = 8; ; ) {
      if (off + 12 > size) throw bad(`truncated PNG (chunk header at byte ${off} is cut off, no IEND)`);
      const hdr = await readAt(off, 8);
      const len = hdr.readUInt32BE(0);
      const type = hdr.toString('latin1', 4, 8);
      if (!/^[A-Za-z]{4}$/.test(type)) throw bad(`corrupt PNG (invalid chunk type at byte ${off})`);
      if (off + 12 + len > size) throw bad(`truncated PNG (${type} chunk at byte ${off} needs ${len} bytes)`);
      const isText = TEXT_TYPES.has(type);
      if (isText && len > MAX_TEXT_CHUNK) {
        throw bad(`${type} chunk at byte ${off} holds ${len.toLocaleString('en-US')} bytes, more than the ${MAX_TEXT_CHUNK.toLocaleString('en-US')} byte limit for PNG text`);
      }
      // CRC over type + data, in blocks; only text chunks are kept
      let crc = crc32(hdr.subarray(4, 8));
      let data: Buffer | undefined;
      if (isText) crc = crc32((data = await readAt(off + 8, len)), crc);
      else for (let p = 0; p < len; p += READ_WINDOW) crc = crc32(await readAt(off + 8 + p, Math.min(READ_WINDOW, len - p)), crc);
      if (crc !== (await readAt(off + 8 + len, 4)).readUInt32BE(0)) throw bad(`corrupt PNG (CRC mismatch in ${type} at byte ${off})`);
      if (data) {
        try {
          const nul = data.indexOf(0);
          if (nul < 1) throw new Error('no keyword');
          const key = latin1(data.subarray(0, nul));
          const limit = Math.max(1, Math.min(MAX_TEXT_CHUNK, MAX_TEXT_TOTAL - total));
          let text: Buffer;
          if (type === 'tEXt') text = data.subarray(nul + 1);
          else if (type === 'zTXt') text = inflateText(path, data.subarray(nul + 2), limit, type, key);
          else {
            const compressed = data[nul + 1] === 1;
            const lang = data.indexOf(0, nul + 3);
            const tkey = lang < 0 ? -1 : data.indexOf(0, lang + 1);
            if (lang < 0 || tkey < 0) throw new Error('missing separators');
            const body = data.subarray(tkey + 1);
            text = compressed ? inflateText(path, body, limit, type, key) : body;
          }
          if ((total += text.length) > MAX_TEXT_TOTAL) {
            throw new SdtuneError('format', `${path}: the text chunks hold more than ${MAX_TEXT_TOTAL.toLocaleString('en-US')} bytes in all, the limit for PNG text`);
          }
          out[key] = type === 'iTXt' ? text.toString('utf8') : latin1(text);
        } catch (e) {
          if (e instanceof SdtuneError) throw e;
          throw bad(`corrupt ${type} chunk (${(e as Error).message})`);
        }
      }
      off += 12 + len;
      if (type === 'IEND') return out;
    }
  } catch (e) {
    if (e instanceof SdtuneError) throw e;
    throw new SdtuneError('file', `${path}: cannot read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  } finally {
    await fh.close().catch(() => {});
  }
}

/** Read png/jpg/webp/... as 8-bit RGB (EXIF orientation applied and alpha dropped, like diffusers' load_image). */
export async function readImageRgb(path: string): Promise<{ data: Uint8Array; width: number; height: number }> {
  try {
    const { data, info } = await sharp(path).autoOrient().toColourspace('srgb').removeAlpha().raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
    if (info.channels !== 3) throw new Error(`decoded to ${info.channels} channels, expected 3`);
    return { data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength), width: info.width, height: info.height };
  } catch (e) {
    throw new SdtuneError('file', `cannot read image ${path}: ${(e as Error).message}`);
  }
}
