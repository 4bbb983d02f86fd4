// Hand-assembled pickles and torch.save containers for the pickle reader's tests (opcodes as in CPython's
// pickletools; layouts as README.md of ../shared/golden/pickle describes them). Test-only.
import { crc32, deflateRawSync } from 'node:zlib';

const b = (...xs: number[]) => Buffer.from(xs);
const u32 = (n: number) => {
  const o = Buffer.alloc(4);
  o.writeUInt32LE(n >>> 0);
  return o;
};

/** Opcode builders (each returns the bytes of one opcode with its argument). */
export const P = {
  proto: (v = 2) => b(0x80, v),
  stop: () => b(0x2e),
  mark: () => b(0x28),
  none: () => b(0x4e),
  t: () => b(0x88),
  f: () => b(0x89),
  int: (n: number): Buffer => {
    if (n >= 0 && n < 256) return b(0x4b, n);
    if (n >= 0 && n < 65536) return Buffer.concat([b(0x4d), Buffer.from([n & 0xff, n >> 8])]);
    if (n >= -(2 ** 31) && n < 2 ** 31) return Buffer.concat([b(0x4a), (() => { const o = Buffer.alloc(4); o.writeInt32LE(n); return o; })()]);
    const o = Buffer.alloc(8);
    o.writeBigInt64LE(BigInt(n));
    return Buffer.concat([b(0x8a, 8), o]);
  },
  long1: (bytes: number[]) => Buffer.concat([b(0x8a, bytes.length), Buffer.from(bytes)]),
  float: (x: number) => { const o = Buffer.alloc(9); o[0] = 0x47; o.writeDoubleBE(x, 1); return o; },
  str: (s: string) => { const d = Buffer.from(s, 'utf8'); return Buffer.concat([b(0x58), u32(d.length), d]); },
  global: (module: string, name: string) => Buffer.from(`c${module}\n${name}\n`, 'latin1'),
  emptyTuple: () => b(0x29),
  tuple: () => b(0x74),
  tuple1: () => b(0x85),
  tuple2: () => b(0x86),
  tuple3: () => b(0x87),
  emptyList: () => b(0x5d),
  append: () => b(0x61),
  appends: () => b(0x65),
  emptyDict: () => b(0x7d),
  setitem: () => b(0x73),
  setitems: () => b(0x75),
  reduce: () => b(0x52),
  build: () => b(0x62),
  binpersid: () => b(0x51),
  put: (i: number) => (i < 256 ? b(0x71, i) : Buffer.concat([b(0x72), u32(i)])),
  get: (i: number) => (i < 256 ? b(0x68, i) : Buffer.concat([b(0x6a), u32(i)])),
};
export const cat = (...parts: Buffer[]) => Buffer.concat(parts);

/** `_rebuild_tensor_v2(('storage', torch.<cls>, key, 'cpu', numel), offset, size, stride, False, OrderedDict())`. */
export function tensorOps(cls: string, key: string, numel: number, offset: number, size: number[], stride: number[], legacy = false): Buffer {
  const ints = (xs: number[]) => cat(P.mark(), ...xs.map(P.int), P.tuple());
  return cat(
    P.global('torch._utils', '_rebuild_tensor_v2'),
    P.mark(),
    P.mark(), P.str('storage'), P.global('torch', cls), P.str(key), P.str('cpu'), P.int(numel), ...(legacy ? [P.none()] : []), P.tuple(),
    P.binpersid(),
    P.int(offset), ints(size), ints(stride), P.f(), P.global('collections', 'OrderedDict'), P.emptyTuple(), P.reduce(),
    P.tuple(),
    P.reduce(),
  );
}

/** A pickle of a dict {name: value-ops} (values given as opcode bytes). */
export function dictPickle(entries: [string, Buffer][], legacy = false): Buffer {
  void legacy;
  return cat(P.proto(2), P.emptyDict(), P.mark(), ...entries.flatMap(([k, v]) => [P.str(k), v]), P.setitems(), P.stop());
}

/** A zip as torch.save writes it (stored records); a record marked `true` is deflated instead (as other tools re-zip). */
export function storedZip(records: ([string, Uint8Array] | [string, Uint8Array, boolean])[]): Buffer {
  const locals: Buffer[] = [];
  const central: Buffer[] = [];
  let offset = 0;
  for (const [name, raw, deflate] of records) {
    const n = Buffer.from(name, 'utf8');
    const crc = crc32(raw);
    const data = deflate ? deflateRawSync(raw) : raw;
    const lh = Buffer.alloc(30);
    lh.writeUInt32LE(0x04034b50, 0);
    lh.writeUInt16LE(20, 4);
    lh.writeUInt16LE(0x0800, 6);
    lh.writeUInt16LE(deflate ? 8 : 0, 8);
    lh.writeUInt32LE(crc, 14);
    lh.writeUInt32LE(data.length, 18);
    lh.writeUInt32LE(raw.length, 22);
    lh.writeUInt16LE(n.length, 26);
    const ch = Buffer.alloc(46);
    ch.writeUInt32LE(0x02014b50, 0);
    ch.writeUInt16LE(20, 4);
    ch.writeUInt16LE(20, 6);
    ch.writeUInt16LE(0x0800, 8);
    ch.writeUInt16LE(deflate ? 8 : 0, 10);
    ch.writeUInt32LE(crc, 16);
    ch.writeUInt32LE(data.length, 20);
    ch.writeUInt32LE(raw.length, 24);
    ch.writeUInt16LE(n.length, 28);
    ch.writeUInt32LE(offset, 42);
    locals.push(lh, n, Buffer.from(data));
    central.push(ch, n);
    offset += 30 + n.length + data.length;
  }
  const cd = Buffer.concat(central);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(records.length, 8);
  end.writeUInt16LE(records.length, 10);
  end.writeUInt32LE(cd.length, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, cd, end]);
}

/** A torch zip checkpoint: archive/data.pkl + archive/data/<key> storages. */
export const torchZip = (pickle: Buffer, storages: [string, Uint8Array][], deflate: { pickle?: boolean; storages?: boolean } = {}) =>
  storedZip([['archive/data.pkl', pickle, !!deflate.pickle], ['archive/byteorder', Buffer.from('little')],
    ...storages.map(([k, d]) => [`archive/data/${k}`, d, !!deflate.storages] as [string, Uint8Array, boolean]), ['archive/version', Buffer.from('3\n')]]);

/** A legacy torch.save stream: magic, protocol 1001, sys info, object, keys, then int64 count + bytes per key. */
export function torchLegacy(object: Buffer, storages: [string, number, Uint8Array][]): Buffer {
  const magic = cat(P.proto(2), P.long1([0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]), P.stop());
  const proto = cat(P.proto(2), P.int(1001), P.stop());
  const sys = cat(P.proto(2), P.emptyDict(), P.mark(), P.str('protocol_version'), P.int(1001), P.str('little_endian'), P.t(), P.setitems(), P.stop());
  const keys = cat(P.proto(2), P.emptyList(), P.mark(), ...storages.map(([k]) => P.str(k)), P.appends(), P.stop());
  const data = storages.flatMap(([, count, d]) => {
    const n = Buffer.alloc(8);
    n.writeBigInt64LE(BigInt(count));
    return [n, Buffer.from(d)];
  });
  return cat(magic, proto, sys, object, keys, ...data);
}

/** A pickle that, when torch.load / pickle.loads runs it, calls `module.name(arg)` (the golden files' payload shape). */
export const callPickle = (module: string, name: string, arg: string) =>
  dictPickle([['state_dict', P.emptyDict()], ['payload', cat(P.global(module, name), P.str(arg), P.tuple1(), P.reduce())]]);
