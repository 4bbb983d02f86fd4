// The torch.save writer (src/io/pickle-write.ts), checked by structure with a test-only opcode walker
// (test/io/pickle-walk.ts): plain values, tensors, the zip layout, and an A1111 hypernetwork .pt against the one
// real torch wrote (../shared/golden/pickle/hypernetwork-a1111.pt): same records, globals, keys, values and bytes.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHypernetwork, disposeHypernetwork, hypernetworkData, hypernetworkDataFromObject, hypernetworkPickleObject, loadHypernetwork, readHypernetwork, writeHypernetworkPt } from '../../src/adapters/hypernetwork.js';
import { flattenParams } from '../../src/models/params.js';
import { type PyValue, PyOrderedDict, pickleForTorch, pyFloat, pyTuple, torchSaveBytes } from '../../src/io/pickle-write.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { HAVE_GOLDEN, golden } from '../golden.js';
import { PCall, PDict, PFloat, PGlobal, PTensor, PTuple, walkPickle, walkTorchZip } from './pickle-walk.js';

const concat = (chunks: Uint8Array[]) => new Uint8Array(Buffer.concat(chunks));

/** A walked value as plain JSON-comparable data; tensors carry their storage bytes (hex) from the zip. */
function plain(v: unknown, data?: Map<string, Uint8Array>, prefix = ''): unknown {
  const p = (x: unknown) => plain(x, data, prefix);
  if (v instanceof PFloat) return { float: v.value };
  if (v instanceof PTuple) return { tuple: v.items.map(p) };
  if (v instanceof PDict) return { [v.kind]: v.entries.map(([k, x]) => [p(k), p(x)]), ...(v.state === undefined ? {} : { state: p(v.state) }) };
  if (v instanceof PTensor) {
    const bytes = data?.get(`${prefix}data/${v.storage.key}`);
    return { tensor: v.storage.cls, numel: v.storage.numel, location: v.storage.location, offset: v.offset, size: v.size, stride: v.stride, requiresGrad: v.requiresGrad, bytes: bytes && Buffer.from(bytes).toString('hex') };
  }
  if (v instanceof PGlobal) return { global: v.name };
  if (v instanceof PCall) return { call: p(v.fn), args: p(v.args) };
  if (Array.isArray(v)) return v.map(p);
  if (typeof v === 'bigint') return { int: v.toString() };
  return v;
}

/** Walked values as a data-only reader would hand them over: Map, arrays, numbers, float32 tensors (contiguous). */
function asData(v: unknown, data: Map<string, Uint8Array>, prefix: string): unknown {
  const d = (x: unknown) => asData(x, data, prefix);
  if (v instanceof PFloat) return v.value;
  if (v instanceof PTuple) return v.items.map(d);
  if (v instanceof PDict) return new Map(v.entries.map(([k, x]) => [d(k), d(x)]));
  if (v instanceof PTensor) {
    const n = v.size.reduce((a, b) => a * b, 1);
    const bytes = data.get(`${prefix}data/${v.storage.key}`)!.slice();
    return { shape: v.size, data: new Float32Array(bytes.buffer, v.offset * 4, n) };
  }
  if (Array.isArray(v)) return v.map(d);
  return v;
}

describe('pickle writer: plain values', () => {
  it('ints of every width, floats, strings, None, bools, lists (batched past 1000), tuples, dicts, OrderedDict', () => {
    const big = Array.from({ length: 2500 }, (_, i) => i % 300);
    const obj: PyValue = new Map<PyValue, PyValue>([
      ['ints', [0, 1, 255, 256, 65535, 65536, -1, -129, 2 ** 31 - 1, -(2 ** 31), 2 ** 31, -(2 ** 31) - 1, 2n ** 70n, -(2n ** 70n), 128n, -128n]],
      ['floats', [pyFloat(1), 0.5, -2.25, pyFloat(-0), pyFloat(1e300), 1e300]],
      ['strings', ['', 'plain', 'ünïcødé ✓']],
      ['consts', [null, true, false]],
      ['tuples', [pyTuple([]), pyTuple([1]), pyTuple([1, 2]), pyTuple([1, 2, 3]), pyTuple([1, 2, 3, 4, 5])]],
      ['big', big],
      [7, new PyOrderedDict([['a', 1], ['b', pyTuple(['x'])]])],
      ['nested', new Map<PyValue, PyValue>([['k', new Map<PyValue, PyValue>([['deep', [pyTuple([null])]]])]])],
    ]);
    const w = walkPickle(pickleForTorch(obj).pickle);
    expect(plain(w.value)).toEqual({
      dict: [
        ['ints', [0, 1, 255, 256, 65535, 65536, -1, -129, 2 ** 31 - 1, -(2 ** 31), { int: String(2 ** 31) }, { int: String(-(2 ** 31) - 1) }, { int: String(2n ** 70n) }, { int: String(-(2n ** 70n)) }, 128, -128]],
        ['floats', [{ float: 1 }, { float: 0.5 }, { float: -2.25 }, { float: -0 }, { float: 1e300 }, { int: BigInt(1e300).toString() }]],
        ['strings', ['', 'plain', 'ünïcødé ✓']],
        ['consts', [null, true, false]],
        ['tuples', [{ tuple: [] }, { tuple: [1] }, { tuple: [1, 2] }, { tuple: [1, 2, 3] }, { tuple: [1, 2, 3, 4, 5] }]],
        ['big', big],
        [7, { 'collections.OrderedDict': [['a', 1], ['b', { tuple: ['x'] }]] }],
        ['nested', { dict: [['k', { dict: [['deep', [{ tuple: [null] }]]] }]] }],
      ],
    });
    expect(w.globals).toEqual(['collections.OrderedDict']);
    for (const op of ['BININT1', 'BININT2', 'BININT', 'LONG1', 'BINFLOAT', 'BINUNICODE', 'APPENDS', 'SETITEMS', 'TUPLE', 'TUPLE1', 'TUPLE2', 'TUPLE3', 'EMPTY_TUPLE']) expect(w.opcodes.has(op), op).toBe(true);
  });

  it('tensors: _rebuild_tensor_v2 over Float/HalfStorage persistent ids, contiguous strides, 0-d, requires_grad', () => {
    const t32 = { dtype: 'float32' as const, shape: [2, 3, 4], data: Float32Array.from({ length: 24 }, (_, i) => i / 3) };
    const t16 = { dtype: 'float16' as const, shape: [5], data: Uint16Array.of(0x3c00, 0x4000, 0, 0x8000, 0x7bff) };
    const scalar = { dtype: 'float32' as const, shape: [], data: Float32Array.of(4), requiresGrad: true };
    const zip = concat(torchSaveBytes(new PyOrderedDict([['a', t32], ['b', t16], ['c', scalar]])));
    const { pickle, data, prefix } = walkTorchZip(zip);
    const d = pickle.value as PDict;
    const [a, b, c] = ['a', 'b', 'c'].map((k) => d.get(k) as PTensor);
    expect([a.storage.cls, a.size, a.stride, a.storage.numel, a.requiresGrad, a.storage.location]).toEqual(['torch.FloatStorage', [2, 3, 4], [12, 4, 1], 24, false, 'cpu']);
    expect([b.storage.cls, b.size, b.stride]).toEqual(['torch.HalfStorage', [5], [1]]);
    expect([c.size, c.stride, c.requiresGrad]).toEqual([[], [], true]);
    expect(new Float32Array(data.get(`${prefix}data/${a.storage.key}`)!.slice().buffer)).toEqual(t32.data);
    expect(new Uint16Array(data.get(`${prefix}data/${b.storage.key}`)!.slice().buffer)).toEqual(t16.data);
    expect([a, b, c].map((t) => t.storage.key)).toEqual(['0', '1', '2']);
    expect(pickle.globals.sort()).toEqual(['collections.OrderedDict', 'torch.FloatStorage', 'torch.HalfStorage', 'torch._utils._rebuild_tensor_v2']);
  });

  it('refuses what it cannot write faithfully', () => {
    expect(() => pickleForTorch({ dtype: 'float32', shape: [2, 2], data: new Float32Array(3) })).toThrow(/shape \[2,2\] has 3 values/);
    expect(() => pickleForTorch({ dtype: 'float16', shape: [1], data: new Float32Array(1) })).toThrow(/Uint16Array/);
    expect(() => pickleForTorch({} as unknown as PyValue)).toThrow(/cannot write/);
  });
});

describe('torch.save zip layout', () => {
  it('records under archive/ in torch order, stored, crc-checked, every record aligned to 64 bytes', () => {
    const zip = concat(torchSaveBytes(new Map<PyValue, PyValue>([['w', { dtype: 'float32', shape: [3], data: Float32Array.of(1, 2, 3) }], ['v', { dtype: 'float32', shape: [1], data: Float32Array.of(5) }]])));
    const { records, data } = walkTorchZip(zip);
    expect(records.map((r) => r.name)).toEqual(['archive/data.pkl', 'archive/.format_version', 'archive/.storage_alignment', 'archive/byteorder', 'archive/data/0', 'archive/data/1', 'archive/version', 'archive/.data/serialization_id']);
    for (const r of records) {
      expect(r.method, r.name).toBe(0);
      expect(r.dataStart % 64, r.name).toBe(0);
      expect(crc32(data.get(r.name)!) >>> 0, r.name).toBe(r.crc);
    }
    const text = (n: string) => Buffer.from(data.get(`archive/${n}`)!).toString();
    expect([text('.format_version'), text('.storage_alignment'), text('byteorder'), text('version')]).toEqual(['1', '64', 'little', '3\n']);
    expect(text('.data/serialization_id')).toMatch(/^\d{40}$/);
    // identical content, identical bytes
    expect(Buffer.compare(zip, concat(torchSaveBytes(new Map<PyValue, PyValue>([['w', { dtype: 'float32', shape: [3], data: Float32Array.of(1, 2, 3) }], ['v', { dtype: 'float32', shape: [1], data: Float32Array.of(5) }]]))))).toBe(0);
  });
});

describe('A1111 hypernetwork .pt', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'sdtune-pt-'));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it.skipIf(!HAVE_GOLDEN)('written from tiny_hypernet.safetensors equals the torch-written hypernetwork-a1111.pt in structure, values and storage bytes', async () => {
    const net = await readHypernetwork(golden('hypernetwork', 'tiny_hypernet.safetensors'));
    const file = path.join(dir, 'tiny_hypernet.pt');
    await writeHypernetworkPt(file, await hypernetworkData(net));
    disposeHypernetwork(net);
    const ours = walkTorchZip(new Uint8Array(await readFile(file)));
    const ref = walkTorchZip(new Uint8Array(await readFile(golden('pickle', 'hypernetwork-a1111.pt'))));
    expect(ours.records.map((r) => r.name)).toEqual(ref.records.map((r) => r.name));
    for (const n of ['.format_version', '.storage_alignment', 'byteorder', 'version']) expect(Buffer.from(ours.data.get(`archive/${n}`)!)).toEqual(Buffer.from(ref.data.get(`archive/${n}`)!));
    expect([...ours.pickle.globals].sort()).toEqual([...ref.pickle.globals].sort());
    for (const op of ours.pickle.opcodes) expect(ref.pickle.opcodes.has(op) || ['BINGET', 'BINPUT'].includes(op), op).toBe(true);
    const top = ours.pickle.value as PDict;
    expect(top.keys()).toEqual((ref.pickle.value as PDict).keys());
    expect(top.keys()).toEqual([32, 'step', 'name', 'layer_structure', 'activation_func', 'is_layer_norm', 'weight_initialization', 'sd_checkpoint', 'sd_checkpoint_name', 'activate_output', 'use_dropout', 'dropout_structure', 'last_layer_dropout', 'optional_info']);
    // everything, tensors included (storage class, size, stride, requires_grad, the raw bytes), the _metadata BUILD too
    expect(plain(ours.pickle.value, ours.data, ours.prefix)).toEqual(plain(ref.pickle.value, ref.data, ref.prefix));
  });

  it.skipIf(!HAVE_GOLDEN)('the .pt front end (hypernetworkDataFromObject) on the torch-written file and on ours: the safetensors form\'s network', async () => {
    const ref = await readHypernetwork(golden('hypernetwork', 'tiny_hypernet.safetensors'));
    const want = new Map([...flattenParams(ref.layers.get(32)![0]), ...[...flattenParams(ref.layers.get(32)![1])].map(([k, t]): [string, typeof t] => [`v.${k}`, t])].map(([k, t]) => [k, Array.from(t.dataSync())]));
    const file = path.join(dir, 'again.pt');
    await writeHypernetworkPt(file, await hypernetworkData(ref));
    for (const pt of [golden('pickle', 'hypernetwork-a1111.pt'), file]) {
      const w = walkTorchZip(new Uint8Array(await readFile(pt)));
      const net = loadHypernetwork(hypernetworkDataFromObject(asData(w.pickle.value, w.data, w.prefix) as Map<unknown, unknown>, pt), pt);
      expect(net.meta).toEqual(ref.meta);
      const got = new Map([...flattenParams(net.layers.get(32)![0]), ...[...flattenParams(net.layers.get(32)![1])].map(([k, t]): [string, typeof t] => [`v.${k}`, t])].map(([k, t]) => [k, Array.from(t.dataSync())]));
      expect(got).toEqual(want);
      disposeHypernetwork(net);
    }
    disposeHypernetwork(ref);
    expect(() => hypernetworkDataFromObject(new Map<unknown, unknown>([[32, [new Map(), 'x']]]), 'bad.pt')).toThrow('bad.pt: width 32 v module is not a state dict');
    expect(() => hypernetworkDataFromObject(new Map<unknown, unknown>([[32, [new Map([['linear.0.weight', [1, 2]]]), new Map()]]]), 'bad.pt')).toThrow(/linear.0.weight is not a float tensor/);
  });

  it('a created network with layer norm and dropout: every module in _metadata, floats where A1111 has floats', async () => {
    const net = createHypernetwork({ widths: [8, 16], layer_structure: [1, 1.5, 1], activation_func: 'relu', is_layer_norm: true, use_dropout: true, name: 'mine', gen: new TorchGenerator(1) });
    const zip = concat(torchSaveBytes(hypernetworkPickleObject(await hypernetworkData(net))));
    disposeHypernetwork(net);
    const { pickle } = walkTorchZip(zip);
    const top = pickle.value as PDict;
    const [k] = (top.get(16) as PTuple).items as PDict[];
    expect(k.keys()).toEqual(['linear.0.weight', 'linear.0.bias', 'linear.2.weight', 'linear.2.bias', 'linear.4.weight', 'linear.4.bias', 'linear.5.weight', 'linear.5.bias']);
    expect(((k.state as PDict).get('_metadata') as PDict).keys()).toEqual(['', 'linear', 'linear.0', 'linear.1', 'linear.2', 'linear.3', 'linear.4', 'linear.5']);
    expect((k.get('linear.0.weight') as PTensor).size).toEqual([24, 16]);
    expect(plain(top.get('layer_structure'))).toEqual([{ float: 1 }, { float: 1.5 }, { float: 1 }]);
    expect(plain(top.get('dropout_structure'))).toEqual([0, { float: 0.3 }, 0]);
    expect([top.get('use_dropout'), top.get('last_layer_dropout'), top.get('name'), top.get('step')]).toEqual([true, true, 'mine', 0]);
  });
});
