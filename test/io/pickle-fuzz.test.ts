// Fuzzing the pickle reader (src/io/pickle.ts, src/io/zip.ts): fixed-seed mutants of real torch.save files (the
// golden A1111 embedding and hypernetwork zips) and of hand-made ones (a legacy stream, a zip of strided views), plus
// mutants of bare pickles run through `unpickle` in memory. Each mutant must load or throw an SdtuneError (never
// another error, never a hang; every length, count and depth is bounded by design). Mutations: bit flips, special
// bytes, truncations, inserted opcodes, deleted / duplicated runs, and length fields (BINUNICODE lengths, ints,
// memo indices, zip sizes and offsets) set huge. A failure names the seed file and the mutant's index; the counts
// per outcome are printed.
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readEmbedding } from '../../src/adapters/embeddings.js';
import { SdtuneError } from '../../src/errors.js';
import { TorchFile, unpickle } from '../../src/io/pickle.js';
import { HAVE_GOLDEN, golden } from '../golden.js';
import { P, callPickle, cat, dictPickle, tensorOps, torchLegacy, torchZip } from './pickle-bytes.js';

const SEED = 0x9e37;
const N_FILE = 300; // mutants per seed file
const N_MEMORY = 600; // mutants per bare pickle

/** mulberry32, so each mutant can be rebuilt from (seed, index). */
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

/** Opcode bytes worth inserting: containers, memo, calls, globals, persistent ids, long lengths, frames. */
const OPCODES = [0x28, 0x29, 0x2e, 0x30, 0x31, 0x32, 0x51, 0x52, 0x58, 0x5d, 0x61, 0x62, 0x63, 0x65, 0x68, 0x6a, 0x71, 0x72, 0x73, 0x74, 0x75, 0x7d,
  0x81, 0x85, 0x86, 0x87, 0x8a, 0x8b, 0x8d, 0x8e, 0x93, 0x94, 0x95, 0x97, 0x82];
const HUGE = [0xffffffff, 0xfffffff0, 0x7fffffff, 0x80000000, 0x40000000, 10_000_000];

/** Positions of `byte` in b[from, to). */
function positions(b: Buffer, byte: number, from: number, to: number): number[] {
  const out: number[] = [];
  for (let i = from; i < to; i++) if (b[i] === byte) out.push(i);
  return out;
}

/** One random edit of the pickle region [from, to) of `b` (or of the zip directory / end record). */
function mutate(b: Buffer, r: Rng, from: number, to: number): Buffer {
  const at = from + r.int(Math.max(1, to - from));
  const len = 1 + r.int(Math.min(32, Math.max(1, to - at)));
  const c = Buffer.from(b);
  switch (r.int(9)) {
    case 0: // bit flip
      c[at] ^= 1 << r.int(8);
      return c;
    case 1: // special bytes
      for (let i = at; i < Math.min(c.length, at + len); i++) c[i] = r.pick([0, 0xff, 0x7f, 0x80, 0x28, 0x2e, r.int(256)]);
      return c;
    case 2: // truncate
      return c.subarray(0, at);
    case 3: // insert opcodes
      return Buffer.concat([c.subarray(0, at), Buffer.from(Array.from({ length: 1 + r.int(6) }, () => r.pick(OPCODES))), c.subarray(at)]);
    case 4: // delete a run
      return Buffer.concat([c.subarray(0, at), c.subarray(Math.min(c.length, at + len))]);
    case 5: // duplicate a run
      return Buffer.concat([c.subarray(0, at + len), c.subarray(at, Math.min(c.length, at + len)), c.subarray(at + len)]);
    case 6: { // a BINUNICODE / LONG_BINPUT / LONG_BINGET / BININT length or index set huge
      const ps = [0x58, 0x72, 0x6a, 0x4a].flatMap((op) => positions(c, op, from, to - 4));
      if (!ps.length) return c;
      c.writeUInt32LE(r.pick(HUGE), r.pick(ps) + 1);
      return c;
    }
    case 7: { // a small int (storage size, offset, shape, stride) or memo index set to its maximum
      const ps = [0x4b, 0x4d, 0x68, 0x71].flatMap((op) => positions(c, op, from, to - 2));
      if (!ps.length) return c;
      const p = r.pick(ps);
      c[p + 1] = 0xff;
      if (c[p] === 0x4d) c[p + 2] = 0xff;
      return c;
    }
    default: { // a zip size / offset / count field set huge (central directory record or end record)
      const cen = positions(c, 0x50, 0, c.length - 46).filter((i) => c.readUInt32LE(i) === 0x02014b50);
      const end = positions(c, 0x50, 0, c.length - 22).filter((i) => c.readUInt32LE(i) === 0x06054b50);
      if (cen.length && r.int(3)) c.writeUInt32LE(r.pick(HUGE), r.pick(cen) + r.pick([20, 24, 42]));
      else if (end.length) {
        const e = r.pick(end), f = r.pick([10, 12, 16]);
        if (f === 10) c.writeUInt16LE(0xffff, e + 10);
        else c.writeUInt32LE(r.pick(HUGE), e + f);
      }
      return c;
    }
  }
}

/** The byte range of `archive/data.pkl` inside a torch zip (local header 30 + name + extra, then the data). */
function pickleRange(zip: Buffer): [number, number] {
  const name = zip.readUInt16LE(26), extra = zip.readUInt16LE(28);
  const cen = zip.indexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02]));
  return [30 + name + extra, 30 + name + extra + zip.readUInt32LE(cen + 24)];
}

type Outcome = 'loaded' | 'refused' | 'format' | 'file' | 'other';
const counts = new Map<string, Record<Outcome, number>>();
const tally = (seed: string, o: Outcome) => {
  const c = counts.get(seed) ?? { loaded: 0, refused: 0, format: 0, file: 0, other: 0 };
  c[o]++;
  counts.set(seed, c);
};
function outcomeOf(e: unknown): Outcome {
  if (e === undefined) return 'loaded';
  if (!(e instanceof SdtuneError)) return 'other';
  return e.kind === 'unsupported' ? 'refused' : e.kind === 'file' ? 'file' : 'format';
}

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'sdtune-pickle-fuzz-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
  const total = [...counts.values()].reduce((n, c) => n + Object.values(c).reduce((a, b) => a + b, 0), 0);
  const lines = [...counts].map(([s, c]) => `  ${s}: ${Object.entries(c).map(([k, v]) => `${k} ${v}`).join(', ')}`);
  console.log(`pickle fuzz: ${total} mutants\n${lines.join('\n')}`);
});

/** Seed files: golden zips when present, and hand-made ones that need no reference data. */
function seedFiles(): [string, Buffer, 'embedding' | 'torch'][] {
  const views = Float32Array.from({ length: 12 }, (_, i) => i);
  const zip = torchZip(dictPickle([
    ['w', tensorOps('FloatStorage', '0', 12, 0, [3, 4], [4, 1])],
    ['t', tensorOps('FloatStorage', '0', 12, 1, [3, 3], [1, 4])],
    ['h', tensorOps('HalfStorage', '1', 2, 0, [2], [1])],
    ['meta', cat(P.str('m'), P.put(200), P.emptyList(), P.mark(), P.int(1), P.float(0.5), P.str('x'), P.get(200), P.appends(), P.tuple2())],
  ]), [['0', new Uint8Array(views.buffer)], ['1', new Uint8Array([0, 0x3c, 0, 0xc0])]]);
  const legacy = torchLegacy(dictPickle([['w', tensorOps('FloatStorage', '7', 6, 0, [2, 3], [3, 1], true)], ['b', tensorOps('FloatStorage', '3', 2, 0, [2], [1], true)]]),
    [['3', 2, new Uint8Array(8)], ['7', 6, new Uint8Array(new Float32Array([1, 2, 3, 4, 5, 6]).buffer)]]);
  const out: [string, Buffer, 'embedding' | 'torch'][] = [['views.pt (zip)', zip, 'torch'], ['legacy.pt', legacy, 'torch']];
  if (HAVE_GOLDEN) {
    out.push(['embedding-a1111.pt', readFileSync(golden('pickle', 'embedding-a1111.pt')), 'embedding']);
    out.push(['hypernetwork-a1111.pt', readFileSync(golden('pickle', 'hypernetwork-a1111.pt')), 'torch']);
  }
  return out;
}

describe('pickle reader fuzz', () => {
  it(`${N_FILE} mutants per seed file, opened and every tensor read: only SdtuneErrors`, async () => {
    const r = prng(SEED);
    const open = async (file: string, as: 'embedding' | 'torch') => {
      if (as === 'embedding') return void (await readEmbedding(file));
      const f = await TorchFile.open(file);
      try {
        for (const k of f.keys()) await f.read(k);
      } finally {
        await f.close();
      }
    };
    for (const [name, seed, as] of seedFiles()) {
      await writeFile(path.join(tmp, 'seed.pt'), seed);
      await open(path.join(tmp, 'seed.pt'), as); // the unmutated seed loads
      const isZip = seed[0] === 0x50;
      const [from, to] = isZip ? pickleRange(seed) : [0, seed.length];
      for (let i = 0; i < N_FILE; i++) {
        // mostly the pickle; a fifth of the time anywhere (zip records, directory, storage bytes)
        const m = r.int(5) ? mutate(seed, r, from, to) : mutate(seed, r, 0, seed.length);
        const file = path.join(tmp, `${i}-${name.replace(/\W/g, '_')}.pt`);
        await writeFile(file, m);
        let err: unknown;
        try {
          await open(file, as);
        } catch (e) {
          err = e;
        }
        tally(name, outcomeOf(err));
        if (outcomeOf(err) === 'other') throw new Error(`${name} mutant ${i} (seed ${SEED}): ${(err as Error)?.stack ?? err}`);
      }
    }
    const done = [...counts.values()].reduce((n, c) => n + c.loaded + c.refused + c.format + c.file, 0);
    expect(done).toBeGreaterThanOrEqual(2 * N_FILE);
  }, 60_000);

  it(`${N_MEMORY} mutants per bare pickle through unpickle: only SdtuneErrors`, () => {
    const r = prng(SEED + 1);
    const bare: [string, Buffer][] = [
      ['dict of tensors (protocol 2)', dictPickle([['w', tensorOps('FloatStorage', '0', 12, 0, [3, 4], [4, 1])], ['n', P.int(70000)], ['s', P.str('é猫')]])],
      ['payload (protocol 2)', callPickle('posix', 'system', 'echo MALICIOUS')],
      ['protocol 0 text', Buffer.from("(dp0\nS'a'\np1\nI42\nsVb\np2\n(lp3\nF1.5\naI01\naL12345678901234567890L\nas.", 'latin1')],
    ];
    const storage = (pid: unknown) => ({ kind: 'storage' as const, dtype: 'F32' as const, key: String((pid as unknown[])?.[2]), location: 'cpu', numel: 12 });
    for (const [name, seed] of bare) {
      if (!name.startsWith('payload')) unpickle(seed, { file: 'seed.pkl', persistentLoad: storage }); // the seed parses
      for (let i = 0; i < N_MEMORY; i++) {
        const m = mutate(seed, r, 0, seed.length);
        let err: unknown;
        try {
          unpickle(m, { file: 'fuzz.pkl', persistentLoad: storage });
        } catch (e) {
          err = e;
        }
        tally(`in memory: ${name}`, outcomeOf(err));
        if (outcomeOf(err) === 'other') throw new Error(`${name} mutant ${i} (seed ${SEED + 1}): ${(err as Error)?.stack ?? err}`);
      }
    }
  });
});
