// Fuzzing the readers that open files from strangers (models, LoRAs, embeddings, PNG parameters, YAML configs): a
// fixed-seed sample of mutants of a valid file per reader, each of which must load or throw an SdtuneError (never
// another error, never a hang: every reader bounds its work by design). A failure prints the reader, the seed and
// the mutant's index; `mutant(seed, i)` rebuilds it.
import { mkdtemp, rm, writeFile, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { crc32, deflateSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readEmbedding, writeEmbeddingA1111, writeEmbeddingDiffusers } from '../../src/adapters/embeddings.js';
import { type LoraModel, type LoraModule, readLora, writeLoraKohya, writeLoraPeft } from '../../src/adapters/lora.js';
import { SdtuneError } from '../../src/errors.js';
import { parseInfotext, readPngText, writePng } from '../../src/io/png.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { randomParams } from '../../src/models/build.js';
import { clipTextParamShapes } from '../../src/models/clip-text.js';
import { disposeParams } from '../../src/models/params.js';
import { unetParamShapes } from '../../src/models/unet.js';
import { resolveConfig } from '../../src/train/config.js';
import { TINY_CLIP, TINY_UNET, pngChunk } from '../helpers.js';

const SEED = 0x5d7e;
const N = 250; // mutants per reader

/** mulberry32: a small seeded PRNG, so every mutant can be rebuilt from (seed, index). */
function prng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  return { next, int: (n: number) => Math.floor(next() * n), pick: <T>(xs: readonly T[]) => xs[Math.floor(next() * xs.length)]! };
}
type Rng = ReturnType<typeof prng>;

/** Byte strings that tend to reach the edge cases of JSON, YAML, PNG and safetensors readers. */
const TOKENS = [
  '[', ']', '{', '}', '"', '\\', ':', ',', '-', ' ', '\n', '\t', '\0', '0', '-1', '1e308', '9007199254740993', '18446744073709551615',
  '"F32"', '"I32"', '"U32"', '"F8_E4M3"', '"BOOL"', 'null', 'true', '[[[[[[[[[[[[[[[[', '{"a":{"b":[', '"__metadata__"',
  '"shape":[', '"data_offsets":[0,', '&a ', '*a', '!!binary ', '? ', '- ', '---\n', '<<: *a', '\ufeff', '\ud800', 'é', '猫',
].map((s) => Buffer.from(s, 'utf8'));

/** One random edit of `b`: flip, overwrite, insert, delete, duplicate, truncate, splice tokens, or repeat one up to 30,000 times. */
function mutate(b: Buffer, r: Rng, from = 0, to = b.length): Buffer {
  const at = from + r.int(Math.max(1, to - from));
  const len = 1 + r.int(Math.min(64, Math.max(1, b.length - at)));
  switch (r.int(9)) {
    case 0: {
      const c = Buffer.from(b);
      if (at < c.length) c[at]! ^= 1 << r.int(8);
      return c;
    }
    case 1: {
      const c = Buffer.from(b);
      for (let i = at; i < Math.min(c.length, at + len); i++) c[i] = r.pick([0, 0xff, 0x7f, 0x80, r.int(256)]);
      return c;
    }
    case 2: return Buffer.concat([b.subarray(0, at), Buffer.from(Array.from({ length: len }, () => r.int(256))), b.subarray(at)]);
    case 3: return Buffer.concat([b.subarray(0, at), b.subarray(at + len)]);
    case 4: return Buffer.concat([b.subarray(0, at + len), b.subarray(at, at + len), b.subarray(at + len)]);
    case 5: return b.subarray(0, at);
    case 6: return Buffer.concat([b.subarray(0, at), r.pick(TOKENS), b.subarray(at + r.int(4))]);
    case 7: return Buffer.concat([b.subarray(0, at), Buffer.concat(Array.from({ length: 1 + r.int(200) }, () => r.pick(TOKENS))), b.subarray(at)]);
    default: return Buffer.concat([b.subarray(0, at), Buffer.alloc(1 + r.int(30_000), r.pick([...TOKENS, Buffer.from('a'), Buffer.from('a ')])), b.subarray(at)]); // one token many times: deep nesting, long runs
  }
}

/** 1-3 edits of `b`. */
const mutateSome = (b: Buffer, r: Rng, from?: number, to?: number) => {
  for (let k = 1 + r.int(3); k > 0; k--) b = mutate(b, r, from, Math.min(to ?? b.length, b.length));
  return b;
};

/** A safetensors mutant: most edit the header JSON and fix its length prefix, so they get past the framing. */
function safetensorsMutant(base: Buffer, r: Rng): Buffer {
  const n = Number(base.readBigUInt64LE(0));
  const header = base.subarray(8, 8 + n);
  const body = base.subarray(8 + n);
  const mode = r.int(4);
  if (mode <= 1) {
    const h = mutateSome(Buffer.from(header), r);
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(mode === 0 ? h.length : Math.max(0, h.length + r.int(9) - 4)));
    return Buffer.concat([prefix, h, body]);
  }
  if (mode === 2) return Buffer.concat([base.subarray(0, 8 + n), mutateSome(Buffer.from(body), r)]);
  return mutateSome(Buffer.from(base), r);
}

/** A PNG mutant: most edit one chunk's data and recompute its CRC, so they reach the text decoders. */
function pngMutant(base: Buffer, r: Rng): Buffer {
  const chunks: { start: number; len: number; type: string }[] = [];
  for (let off = 8; off + 12 <= base.length; ) {
    const len = base.readUInt32BE(off);
    chunks.push({ start: off, len, type: base.toString('latin1', off + 4, off + 8) });
    off += 12 + len;
  }
  if (r.int(4) === 0) return mutateSome(Buffer.from(base), r);
  const texts = chunks.filter((c) => /^(tEXt|zTXt|iTXt)$/.test(c.type));
  const c = r.int(4) === 0 ? r.pick(chunks) : r.pick(texts);
  let data: Buffer = Buffer.from(base.subarray(c.start + 8, c.start + 8 + c.len));
  if (c.type !== 'tEXt' && r.int(2) === 0) {
    // edit the compressed text before compressing, so the inflated bytes are odd but well-formed zlib
    const nul = data.indexOf(0);
    const head = c.type === 'zTXt' ? nul + 2 : data.indexOf(0, data.indexOf(0, nul + 3) + 1) + 1;
    data = Buffer.concat([data.subarray(0, head), deflateSync(mutateSome(Buffer.from('Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512'), r))]);
  } else data = mutateSome(data, r);
  const type = Buffer.from(c.type, 'latin1');
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(r.int(10) === 0 ? r.int(2 ** 32) : data.length, 0);
  type.copy(out, 4);
  data.copy(out, 8);
  out.writeUInt32BE(crc32(Buffer.concat([type, data])), 8 + data.length);
  return Buffer.concat([base.subarray(0, c.start), out, base.subarray(c.start + 12 + c.len)]);
}

const CONFIG = `# a LoRA run
model:
  path: models/sd15
  backend: cpu
data:
  dir: data/dog
  resolution: [512, 768]
  repeats: 10
  buckets: { enabled: true, min_side: 256, max_side: 1024 }
train:
  lr: &lr 1e-4
  max_steps: 100
  lr_scheduler: cosine
  lr_warmup_steps: 10
lora:
  rank: 8
  alpha: 4
  text_encoder: true
  text_encoder_lr: *lr
output:
  name: dog
  sample_every: 50
  sample_prompts:
    - "a photo of sks dog, (masterpiece:1.2)"
    - a dog [on a beach]
`;

let dir: string;
let model: LoraModel;
const bases: Record<string, Buffer> = {};
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'sdtune-fuzz-'));
  const file = (name: string) => path.join(dir, name);
  const f = new Float32Array([0.5, -1.25, 3, 0.125, 2, -0.5]);
  await writeSafetensors(file('base.safetensors'), {
    'a.weight': { shape: [2, 3], data: f }, 'a.bias': { shape: [3], data: f.subarray(0, 3), dtype: 'F16' },
    b: { shape: [2], data: f.subarray(0, 2), dtype: 'BF16' }, ids: { shape: [1, 3], data: new Int32Array([0, 1, 2]), dtype: 'I64' }, empty: { shape: [0], data: new Float32Array(0) },
  }, { metadata: { format: 'pt', note: 'x' } });
  model = { unet: randomParams(unetParamShapes(TINY_UNET), 1), textEncoder: randomParams(clipTextParamShapes(TINY_CLIP), 2) };
  const lin = (component: LoraModule['component'], module: string, out: number, inp: number, r: number): LoraModule => ({
    component, module, down: { shape: [r, inp], data: new Float32Array(r * inp).fill(0.1) }, up: { shape: [out, r], data: new Float32Array(out * r).fill(-0.2) }, alpha: r / 2,
  });
  const modules = [
    lin('unet', 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', 32, 32, 2),
    lin('text_encoder', 'text_model.encoder.layers.1.self_attn.q_proj', 16, 16, 2),
  ];
  await writeLoraKohya(file('kohya.safetensors'), modules, { metadata: { ss_network_dim: '2', ss_network_alpha: '1' } });
  await writeLoraPeft(file('peft.safetensors'), modules);
  const vectors = { shape: [2, 16] as [number, number], data: new Float32Array(32).fill(0.25) };
  await writeEmbeddingA1111(file('emb-a1111.safetensors'), { token: 'tok', vectors, path: '', format: 'a1111', step: 10 });
  await writeEmbeddingDiffusers(file('emb-diffusers.safetensors'), { token: '<tok>', vectors, path: '', format: 'diffusers' });
  for (const n of ['base', 'kohya', 'peft', 'emb-a1111', 'emb-diffusers']) bases[n] = await readFile(file(`${n}.safetensors`));

  // a PNG with the three kinds of text chunk
  await writePng(file('base.png'), new Uint8Array(4 * 4 * 3).fill(128), 4, 4, 'a cat, (best:1.2)\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Lora hashes: "a: 0123456789ab"');
  const png = await readFile(file('base.png'));
  const z = pngChunk('zTXt', Buffer.concat([Buffer.from('Comment\0\0', 'latin1'), deflateSync(Buffer.from('Steps: 1, Seed: 2, Size: 8x8', 'latin1'))]));
  const i = pngChunk('iTXt', Buffer.concat([Buffer.from('workflow\0\x01\0en\0Flow\0', 'latin1'), deflateSync(Buffer.from('{"猫": [1, 2]}', 'utf8'))]));
  bases.png = Buffer.concat([png.subarray(0, 33), z, i, png.subarray(33)]);
});
afterAll(async () => {
  disposeParams(model.unet!);
  disposeParams(model.textEncoder!);
  await rm(dir, { recursive: true, force: true });
});

/** Run `n` mutants through `load`; returns the failures (anything thrown that is not an SdtuneError). */
async function fuzz(reader: string, n: number, make: (r: Rng, i: number) => Buffer | string, load: (m: Buffer | string, i: number) => Promise<unknown> | unknown) {
  const failures: string[] = [];
  let loaded = 0;
  for (let i = 0; i < n; i++) {
    const r = prng(SEED ^ Math.imul(i + 1, 0x9e3779b1) ^ reader.length);
    const m = make(r, i);
    try {
      await load(m, i);
      loaded++;
    } catch (e) {
      if (!(e instanceof SdtuneError)) failures.push(`${reader} seed=${SEED} mutant #${i}: ${(e as Error)?.name}: ${String((e as Error)?.message ?? e).slice(0, 300)}`);
    }
  }
  return { failures, loaded };
}

/** Write a mutant file and return its path (a fresh name each time: readers get no cached state). */
async function asFile(m: Buffer | string, name: string): Promise<string> {
  const p = path.join(dir, name);
  await writeFile(p, m);
  return p;
}

describe(`fuzz: mutants of valid files load or throw SdtuneError (seed ${SEED}, ${N} per reader)`, () => {
  it('safetensors: header and body bytes (open + read every tensor)', async () => {
    const { failures, loaded } = await fuzz('safetensors', N, (r) => safetensorsMutant(bases.base!, r), async (m, i) => {
      const f = await SafetensorsFile.open(await asFile(m, `st-${i}.safetensors`));
      try {
        for (const k of f.keys()) await (k === 'ids' ? f.read(k) : f.readFloat(k));
      } finally {
        await f.close();
      }
    });
    expect(failures).toEqual([]);
    expect(loaded).toBeGreaterThan(0); // the sample also reaches the success paths
  });

  it('LoRA files (kohya and PEFT) through readLora', async () => {
    const { failures } = await fuzz('lora', N, (r, i) => safetensorsMutant(bases[i % 2 ? 'kohya' : 'peft']!, r), async (m, i) => readLora(await asFile(m, `lora-${i}.safetensors`), model));
    expect(failures).toEqual([]);
  });

  it('embeddings (A1111 and diffusers) through readEmbedding', async () => {
    const { failures } = await fuzz('embedding', N, (r, i) => safetensorsMutant(bases[i % 2 ? 'emb-a1111' : 'emb-diffusers']!, r), async (m, i) =>
      readEmbedding(await asFile(m, `emb-${i}.safetensors`), { expectedDim: 16 }),
    );
    expect(failures).toEqual([]);
  });

  it('PNG text chunks (tEXt, zTXt, iTXt) through readPngText, then parseInfotext on every text', async () => {
    const { failures, loaded } = await fuzz('png', N, (r) => pngMutant(bases.png!, r), async (m, i) => {
      const texts = await readPngText(await asFile(m, `png-${i}.png`));
      for (const t of Object.values(texts)) parseInfotext(t);
    });
    expect(failures).toEqual([]);
    expect(loaded).toBeGreaterThan(0);
  });

  it('infotext strings through parseInfotext (it never throws)', async () => {
    const text = 'a cat, (best:1.2)\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Note: "x, \\"y\\""';
    const { failures, loaded } = await fuzz('infotext', N, (r) => mutateSome(Buffer.from(text), r).toString('utf8'), (m) => parseInfotext(m as string));
    expect(failures).toEqual([]);
    expect(loaded).toBe(N);
  });

  it('YAML configs through resolveConfig', async () => {
    const { failures, loaded } = await fuzz('yaml', N, (r) => mutateSome(Buffer.from(CONFIG), r).toString('utf8'), (m) => resolveConfig('lora', m as string, {}, 'fuzz.yaml'));
    expect(failures).toEqual([]);
    expect(loaded).toBeGreaterThan(0);
  });
});
