import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { deflateSync } from 'node:zlib';
import { pngChunk } from '../helpers.js';
import { afterAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { MAX_TEXT_CHUNK, MAX_TEXT_TOTAL, formatInfotext, infotextPairs, parseInfotext, readImageRgb, readPngText, writePng, type GenerationParams } from '../../src/io/png.js';

const dir = mkdtempSync(path.join(tmpdir(), 'sdtune-png-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const BASE: GenerationParams = { prompt: 'a cat', steps: 20, sampler: 'Euler a', cfgScale: 7, seed: 1234567890, width: 512, height: 512 };

describe('formatInfotext (A1111 create_infotext)', () => {
  it('writes the spec §10.2 example', () => {
    const text = formatInfotext({
      ...BASE, prompt: 'a photo of a cat', negativePrompt: 'blurry', modelHash: '6ce0161689', modelName: 'v1-5-pruned-emaonly', version: 'v1.10.1',
    });
    expect(text).toBe(
      'a photo of a cat\nNegative prompt: blurry\n' +
        'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234567890, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1',
    );
  });

  it('orders keys like A1111, quotes values with , : or newline, omits Clip skip 1 and the empty negative line', () => {
    const text = formatInfotext({
      ...BASE, cfgScale: 7.5, scheduleType: 'Karras', sampler: 'DPM++ 2M', clipSkip: 2, denoisingStrength: 0.75, modelName: 'my,model:v2',
      loraHashes: { 'style,x': '0123456789ab', other: 'ba9876543210' }, tiHashes: { 'my-logo': 'c0ffee123456', 'bad:name,': '0a1b2c3d4e5f' },
      extra: { 'Hires upscaler': 'Latent', Note: 'a "b", c', Tiny: 0.00001, Flag: 'Flag' }, version: 'sdtune 0.1.0',
    });
    expect(text).toBe(
      'a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234567890, Size: 512x512, Model: mymodelv2, ' +
        'Denoising strength: 0.75, Clip skip: 2, Lora hashes: "stylex: 0123456789ab, other: ba9876543210", ' +
        'TI hashes: "my-logo: c0ffee123456, badname: 0a1b2c3d4e5f", Hires upscaler: Latent, ' +
        'Note: "a \\"b\\", c", Tiny: 1e-05, Flag, Version: sdtune 0.1.0',
    );
    expect(formatInfotext({ ...BASE, clipSkip: 1, negativePrompt: '' })).toBe('a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234567890, Size: 512x512');
  });
});

describe('parseInfotext (A1111 parse_generation_parameters)', () => {
  it('round trips, including quoted values and a multi-line prompt and negative prompt', () => {
    const p: GenerationParams = {
      prompt: 'line one, (cat:1.2)\nline two: more', negativePrompt: 'ugly,\nbad hands', steps: 30, sampler: 'DPM++ 2M', scheduleType: 'Karras',
      cfgScale: 7.5, seed: 42, width: 768, height: 512, modelHash: 'abcdef1234', modelName: 'model', loraHashes: { a: '0123456789ab', b: 'ffffffffffff' },
      tiHashes: { 'my-logo': '0123456789ab', '<x>': 'abcdefabcdef' }, clipSkip: 2, denoisingStrength: 0.6, extra: { 'Hires upscaler': 'Latent', Note: 'x: "y", z\nw' }, version: 'sdtune 0.1.0',
    };
    const back = parseInfotext(formatInfotext(p));
    const { raw, ...fields } = back;
    expect(fields).toEqual(p);
    expect(raw).toMatchObject({ Prompt: p.prompt, 'Size-1': '768', 'Size-2': '512', 'Lora hashes': 'a: 0123456789ab, b: ffffffffffff', 'TI hashes': 'my-logo: 0123456789ab, <x>: abcdefabcdef' });
    expect(back.extra).toEqual({ 'Hires upscaler': 'Latent', Note: 'x: "y", z\nw' }); // TI hashes is a known key, not an extra
  });

  it('A1111 prompt syntax survives as typed: network tags, prompt editing, alternation, AND with weights', () => {
    const p: GenerationParams = {
      ...BASE, prompt: 'a [cat:dog:0.5] <lora:my-style:0.7:0.2>, [red|blue] hair\nAND (tree:1.2) :0.5', negativePrompt: '[blurry::10], <lora:x:1>',
      sampler: 'Euler a', scheduleType: 'Automatic', loraHashes: { 'my-style': '0123456789ab' },
    };
    const back = parseInfotext(formatInfotext(p));
    expect([back.prompt, back.negativePrompt, back.sampler, back.scheduleType, back.loraHashes]).toEqual([p.prompt, p.negativePrompt, 'Euler a', 'Automatic', p.loraHashes]);
    expect(formatInfotext(p)).toContain('\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: ');
  });

  it('defaults: no negative prompt, Clip skip 1; a text without a parameter line is all prompt', () => {
    const back = parseInfotext(formatInfotext(BASE));
    expect([back.negativePrompt, back.clipSkip, back.raw['Clip skip'], back.steps]).toEqual(['', 1, '1', 20]);
    const plain = parseInfotext('just a prompt, with: a colon\nsecond line');
    expect(plain.prompt).toBe('just a prompt, with: a colon\nsecond line');
    expect(plain.raw.Steps).toBeUndefined();
  });

  it('parses a real-looking A1111 line with an unknown key and an unparseable quote kept verbatim', () => {
    const back = parseInfotext('cat\nSteps: 25, Sampler: Euler, CFG scale: 6.5, Seed: 7, Size: 640x448, ENSD: 31337, Hires resize: 1024x768, Bad: "x');
    expect([back.steps, back.sampler, back.cfgScale, back.seed, back.width, back.height]).toEqual([25, 'Euler', 6.5, 7, 640, 448]);
    expect(back.extra).toEqual({ ENSD: '31337', 'Hires resize-1': '1024', 'Hires resize-2': '768', Bad: '"x' });
    const ti = parseInfotext('cat\nNegative prompt: EasyNegative\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1');
    expect(ti.tiHashes).toEqual({ EasyNegative: 'c74b4e810b03' });
    expect(ti.extra).toBeUndefined();
  });
});

describe('infotext scanner (linear; the A1111 regex backtracks quadratically)', () => {
  // the regex it replaces, kept as the reference: A1111 infotext_utils.re_param with Python's Unicode \w
  const RE_PARAM = /\s*([\p{L}\p{N}_][\p{L}\p{N}_ \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/gu;
  it('yields exactly the regex matches on 20,000 random strings over the characters that matter', () => {
    const alphabet = ['a', 'Z', '1', '_', ' ', ' ', '-', '/', ':', ':', ',', ',', '"', '"', '\\', '\n', '\r', '\t', '\u00a0', '\u2028', 'é', '猫', '𝐀', '\ud800', '.', 'x'];
    let seed = 12345;
    const rnd = (n: number) => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % n);
    for (let n = 0; n < 20_000; n++) {
      const s = Array.from({ length: rnd(30) }, () => alphabet[rnd(alphabet.length)]).join('');
      const ref = [...s.matchAll(RE_PARAM)].map((m) => [m[1], m[2]]);
      expect(infotextPairs(s), `string #${n}: ${JSON.stringify(s)}`).toEqual(ref);
    }
  });
  it('a 1,000,000-letter line without a colon parses (the regex took 22.5 s at 40,000)', () => {
    const r = parseInfotext('a'.repeat(1_000_000));
    expect(r.prompt).toHaveLength(1_000_000);
    expect(r.raw.Steps).toBeUndefined();
    expect(infotextPairs(`${'a '.repeat(500_000)}:1`)).toEqual([['a '.repeat(500_000), '1']]); // the key is the whole run
  });
});

describe('writePng / readPngText / readImageRgb', () => {
  const [W, H] = [7, 5];
  const rgb = Uint8Array.from({ length: W * H * 3 }, (_, i) => (i * 37 + 11) % 256);

  it('writes the pixels and a tEXt "parameters" chunk before IDAT (latin-1 text)', async () => {
    const file = path.join(dir, 'a.png');
    const text = formatInfotext({ ...BASE, prompt: 'café, (naïve:1.2)', negativePrompt: 'blurry' });
    await writePng(file, rgb, W, H, text);
    const { data, info } = await sharp(file).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([W, H, 3]);
    expect(Buffer.compare(data, Buffer.from(rgb))).toBe(0);
    expect(await readPngText(file)).toEqual({ parameters: text });
    const bytes = readFileSync(file);
    const t = bytes.indexOf('tEXtparameters\0', 0, 'latin1');
    expect(t).toBeGreaterThan(0);
    expect(t).toBeLessThan(bytes.indexOf('IDAT', 0, 'latin1'));
    expect(bytes.includes(Buffer.from('café', 'latin1'))).toBe(true); // latin-1 bytes, as PIL
    const img = await readImageRgb(file);
    expect([img.width, img.height, Buffer.compare(Buffer.from(img.data), Buffer.from(rgb))]).toEqual([W, H, 0]);
  });

  it('uses iTXt for text that is not latin-1, and round trips it', async () => {
    const file = path.join(dir, 'b.png');
    const text = formatInfotext({ ...BASE, prompt: '猫 🐱 in the snow' });
    await writePng(file, rgb, W, H, text);
    expect(await readPngText(file)).toEqual({ parameters: text });
    const bytes = readFileSync(file);
    expect(bytes.indexOf(Buffer.concat([Buffer.from('iTXtparameters'), Buffer.alloc(5), Buffer.from('猫')]))).toBeGreaterThan(0);
    expect(parseInfotext((await readPngText(file)).parameters!).prompt).toBe('猫 🐱 in the snow');
  });

  it('writes without text, and rejects a wrong buffer size', async () => {
    const file = path.join(dir, 'c.png');
    await writePng(file, rgb, W, H);
    expect(await readPngText(file)).toEqual({});
    await expect(writePng(file, rgb, W + 1, H)).rejects.toThrow(SdtuneError);
  });

  it('reads zTXt and compressed iTXt chunks', async () => {
    const plain = readFileSync(path.join(dir, 'c.png'));
    const z = pngChunk('zTXt', Buffer.concat([Buffer.from('Comment\0\0', 'latin1'), deflateSync(Buffer.from('héllo', 'latin1'))]));
    const i = pngChunk('iTXt', Buffer.concat([Buffer.from('parameters\0\x01\0en\0Param\0', 'latin1'), deflateSync(Buffer.from('猫', 'utf8'))]));
    const file = path.join(dir, 'z.png');
    writeFileSync(file, Buffer.concat([plain.subarray(0, 33), z, i, plain.subarray(33)]));
    expect(await readPngText(file)).toEqual({ Comment: 'héllo', parameters: '猫' });
  });

  it('bounds the text: a zTXt/iTXt zip bomb, a huge tEXt and too much text in all are refused with one line', async () => {
    const plain = readFileSync(path.join(dir, 'c.png'));
    const png = (name: string, ...chunks: Buffer[]) => {
      const file = path.join(dir, name);
      writeFileSync(file, Buffer.concat([plain.subarray(0, 33), ...chunks, plain.subarray(33)]));
      return file;
    };
    const bomb = deflateSync(Buffer.alloc(MAX_TEXT_CHUNK + 1, 0x41)); // ~4 KB that inflate past the limit
    const z = png('bomb-z.png', pngChunk('zTXt', Buffer.concat([Buffer.from('parameters\0\0', 'latin1'), bomb])));
    await expect(readPngText(z)).rejects.toThrow(new RegExp(`bomb-z\\.png: zTXt chunk "parameters" inflates to more than ${MAX_TEXT_CHUNK.toLocaleString('en-US')} bytes`));
    const i = png('bomb-i.png', pngChunk('iTXt', Buffer.concat([Buffer.from('parameters\0\x01\0\0\0', 'latin1'), bomb])));
    await expect(readPngText(i)).rejects.toThrow(/bomb-i\.png: iTXt chunk "parameters" inflates to more than/);
    const big = png('big-t.png', pngChunk('tEXt', Buffer.concat([Buffer.from('parameters\0', 'latin1'), Buffer.alloc(MAX_TEXT_CHUNK, 0x41)])));
    await expect(readPngText(big)).rejects.toThrow(/big-t\.png: tEXt chunk at byte 33 holds [\d,]+ bytes, more than the [\d,]+ byte limit for PNG text/);
    const part = deflateSync(Buffer.alloc(MAX_TEXT_CHUNK - 1000, 0x42));
    const n = Math.ceil(MAX_TEXT_TOTAL / (MAX_TEXT_CHUNK - 1000)) + 1;
    const many = png('many-z.png', ...Array.from({ length: n }, (_, k) => pngChunk('zTXt', Buffer.concat([Buffer.from(`k${k}\0\0`, 'latin1'), part]))));
    await expect(readPngText(many)).rejects.toThrow(new RegExp(`many-z\\.png: .*over ${MAX_TEXT_TOTAL.toLocaleString('en-US')} bytes in all`));
    // just under the per-chunk limit is fine
    const ok = png('ok-z.png', pngChunk('zTXt', Buffer.concat([Buffer.from('parameters\0\0', 'latin1'), part])));
    expect((await readPngText(ok)).parameters).toHaveLength(MAX_TEXT_CHUNK - 1000);
  });

  it('reads grayscale / RGBA images as RGB', async () => {
    const gray = path.join(dir, 'g.png');
    await sharp(Buffer.from([0, 128, 255, 64]), { raw: { width: 2, height: 2, channels: 1 } }).png().toFile(gray);
    expect([...(await readImageRgb(gray)).data]).toEqual([0, 0, 0, 128, 128, 128, 255, 255, 255, 64, 64, 64]);
    const rgba = path.join(dir, 'rgba.png');
    await sharp(Buffer.from([10, 20, 30, 0, 40, 50, 60, 255]), { raw: { width: 2, height: 1, channels: 4 } }).png().toFile(rgba);
    expect([...(await readImageRgb(rgba)).data]).toEqual([10, 20, 30, 40, 50, 60]);
  });

  it('fails clearly on garbage, truncated and missing files', async () => {
    const good = readFileSync(path.join(dir, 'a.png'));
    const cut = path.join(dir, 'cut.png');
    writeFileSync(cut, good.subarray(0, good.length - 30));
    const junk = path.join(dir, 'junk.png');
    writeFileSync(junk, 'this is not an image');
    const flipped = path.join(dir, 'crc.png');
    const bad = Buffer.from(good);
    bad[bad.indexOf('tEXt', 0, 'latin1') + 6] ^= 1;
    writeFileSync(flipped, bad);
    await expect(readPngText(cut)).rejects.toThrow(/cut\.png: truncated PNG/);
    await expect(readPngText(junk)).rejects.toThrow(/junk\.png: not a PNG file/);
    await expect(readPngText(flipped)).rejects.toThrow(/CRC mismatch in tEXt/);
    await expect(readPngText(path.join(dir, 'missing.png'))).rejects.toThrow(/missing\.png: cannot read \(ENOENT\)/);
    for (const f of [junk, path.join(dir, 'missing.png')]) {
      const err = await readImageRgb(f).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SdtuneError);
      expect((err as SdtuneError).kind).toBe('file');
      expect((err as Error).message).toContain(f);
    }
  });
});
