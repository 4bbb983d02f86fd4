// The pickle reader (src/io/pickle.ts) on the real torch.save files of ../shared/golden/pickle (each handled as its
// README says) and on hand-assembled pickles for what those files do not cover: other protocols, views, bounds.
import * as tf from '@tensorflow/tfjs';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readEmbedding } from '../../src/adapters/embeddings.js';
import { readLora } from '../../src/adapters/lora.js';
import { SdtuneError } from '../../src/errors.js';
import { convertCheckpoint } from '../../src/io/convert.js';
import { readImageRgb, readPngText } from '../../src/io/png.js';
import { sampleToFiles } from '../../src/infer/sample.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { TorchFile, isTensor, readHypernetworkPt, unpickle } from '../../src/io/pickle.js';
import { SafetensorsFile, f16BitsToF32, f32ToF16Bits } from '../../src/io/safetensors.js';
import { flattenParams } from '../../src/models/params.js';
import { unet } from '../../src/models/unet.js';
import { atolOf, caseTensors, describeGolden, golden } from '../golden.js';
import { maxAbsDiff, nhwc, toNchw } from '../helpers.js';
import { P, callPickle, cat, dictPickle, storedZip, tensorOps, torchLegacy, torchZip } from './pickle-bytes.js';

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'sdtune-pickle-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const G = (f: string) => golden('pickle', f);
const bytesOf = (d: Float32Array | Int32Array) => Buffer.from(d.buffer, d.byteOffset, d.byteLength);

async function errorOf(p: Promise<unknown>): Promise<SdtuneError> {
  const e = await p.then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(SdtuneError);
  return e as SdtuneError;
}

/** Every tensor of `a` equals `b`'s of the same key, bit for bit, in the same order. */
async function expectSameTensors(a: TorchFile, b: SafetensorsFile) {
  expect(a.keys()).toEqual(b.keys());
  for (const k of b.keys()) {
    const x = await a.read(k), y = await b.read(k);
    expect([x.dtype, x.shape], k).toEqual([y.dtype, y.shape]);
    expect(bytesOf(x.data).equals(bytesOf(y.data)), k).toBe(true);
  }
}

describeGolden('golden pickles (../shared/golden/pickle)', () => {
  it('tiny-sd.ckpt, tiny-sd-legacy.ckpt and tiny-sd-fp16.ckpt hold the safetensors tensors exactly', async () => {
    for (const [ck, sf, format] of [['tiny-sd.ckpt', 'tiny-sd.safetensors', 'zip'], ['tiny-sd-legacy.ckpt', 'tiny-sd.safetensors', 'legacy'], ['tiny-sd-fp16.ckpt', 'tiny-sd-fp16.safetensors', 'zip']]) {
      const a = await TorchFile.open(G(ck), { stateDict: true });
      const b = await SafetensorsFile.open(golden(sf));
      try {
        expect(a.format).toBe(format);
        expect(a.keys()).toHaveLength(980);
        await expectSameTensors(a, b);
        // Lightning's top level around state_dict
        const root = a.root as Map<unknown, unknown>;
        expect([...root.keys()]).toEqual(['epoch', 'global_step', 'state_dict']);
        expect([root.get('epoch'), root.get('global_step')]).toEqual([6, 840000]);
      } finally {
        await Promise.all([a.close(), b.close()]);
      }
    }
  });

  describe('loadModel on the .ckpt', () => {
    let fromCkpt: LoadedModel, fromLegacy: LoadedModel, fromSafetensors: LoadedModel;
    beforeAll(async () => {
      const opts = { configDir: golden('tiny-sd') }; // the tiny text encoder's head count cannot be inferred from shapes
      fromCkpt = await loadModel(G('tiny-sd.ckpt'), opts);
      fromLegacy = await loadModel(G('tiny-sd-legacy.ckpt'), { ...opts, components: ['unet'] });
      fromSafetensors = await loadModel(golden('tiny-sd.safetensors'), opts);
    });
    afterAll(() => [fromCkpt, fromLegacy, fromSafetensors].forEach((m) => m && disposeModel(m)));

    it('loads through the LDM key map: the same params, layout and configs as the single-file .safetensors', async () => {
      expect(fromCkpt.layout).toBe('single-file');
      for (const part of ['unet', 'vae', 'textEncoder'] as const) {
        expect(fromCkpt[part]!.config).toEqual(fromSafetensors[part]!.config);
        const a = flattenParams(fromCkpt[part]!.params), b = flattenParams(fromSafetensors[part]!.params);
        expect([...a.keys()]).toEqual([...b.keys()]);
        for (const [k, t] of a) expect(maxAbsDiff(await t.data(), await b.get(k)!.data()), `${part} ${k}`).toBe(0);
      }
      const la = flattenParams(fromLegacy.unet!.params), lb = flattenParams(fromSafetensors.unet!.params);
      for (const [k, t] of la) expect(maxAbsDiff(await t.data(), await lb.get(k)!.data()), `legacy ${k}`).toBe(0);
    });

    it('a UNet forward from the .ckpt equals the .safetensors one and the golden noise prediction', async () => {
      const c = await caseTensors('unet');
      const x = nhwc(c.get('sample')!);
      const ehs = c.get('encoder_hidden_states')!;
      const ctx = tf.tensor3d(ehs.data as Float32Array, ehs.shape as [number, number, number]);
      const ts = tf.tensor1d(c.get('timesteps')!.data as Int32Array, 'int32');
      const ya = unet(fromCkpt.unet!.params, fromCkpt.unet!.config, x, ts, ctx);
      const yb = unet(fromSafetensors.unet!.params, fromSafetensors.unet!.config, x, ts, ctx);
      const a = await toNchw(ya), b = await toNchw(yb);
      expect(maxAbsDiff(a, b)).toBe(0);
      expect(maxAbsDiff(a, c.get('noise_pred')!.data)).toBeLessThanOrEqual(atolOf('unet'));
      tf.dispose([x, ctx, ts, ya, yb]);
    });
  });

  it('a short sample with the .ckpt model, the .pt LoRA and the .pt embedding is the image of their safetensors', async () => {
    const run = async (model: string, lora: string, embedding: { path: string; token?: string }, out: string) => {
      await sampleToFiles({ model, load: { configDir: golden('tiny-sd') }, prompt: 'a embedding-a1111 cat', steps: 2, seed: 1, lora: [{ path: lora, weight: 0.8 }], embedding: [embedding], out, quiet: true, log: () => {} });
      return readImageRgb(out);
    };
    const a = await run(G('tiny-sd.ckpt'), G('lora-kohya.pt'), { path: G('embedding-a1111.pt') }, path.join(tmp, 'from-pickles.png'));
    const b = await run(golden('tiny-sd.safetensors'), golden('lora', 'tiny_lora_kohya.safetensors'), { path: golden('textual_inversion', 'my-token-a1111.safetensors'), token: 'embedding-a1111' }, path.join(tmp, 'from-safetensors.png'));
    expect([a.width, a.height]).toEqual([64, 64]);
    expect(Buffer.from(a.data).equals(Buffer.from(b.data))).toBe(true);
    // A1111 names the model and the LoRA by their files' stems, whatever the extension
    const text = (await readPngText(path.join(tmp, 'from-pickles.png'))).parameters;
    expect(text).toMatch(/, Model: tiny-sd,/);
    expect(text).toMatch(/Lora hashes: "lora-kohya: [0-9a-f]{12}"/);
  });

  it('embedding-a1111.pt: string_to_param["*"] is the A1111 safetensors embedding; its fields as the README lists', async () => {
    const e = await readEmbedding(G('embedding-a1111.pt'));
    const ref = await readEmbedding(golden('textual_inversion', 'my-token-a1111.safetensors'));
    expect(e.format).toBe('a1111');
    expect(e.token).toBe('embedding-a1111'); // A1111: the file-name stem
    expect(e.step).toBe(500);
    expect(e.vectors.shape).toEqual([2, 32]);
    expect(bytesOf(e.vectors.data).equals(bytesOf(ref.vectors.data))).toBe(true);
    const f = await TorchFile.open(G('embedding-a1111.pt'));
    try {
      expect(f.metadata).toEqual({ 'string_to_token.*': '265', name: 'my-token', step: '500', sd_checkpoint: '799fdea07d', sd_checkpoint_name: 'tiny-sd' });
      const hash = createHash('sha256').update(readFileSync(golden('tiny-sd.safetensors'))).digest('hex').slice(0, 10);
      expect(f.metadata.sd_checkpoint).toBe(hash);
      expect(f.info('string_to_param.*').tensor.requiresGrad).toBe(true);
    } finally {
      await f.close();
    }
  });

  it('hypernetwork-a1111.pt: plain fields and [k, v] state dicts equal ../hypernetwork/tiny_hypernet.safetensors', async () => {
    const h = await readHypernetworkPt(G('hypernetwork-a1111.pt'));
    const ref = await SafetensorsFile.open(golden('hypernetwork', 'tiny_hypernet.safetensors'));
    try {
      expect(Object.keys(h.fields)).toEqual(['step', 'name', 'layer_structure', 'activation_func', 'is_layer_norm', 'weight_initialization', 'sd_checkpoint',
        'sd_checkpoint_name', 'activate_output', 'use_dropout', 'dropout_structure', 'last_layer_dropout', 'optional_info']);
      for (const [k, v] of Object.entries(ref.metadata)) expect(h.fields[k], k).toEqual(k === 'name' || k === 'activation_func' || k === 'weight_initialization' ? v : JSON.parse(v));
      expect([...h.layers.keys()]).toEqual([32]);
      const [kd, vd] = h.layers.get(32)!;
      for (const [i, sd] of [kd, vd].entries()) {
        expect([...sd.keys()]).toEqual(['linear.0.weight', 'linear.0.bias', 'linear.2.weight', 'linear.2.bias']);
        for (const [name, t] of sd) {
          const r = await ref.read(`32.${i}.${name}`);
          expect(t.shape).toEqual(r.shape);
          expect(bytesOf((await t.load()) as Float32Array).equals(bytesOf(r.data))).toBe(true);
        }
      }
    } finally {
      await Promise.all([h.close(), ref.close()]);
    }
  });

  it('lora-kohya.pt equals the kohya safetensors (fp16: its values rounded to half), and readLora reads it the same', async () => {
    const ref = await SafetensorsFile.open(golden('lora', 'tiny_lora_kohya.safetensors'));
    const a = await TorchFile.open(G('lora-kohya.pt'));
    const h = await TorchFile.open(G('lora-kohya-fp16.pt'));
    try {
      await expectSameTensors(a, ref);
      expect(h.keys()).toEqual(ref.keys());
      expect(h.keys()).toHaveLength(420);
      for (const k of ref.keys()) {
        const x = await h.read(k), y = await ref.read(k);
        expect(x.dtype).toBe('F16');
        expect(bytesOf(x.data).equals(bytesOf(f16BitsToF32(f32ToF16Bits(y.data as Float32Array)))), k).toBe(true);
      }
    } finally {
      await Promise.all([a.close(), h.close(), ref.close()]);
    }
    const m = await loadModel(golden('tiny-sd'), { components: ['unet', 'text_encoder'] });
    try {
      const model = { unet: m.unet!.params, textEncoder: m.textEncoder!.params };
      const [pt, st] = [await readLora(G('lora-kohya.pt'), model), await readLora(golden('lora', 'tiny_lora_kohya.safetensors'), model)];
      expect(pt.format).toBe('kohya');
      expect(pt.modules.map((x) => [x.module, x.alpha])).toEqual(st.modules.map((x) => [x.module, x.alpha]));
      pt.modules.forEach((x, i) => expect(bytesOf(x.down.data).equals(bytesOf(st.modules[i].down.data)) && bytesOf(x.up.data).equals(bytesOf(st.modules[i].up.data))).toBe(true));
      const fp16 = await readLora(G('lora-kohya-fp16.pt'), model);
      expect(fp16.modules).toHaveLength(st.modules.length);
    } finally {
      disposeModel(m);
    }
  });

  it('malicious.pt and malicious-legacy.pkl are refused naming posix.system, before anything runs', async () => {
    for (const f of ['malicious.pt', 'malicious-legacy.pkl']) {
      const bytes = await readFile(G(f));
      expect(bytes.includes(Buffer.from('echo MALICIOUS_PICKLE_PAYLOAD_EXECUTED'))).toBe(true); // the payload is there
      const e = await errorOf(TorchFile.open(G(f)));
      expect(e.kind).toBe('unsupported');
      expect(e.message).toBe(`refusing to load ${G(f)}: it calls posix.system (not a tensor); convert it in a sandbox or ask its author for a .safetensors`);
      // every loader refuses it the same way
      expect((await errorOf(loadModel(G(f)))).message).toMatch(/it calls posix\.system/);
      expect((await errorOf(readEmbedding(G(f)))).message).toMatch(/it calls posix\.system/);
      expect((await errorOf(readLora(G(f), {}))).message).toMatch(/it calls posix\.system/);
    }
  });
});

describeGolden('convert from pickles', () => {
  it('tiny-sd.ckpt converts to the same single file as tiny-sd.safetensors, byte for byte', async () => {
    const a = path.join(tmp, 'from-ckpt.safetensors'), b = path.join(tmp, 'from-st.safetensors');
    const ra = await convertCheckpoint(G('tiny-sd.ckpt'), a, { configDir: golden('tiny-sd') });
    await convertCheckpoint(golden('tiny-sd.safetensors'), b, { configDir: golden('tiny-sd') });
    expect(ra.layout).toBe('single-file');
    expect((await readFile(a)).equals(await readFile(b))).toBe(true);
  });

  it('`sdtune convert tiny-sd-fp16.ckpt x.safetensors` keeps float16 and the LDM tensors of tiny-sd-fp16.safetensors', async () => {
    const out = path.join(tmp, 'cli-fp16.safetensors');
    const bin = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/sdtune.js');
    const r = spawnSync(process.execPath, [bin, 'convert', G('tiny-sd-fp16.ckpt'), out, '--config', golden('tiny-sd')], { encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/wrote .*cli-fp16\.safetensors \(single-file, \d+ tensors/);
    const [x, y] = [await SafetensorsFile.open(out), await SafetensorsFile.open(golden('tiny-sd-fp16.safetensors'))];
    try {
      expect([...x.keys()].sort()).toEqual([...y.keys()].sort());
      for (const k of y.keys()) {
        const [p, q] = [await x.read(k), await y.read(k)];
        expect([p.dtype, p.shape], k).toEqual([q.dtype, q.shape]);
        expect(bytesOf(p.data).equals(bytesOf(q.data)), k).toBe(true);
      }
    } finally {
      await Promise.all([x.close(), y.close()]);
    }
  });

  it('a hypernetwork .pt and an embedding .pt re-save as flat safetensors that read the same', async () => {
    const hn = path.join(tmp, 'hn.safetensors');
    const r = await convertCheckpoint(G('hypernetwork-a1111.pt'), hn);
    expect([r.layout, r.tensors]).toEqual(['tensors', 8]);
    const [x, ref] = [await SafetensorsFile.open(hn), await SafetensorsFile.open(golden('hypernetwork', 'tiny_hypernet.safetensors'))];
    try {
      expect(x.keys()).toEqual(ref.keys());
      for (const k of ref.keys()) expect(bytesOf((await x.read(k)).data).equals(bytesOf((await ref.read(k)).data)), k).toBe(true);
      expect(Object.keys(x.metadata).sort()).toEqual(Object.keys(ref.metadata).sort());
      for (const [k, v] of Object.entries(ref.metadata)) expect(x.metadata[k] === v || JSON.stringify(JSON.parse(x.metadata[k])) === JSON.stringify(JSON.parse(v)), k).toBe(true);
    } finally {
      await Promise.all([x.close(), ref.close()]);
    }
    const emb = path.join(tmp, 'embedding-a1111.safetensors');
    await convertCheckpoint(G('embedding-a1111.pt'), emb);
    const [e, pt] = [await readEmbedding(emb), await readEmbedding(G('embedding-a1111.pt'))];
    expect([e.token, e.format, e.step, e.vectors.shape]).toEqual([pt.token, pt.format, pt.step, pt.vectors.shape]);
    expect(bytesOf(e.vectors.data).equals(bytesOf(pt.vectors.data))).toBe(true);
    expect((await errorOf(convertCheckpoint(G('malicious.pt'), path.join(tmp, 'm.safetensors')))).message).toMatch(/it calls posix\.system/);
  });
});

describe('malicious payloads do not run', () => {
  /** The golden files' payload with a command that leaves a marker file, in a plain pickle and in a torch zip. */
  const variants = (marker: string) => {
    const plain = callPickle('posix', 'system', `touch ${marker}`);
    const zip = torchZip(
      dictPickle([['state_dict', cat(P.global('collections', 'OrderedDict'), P.emptyTuple(), P.reduce(), P.str('weight'), tensorOps('FloatStorage', '0', 4, 0, [4], [1]), P.setitem())],
        ['payload', cat(P.global('posix', 'system'), P.str(`touch ${marker}`), P.tuple1(), P.reduce())]]),
      [['0', new Uint8Array(16)]],
    );
    const stack = cat(P.proto(4), P.str('os'), P.str('system'), Buffer.from([0x93]), P.str(`touch ${marker}`), P.tuple1(), P.reduce(), P.stop());
    const inst = Buffer.concat([Buffer.from('(S\'touch ' + marker + "'\nios\nsystem\n.", 'latin1')]);
    return { plain, zip, stack, inst };
  };

  it('every variant is refused naming the global, and its marker file does not exist afterwards', async () => {
    for (const [name, bytes] of Object.entries(variants(path.join(tmp, 'MARKER')))) {
      const file = path.join(tmp, `evil-${name}.pt`);
      await writeFile(file, bytes);
      const e = await errorOf(TorchFile.open(file));
      expect(e.message, name).toMatch(name === 'stack' || name === 'inst' ? /it calls os\.system \(not a tensor\)/ : /it calls posix\.system \(not a tensor\)/);
      expect(existsSync(path.join(tmp, 'MARKER')), name).toBe(false);
    }
  });

  // The same bytes are live: Python's own unpickler runs them (in a scratch folder). Shows the marker test can fail.
  it.skipIf(spawnSync('python3', ['-c', 'import pickle'], { encoding: 'utf8' }).status !== 0)('(python3 present) the plain variant does run under pickle.loads', async () => {
    const marker = path.join(tmp, 'PYTHON_RAN');
    const file = path.join(tmp, 'live.pkl');
    await writeFile(file, variants(marker).plain);
    const r = spawnSync('python3', ['-c', `import pickle; pickle.loads(open(${JSON.stringify(file)}, 'rb').read())`], { encoding: 'utf8', cwd: tmp });
    expect(r.status).toBe(0);
    expect(existsSync(marker)).toBe(true);
  });
});

describe('pickle opcodes and containers (hand-assembled)', () => {
  const value = (bytes: Buffer) => unpickle(bytes, { file: 'x.pkl' }).value;

  it('protocol 0 text opcodes, protocol 4 framing / memoize / short strings, bytes via _codecs.encode', () => {
    expect(value(Buffer.from("(dp0\nS'a'\np1\nI42\nsVb\np2\n(lp3\nF1.5\naI01\naL12345678901234567890L\nas.", 'latin1'))).toEqual(
      new Map<unknown, unknown>([['a', 42], ['b', [1.5, true, 12345678901234567890n]]]));
    const p4 = cat(P.proto(4), Buffer.from([0x95]), Buffer.alloc(8), Buffer.from([0x8c, 1]), Buffer.from('k'), Buffer.from([0x94]), Buffer.from([0x8c, 2]), Buffer.from('vv'),
      Buffer.from([0x94]), P.tuple2(), Buffer.from([0x94]), P.stop());
    p4.writeUInt32LE(p4.length - 11, 3);
    expect(value(p4)).toEqual(['k', 'vv']);
    const bytes = cat(P.proto(2), P.global('_codecs', 'encode'), P.str('\u00ff\u0001'), P.str('latin1'), P.tuple2(), P.reduce(), P.stop());
    expect(value(bytes)).toEqual(new Uint8Array([255, 1]));
    expect(value(cat(P.proto(2), P.long1([0xff, 0x7f]), P.stop()))).toBe(32767);
    expect(value(cat(P.proto(2), P.long1([0x00, 0x80]), P.stop()))).toBe(-32768);
  });

  it('views of one storage (offset, transpose, expand) are gathered by stride; a view past its storage is refused', async () => {
    const data = Float32Array.from({ length: 12 }, (_, i) => i);
    const pkl = dictPickle([
      ['full', tensorOps('FloatStorage', '0', 12, 0, [3, 4], [4, 1])],
      ['row1', tensorOps('FloatStorage', '0', 12, 4, [4], [1])],
      ['t', tensorOps('FloatStorage', '0', 12, 0, [4, 3], [1, 4])],
      ['col2', tensorOps('FloatStorage', '0', 12, 2, [3], [4])],
      ['bcast', tensorOps('FloatStorage', '0', 12, 1, [2, 3], [0, 1])],
      ['scalar', tensorOps('FloatStorage', '0', 12, 11, [], [])],
      ['empty', tensorOps('FloatStorage', '0', 12, 0, [0, 4], [4, 1])],
    ]);
    const file = path.join(tmp, 'views.pt');
    await writeFile(file, torchZip(pkl, [['0', new Uint8Array(data.buffer)]]));
    const f = await TorchFile.open(file);
    try {
      const get = async (k: string) => [...(await f.read(k)).data];
      expect(await get('full')).toEqual([...data]);
      expect(await get('row1')).toEqual([4, 5, 6, 7]);
      expect(await get('t')).toEqual([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
      expect(await get('col2')).toEqual([2, 6, 10]);
      expect(await get('bcast')).toEqual([1, 2, 3, 1, 2, 3]);
      expect(await get('scalar')).toEqual([11]);
      expect((await f.read('empty')).shape).toEqual([0, 4]);
    } finally {
      await f.close();
    }
    const over = path.join(tmp, 'over.pt');
    await writeFile(over, torchZip(dictPickle([['w', tensorOps('FloatStorage', '0', 12, 8, [2, 3], [3, 1])]]), [['0', new Uint8Array(data.buffer)]]));
    const g = await TorchFile.open(over);
    expect((await errorOf(g.read('w'))).message).toMatch(/reaches past its storage "0" of 48 bytes/);
    await g.close();
  });

  it('a small legacy stream and a deflated data.pkl read; a deflated storage is refused with the way out', async () => {
    const d = Float32Array.from([1, 2, 3]);
    const file = path.join(tmp, 'legacy.pt');
    await writeFile(file, torchLegacy(dictPickle([['w', tensorOps('DoubleStorage', '9', 3, 0, [3], [1], true)]]), [['9', 3, new Uint8Array(new Float64Array(d).buffer)]]));
    const f = await TorchFile.open(file);
    expect(f.format).toBe('legacy');
    expect([...(await f.read('w')).data]).toEqual([1, 2, 3]);
    await f.close();
    const wrong = path.join(tmp, 'legacy-count.pt');
    await writeFile(wrong, torchLegacy(dictPickle([['w', tensorOps('DoubleStorage', '9', 3, 0, [3], [1], true)]]), [['9', 4, new Uint8Array(24)]]));
    expect((await errorOf(TorchFile.open(wrong))).message).toMatch(/storage "9" at byte \d+ has 4 elements, the object says 3/);
    const pkl = dictPickle([['w', tensorOps('FloatStorage', '0', 3, 0, [3], [1])]]);
    const zipped = path.join(tmp, 'deflated-pkl.pt');
    await writeFile(zipped, torchZip(pkl, [['0', new Uint8Array(d.buffer)]], { pickle: true }));
    const z = await TorchFile.open(zipped);
    expect([...(await z.read('w')).data]).toEqual([1, 2, 3]);
    await z.close();
    const zs = path.join(tmp, 'deflated-storage.pt');
    await writeFile(zs, torchZip(pkl, [['0', new Uint8Array(d.buffer)]], { storages: true }));
    expect((await errorOf(TorchFile.open(zs))).message).toMatch(/storage "archive\/data\/0" is compressed \(zip method 8\).*zip -0/);
  });

  it('bounds: huge length fields, deep nesting, cycles, bad memo reads, unknown opcodes -> one clear SdtuneError each', async () => {
    const cases: [string, Buffer, RegExp][] = [
      ['BINUNICODE past the end', cat(P.proto(2), Buffer.from([0x58, 0xf0, 0xff, 0xff, 0xff]), Buffer.from('abc'), P.stop()), /claims 4294967280 bytes/],
      ['BINUNICODE8 of 10 GB', cat(P.proto(4), Buffer.from([0x8d]), (() => { const o = Buffer.alloc(8); o.writeBigUInt64LE(10n ** 10n); return o; })(), P.stop()), /claims 10000000000 bytes/],
      ['truncated', cat(P.proto(2), P.emptyDict()), /ends at byte 3 in the middle of an opcode/],
      ['LONG4 of 1 GB', cat(P.proto(2), Buffer.from([0x8b, 0, 0, 0, 0x40]), P.stop()), /a LONG of 1073741824 bytes/],
      ['deep MARKs', cat(P.proto(2), Buffer.alloc(20_000, 0x28), P.stop()), /more than 10000 nested MARKs/],
      ['memo read first', cat(P.proto(2), P.get(7), P.stop()), /memo entry 7 is read before it is written/],
      ['unknown opcode', cat(P.proto(2), Buffer.from([0xff]), P.stop()), /unknown pickle opcode 0xff/],
      ['protocol 6', cat(P.proto(6), P.none(), P.stop()), /protocol 6 is newer than 5/],
      ['persistent id outside torch', cat(P.proto(2), P.str('x'), P.binpersid(), P.stop()), /persistent id/],
      ['EXT1', cat(P.proto(2), Buffer.from([0x82, 1]), P.stop()), /copyreg extension registry/],
      ['REDUCE on a string', cat(P.proto(2), P.str('f'), P.emptyTuple(), P.reduce(), P.stop()), /not a function/],
      ['eval', cat(P.proto(2), P.global('builtins', 'eval'), P.stop()), /it calls builtins\.eval \(not a tensor\)/],
      ['getattr (py2 name)', cat(P.proto(2), P.global('__builtin__', 'getattr'), P.stop()), /it calls builtins\.getattr/],
      ['torch.load', cat(P.proto(2), P.global('torch', 'load'), P.stop()), /it calls torch\.load/],
      ['quantized', cat(P.proto(2), P.global('torch._utils', '_rebuild_qtensor'), P.stop()), /a quantized tensor/],
    ];
    for (const [name, bytes, re] of cases) {
      const e = (() => { try { value(bytes); } catch (x) { return x; } })();
      expect(e, name).toBeInstanceOf(SdtuneError);
      expect((e as Error).message, name).toMatch(re);
    }
    // structures a consumer walks: 100-deep lists, a list that contains itself
    const deep = cat(P.proto(2), ...Array.from({ length: 100 }, () => P.emptyList()), ...Array.from({ length: 99 }, () => P.append()), P.stop());
    await writeFile(path.join(tmp, 'deep.pkl'), deep);
    expect((await errorOf(TorchFile.open(path.join(tmp, 'deep.pkl')))).message).toMatch(/nests deeper than 64 levels/);
    // "billion laughs": 40 levels of [prev, prev] through the memo (2^40 paths, 200 bytes of pickle)
    const laughs = cat(P.proto(2), P.emptyList(), P.put(0), ...Array.from({ length: 40 }, (_, i) => cat(Buffer.from([0x30]), P.emptyList(), P.get(i), P.append(), P.get(i), P.append(), P.put(i + 1))), P.stop());
    await writeFile(path.join(tmp, 'laughs.pkl'), laughs);
    expect((await errorOf(TorchFile.open(path.join(tmp, 'laughs.pkl')))).message).toMatch(/more than 2,000,000 parts/);
    const cyc = cat(P.proto(2), P.emptyList(), P.put(0), P.get(0), P.append(), P.stop());
    await writeFile(path.join(tmp, 'cycle.pkl'), cyc);
    expect((await errorOf(TorchFile.open(path.join(tmp, 'cycle.pkl')))).message).toMatch(/contains itself/);
  });

  it('zip bounds: data.pkl or a storage claiming 10 GB, a missing storage, a non-torch zip, not a pickle at all', async () => {
    const w = (name: string, b: Buffer) => writeFile(path.join(tmp, name), b).then(() => path.join(tmp, name));
    const pkl = dictPickle([['w', tensorOps('FloatStorage', '0', 4, 0, [4], [1])]]);
    const good = torchZip(pkl, [['0', new Uint8Array(16)]]);
    const big = Buffer.from(good);
    const cen = big.indexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02])); // first central record: archive/data.pkl
    big.writeUInt32LE(0xfffffff0, cen + 24);
    expect((await errorOf(TorchFile.open(await w('big-pkl.pt', big)))).message).toMatch(/claims 4294967280 bytes, more than the 67108864 byte limit/);
    const huge = torchZip(dictPickle([['w', tensorOps('FloatStorage', '0', 2_500_000_000, 0, [4], [1])]]), [['0', new Uint8Array(16)]]);
    expect((await errorOf(TorchFile.open(await w('huge-storage.pt', huge)))).message).toMatch(/storage "0" \(2500000000 x F32\) needs 10000000000 bytes but record archive\/data\/0 has 16/);
    const missing = torchZip(pkl, []);
    expect((await errorOf(TorchFile.open(await w('missing.pt', missing)))).message).toMatch(/no record archive\/data\/0/);
    expect((await errorOf(TorchFile.open(await w('other.zip.pt', storedZip([['readme.txt', Buffer.from('hi')]]))))).message).toMatch(/without a data\.pkl record/);
    expect((await errorOf(TorchFile.open(await w('text.pt', Buffer.from('not really a pickle'))))).message).toMatch(/not a PyTorch file/);
    expect((await errorOf(TorchFile.open(await w('cut.pt', good.subarray(0, good.length - 30))))).kind).toBe('file');
  });

  it('an A1111 embedding saved by torch 1.11 (string_to_param a ParameterDict of Parameters, NEWOBJ + BUILD) reads', async () => {
    const od = () => cat(P.global('collections', 'OrderedDict'), P.emptyTuple(), P.reduce());
    const param = cat(P.global('torch._utils', '_rebuild_parameter'), tensorOps('FloatStorage', '0', 6, 0, [2, 3], [3, 1]), P.t(), od(), P.tuple3(), P.reduce());
    const pdict = cat(P.global('torch.nn.modules.container', 'ParameterDict'), P.emptyTuple(), Buffer.from([0x81]), // NEWOBJ
      P.emptyDict(), P.mark(), P.str('training'), P.t(), P.str('_parameters'), od(), P.mark(), P.str('*'), param, P.setitems(),
      P.str('_non_persistent_buffers_set'), P.global('builtins', 'set'), P.emptyList(), P.tuple1(), P.reduce(), P.setitems(), P.build());
    const pkl = dictPickle([['string_to_token', cat(P.emptyDict(), P.str('*'), P.int(265), P.setitem())], ['string_to_param', pdict], ['name', P.str('old'), ], ['step', P.none()]]);
    const file = path.join(tmp, 'old-style.pt');
    await writeFile(file, torchZip(pkl, [['0', new Uint8Array(Float32Array.from([1, 2, 3, 4, 5, 6]).buffer)]]));
    const e = await readEmbedding(file);
    expect([e.token, e.format, e.vectors.shape, [...e.vectors.data]]).toEqual(['old-style', 'a1111', [2, 3], [1, 2, 3, 4, 5, 6]]);
    expect(e.step).toBeUndefined();
  });

  it("a Lightning checkpoint's extras (ModelCheckpoint class as a key, numpy scalars, bytes) are inert data around state_dict", async () => {
    const dtype = cat(P.global('numpy', 'dtype'), P.str('f8'), P.f(), P.t(), P.tuple3(), P.reduce(),
      P.mark(), P.int(3), P.str('<'), P.none(), P.none(), P.none(), P.int(-1), P.int(-1), P.int(0), P.tuple(), P.build());
    const score = cat(P.global('numpy.core.multiarray', 'scalar'), dtype, P.global('_codecs', 'encode'), P.str('\u0000'.repeat(8)), P.str('latin1'), P.tuple2(), P.reduce(), P.tuple2(), P.reduce());
    const callbacks = cat(P.emptyDict(), P.global('pytorch_lightning.callbacks.model_checkpoint', 'ModelCheckpoint'), P.emptyDict(), P.str('best_model_score'), score, P.setitem(), P.setitem());
    const pkl = dictPickle([['epoch', P.int(1)], ['state_dict', cat(P.emptyDict(), P.str('model.w'), tensorOps('FloatStorage', '0', 2, 0, [2], [1]), P.setitem())], ['callbacks', callbacks]]);
    const file = path.join(tmp, 'lightning.ckpt');
    await writeFile(file, torchZip(pkl, [['0', new Uint8Array(8)]]));
    const f = await TorchFile.open(file, { stateDict: true });
    expect(f.keys()).toEqual(['model.w']);
    const cb = (f.root as Map<unknown, unknown>).get('callbacks') as Map<unknown, unknown>;
    expect([...cb.keys()]).toEqual([{ kind: 'global', name: 'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint' }]);
    await f.close();
  });

  it('the parsed object keeps tensors as data: shapes, strides and dtypes of every storage class', async () => {
    const classes: [string, number][] = [['HalfStorage', 2], ['BFloat16Storage', 2], ['DoubleStorage', 8], ['LongStorage', 8], ['IntStorage', 4], ['ByteStorage', 1], ['BoolStorage', 1]];
    const pkl = dictPickle(classes.map(([c], i) => [c, tensorOps(c, String(i), 2, 0, [2], [1])]));
    const file = path.join(tmp, 'dtypes.pt');
    const one: Record<string, number[]> = { HalfStorage: [0x00, 0x3c, 0x00, 0xc0], BFloat16Storage: [0x80, 0x3f, 0x00, 0xc0], DoubleStorage: [...new Uint8Array(new Float64Array([1, -2]).buffer)],
      LongStorage: [...new Uint8Array(new BigInt64Array([1n, -2n]).buffer)], IntStorage: [...new Uint8Array(new Int32Array([1, -2]).buffer)], ByteStorage: [1, 254], BoolStorage: [1, 0] };
    await writeFile(file, torchZip(pkl, classes.map(([c], i) => [String(i), new Uint8Array(one[c])])));
    const f = await TorchFile.open(file);
    try {
      expect(f.keys()).toEqual(classes.map(([c]) => c));
      const want: Record<string, number[]> = { HalfStorage: [1, -2], BFloat16Storage: [1, -2], DoubleStorage: [1, -2], LongStorage: [1, -2], IntStorage: [1, -2], ByteStorage: [1, 254], BoolStorage: [1, 0] };
      for (const [c] of classes) expect([...(await f.read(c)).data], c).toEqual(want[c]);
      expect(isTensor(f.info('HalfStorage').tensor)).toBe(true);
      expect((await errorOf(f.readFloat('LongStorage'))).message).toMatch(/dtype I64, expected a floating-point dtype/);
    } finally {
      await f.close();
    }
  });
});
