/**
 * A minimal pickle WRITER for torch.save's zip format: protocol 2 opcodes for plain data (None, bool, int, float,
 * str, list, tuple, dict, collections.OrderedDict with an optional nn.Module `_metadata`) and float32 / float16
 * tensors (torch._utils._rebuild_tensor_v2 over torch.FloatStorage / HalfStorage persistent ids), in the zip layout
 * torch writes (spec: shared/golden/pickle/README.md). Only globals that torch.load(weights_only=True) allows are
 * ever written. Reading pickles is src/io/pickle.ts's job, not this file's.
 */
import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { formatError } from '../errors.js';

/** A Python float (a JS number is written as int when it is an integer, else as float). */
export class PyFloat {
  constructor(readonly value: number) {}
}
/** A Python tuple. */
export class PyTuple {
  constructor(readonly items: PyValue[]) {}
}
/** collections.OrderedDict, optionally with nn.Module.state_dict()'s `_metadata` attribute (set through BUILD). */
export class PyOrderedDict {
  constructor(
    readonly entries: [PyValue, PyValue][],
    readonly metadata?: PyOrderedDict,
  ) {}
}
/** A contiguous tensor in torch layout (row-major), float32 or float16 (as bit patterns). */
export interface PyTensor {
  dtype: 'float32' | 'float16';
  shape: number[];
  data: Float32Array | Uint16Array;
  requiresGrad?: boolean;
}
/** What the writer can write. A Map is a dict (insertion order); an array is a list. */
export type PyValue = null | boolean | number | bigint | string | PyFloat | PyTuple | PyOrderedDict | PyTensor | PyValue[] | Map<PyValue, PyValue>;

export const pyFloat = (v: number) => new PyFloat(v);
export const pyTuple = (items: PyValue[]) => new PyTuple(items);

const isTensor = (v: unknown): v is PyTensor =>
  typeof v === 'object' && v !== null && 'shape' in v && 'data' in v && ArrayBuffer.isView((v as PyTensor).data);

// protocol 2 opcodes (pickletools names)
const OP = {
  PROTO: 0x80, STOP: 0x2e, MARK: 0x28, NONE: 0x4e, NEWTRUE: 0x88, NEWFALSE: 0x89, BININT: 0x4a, BININT1: 0x4b,
  BININT2: 0x4d, LONG1: 0x8a, BINFLOAT: 0x47, BINUNICODE: 0x58, EMPTY_TUPLE: 0x29, TUPLE1: 0x85, TUPLE2: 0x86,
  TUPLE3: 0x87, TUPLE: 0x74, EMPTY_LIST: 0x5d, APPEND: 0x61, APPENDS: 0x65, EMPTY_DICT: 0x7d, SETITEM: 0x73,
  SETITEMS: 0x75, GLOBAL: 0x63, REDUCE: 0x52, BUILD: 0x62, BINPERSID: 0x51, BINPUT: 0x71, LONG_BINPUT: 0x72,
  BINGET: 0x68, LONG_BINGET: 0x6a,
} as const;
/** Python's pickler batches APPENDS / SETITEMS by 1000 */
const BATCH = 1000;

/** A growable byte buffer. */
class Bytes {
  private buf = new Uint8Array(1024);
  length = 0;
  private ensure(n: number) {
    if (this.length + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.length + n) cap *= 2;
    const b = new Uint8Array(cap);
    b.set(this.buf.subarray(0, this.length));
    this.buf = b;
  }
  byte(...bs: number[]) {
    this.ensure(bs.length);
    for (const b of bs) this.buf[this.length++] = b;
  }
  bytes(b: Uint8Array) {
    this.ensure(b.length);
    this.buf.set(b, this.length);
    this.length += b.length;
  }
  u16(v: number) {
    this.byte(v & 0xff, (v >>> 8) & 0xff);
  }
  u32(v: number) {
    this.byte(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff);
  }
  result(): Uint8Array {
    return this.buf.slice(0, this.length);
  }
}

/** The pickle of one object plus the storages its tensors reference (key = decimal index in first-use order). */
export interface Pickled {
  pickle: Uint8Array;
  storages: Uint8Array[];
}

/** Pickle `obj` (protocol 2) as torch.save's data.pkl: tensors become persistent ids naming their storage records. */
export function pickleForTorch(obj: PyValue): Pickled {
  const out = new Bytes();
  const storages: Uint8Array[] = [];
  const memo = new Map<string, number>(); // globals, memoised as Python's pickler does
  const utf8 = new TextEncoder();

  const put = (key: string) => {
    const i = memo.size;
    memo.set(key, i);
    if (i < 256) out.byte(OP.BINPUT, i);
    else {
      out.byte(OP.LONG_BINPUT);
      out.u32(i);
    }
  };
  const global = (module: string, name: string) => {
    const key = `${module}\n${name}`;
    const i = memo.get(key);
    if (i !== undefined) {
      if (i < 256) out.byte(OP.BINGET, i);
      else {
        out.byte(OP.LONG_BINGET);
        out.u32(i);
      }
      return;
    }
    out.byte(OP.GLOBAL);
    out.bytes(utf8.encode(`${key}\n`));
    put(key);
  };
  const int = (v: number | bigint) => {
    const n = BigInt(v);
    if (n >= 0n && n < 256n) out.byte(OP.BININT1, Number(n));
    else if (n >= 0n && n < 65536n) {
      out.byte(OP.BININT2);
      out.u16(Number(n));
    } else if (n >= -(2n ** 31n) && n < 2n ** 31n) {
      out.byte(OP.BININT);
      out.u32(Number(BigInt.asUintN(32, n)));
    } else {
      // LONG1: little-endian two's complement, the fewest bytes that keep the sign
      const bytes: number[] = [];
      let x = n;
      for (;;) {
        bytes.push(Number(BigInt.asUintN(8, x)));
        x >>= 8n;
        const signBit = (bytes[bytes.length - 1] & 0x80) !== 0;
        if ((x === 0n && !signBit) || (x === -1n && signBit)) break;
      }
      if (bytes.length > 255) throw formatError(`pickle: integer ${n} is too large`);
      out.byte(OP.LONG1, bytes.length, ...bytes);
    }
  };
  const str = (s: string) => {
    const b = utf8.encode(s);
    out.byte(OP.BINUNICODE);
    out.u32(b.length);
    out.bytes(b);
  };
  const tuple = (items: PyValue[]) => {
    if (items.length === 0) return out.byte(OP.EMPTY_TUPLE);
    if (items.length <= 3) {
      for (const x of items) save(x);
      return out.byte([OP.TUPLE1, OP.TUPLE2, OP.TUPLE3][items.length - 1]);
    }
    out.byte(OP.MARK);
    for (const x of items) save(x);
    out.byte(OP.TUPLE);
  };
  const setitems = (entries: [PyValue, PyValue][]) => {
    for (let i = 0; i < entries.length; i += BATCH) {
      const batch = entries.slice(i, i + BATCH);
      if (batch.length > 1) out.byte(OP.MARK);
      for (const [k, v] of batch) {
        save(k);
        save(v);
      }
      out.byte(batch.length > 1 ? OP.SETITEMS : OP.SETITEM);
    }
  };
  const orderedDict = () => {
    global('collections', 'OrderedDict');
    out.byte(OP.EMPTY_TUPLE, OP.REDUCE);
  };
  const tensor = (t: PyTensor) => {
    const n = t.shape.reduce((a, b) => a * b, 1);
    if (!t.shape.every((d) => Number.isInteger(d) && d >= 0) || n !== t.data.length) {
      throw formatError(`pickle: tensor of shape [${t.shape.join(',')}] has ${t.data.length} values`);
    }
    const half = t.dtype === 'float16';
    if (half !== (t.data instanceof Uint16Array)) throw formatError(`pickle: ${t.dtype} tensor data must be a ${half ? 'Uint16Array' : 'Float32Array'}`);
    const key = String(storages.length);
    // little-endian raw storage (typed arrays are little-endian on every platform Node runs on)
    storages.push(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    const stride: number[] = [];
    let s = 1;
    for (let i = t.shape.length - 1; i >= 0; i--) {
      stride[i] = s;
      s *= t.shape[i];
    }
    global('torch._utils', '_rebuild_tensor_v2');
    out.byte(OP.MARK);
    out.byte(OP.MARK);
    str('storage');
    global('torch', half ? 'HalfStorage' : 'FloatStorage');
    str(key);
    str('cpu');
    int(n);
    out.byte(OP.TUPLE, OP.BINPERSID);
    int(0); // storage offset
    tuple(t.shape);
    tuple(stride);
    out.byte(t.requiresGrad ? OP.NEWTRUE : OP.NEWFALSE);
    orderedDict(); // backward_hooks
    out.byte(OP.TUPLE, OP.REDUCE);
  };
  let depth = 0;
  const save = (v: PyValue): void => {
    if (++depth > 200) throw formatError('pickle: object nests deeper than 200 levels');
    try {
      if (v === null) out.byte(OP.NONE);
      else if (typeof v === 'boolean') out.byte(v ? OP.NEWTRUE : OP.NEWFALSE);
      else if (typeof v === 'bigint') int(v);
      else if (typeof v === 'number') {
        if (Number.isInteger(v)) int(v);
        else floatOp(v);
      } else if (typeof v === 'string') str(v);
      else if (v instanceof PyFloat) floatOp(v.value);
      else if (v instanceof PyTuple) tuple(v.items);
      else if (Array.isArray(v)) {
        out.byte(OP.EMPTY_LIST);
        for (let i = 0; i < v.length; i += BATCH) {
          const batch = v.slice(i, i + BATCH);
          if (batch.length > 1) out.byte(OP.MARK);
          for (const x of batch) save(x);
          out.byte(batch.length > 1 ? OP.APPENDS : OP.APPEND);
        }
      } else if (v instanceof Map) {
        out.byte(OP.EMPTY_DICT);
        setitems([...v]);
      } else if (v instanceof PyOrderedDict) {
        orderedDict();
        setitems(v.entries);
        if (v.metadata) {
          // nn.Module.state_dict(): the OrderedDict's __dict__ = {'_metadata': OrderedDict(prefix -> {'version': n})}
          out.byte(OP.EMPTY_DICT);
          str('_metadata');
          save(v.metadata);
          out.byte(OP.SETITEM, OP.BUILD);
        }
      } else if (isTensor(v)) tensor(v);
      else throw formatError(`pickle: cannot write a ${typeof v}`);
    } finally {
      depth--;
    }
  };
  const floatOp = (x: number) => {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setFloat64(0, x, false); // BINFLOAT is big-endian
    out.byte(OP.BINFLOAT);
    out.bytes(b);
  };

  out.byte(OP.PROTO, 2);
  save(obj);
  out.byte(OP.STOP);
  return { pickle: out.result(), storages };
}

const ALIGN = 64; // torch's storage alignment (every record's data starts at a multiple of 64 bytes)
const DOS_DATE_1980_01_01 = 0x21;

/**
 * The bytes of a torch.save zip holding `obj` (records under `archive/`, in torch's order: data.pkl,
 * .format_version, .storage_alignment, byteorder, data/<key>..., version, .data/serialization_id), stored
 * uncompressed with each record's data aligned to 64 bytes through an 'FB' padding extra field, as torch does.
 * Returned as chunks (storages are not copied into one buffer).
 */
export function torchSaveBytes(obj: PyValue, archive = 'archive'): Uint8Array[] {
  const { pickle, storages } = pickleForTorch(obj);
  const text = (s: string) => new TextEncoder().encode(s);
  // torch >= 2.2 writes a 40-digit id; ours is derived from the content, so identical content gives identical files
  const h = createHash('sha256').update(pickle);
  for (const s of storages) h.update(s);
  const id = (BigInt(`0x${h.digest('hex')}`) % 10n ** 40n).toString().padStart(40, '0');
  const records: [string, Uint8Array][] = [
    ['data.pkl', pickle],
    ['.format_version', text('1')],
    ['.storage_alignment', text(String(ALIGN))],
    ['byteorder', text('little')],
    ...storages.map((s, i): [string, Uint8Array] => [`data/${i}`, s]),
    ['version', text('3\n')],
    ['.data/serialization_id', text(id)],
  ];
  const chunks: Uint8Array[] = [];
  const central = new Bytes();
  let offset = 0;
  for (const [name0, data] of records) {
    const name = text(`${archive}/${name0}`);
    const crc = crc32(data) >>> 0;
    const base = offset + 30 + name.length + 4; // where the data would start with an empty 'FB' field
    const pad = (ALIGN - (base % ALIGN)) % ALIGN;
    const local = new Bytes();
    local.u32(0x04034b50);
    local.u16(20); // version needed: 2.0
    local.u16(0); // flags
    local.u16(0); // stored
    local.u16(0); // time 00:00
    local.u16(DOS_DATE_1980_01_01);
    local.u32(crc);
    local.u32(data.length);
    local.u32(data.length);
    local.u16(name.length);
    local.u16(4 + pad);
    local.bytes(name);
    local.u16(0x4246); // 'FB'
    local.u16(pad);
    local.bytes(new Uint8Array(pad));
    const lh = local.result();
    if (offset + lh.length + data.length > 0xffffffff) throw formatError('torch.save writer: files over 4 GiB need zip64, which this writer does not write');
    central.u32(0x02014b50);
    central.u16(20); // made by
    central.u16(20); // needed
    central.u16(0);
    central.u16(0);
    central.u16(0);
    central.u16(DOS_DATE_1980_01_01);
    central.u32(crc);
    central.u32(data.length);
    central.u32(data.length);
    central.u16(name.length);
    central.u16(0); // extra
    central.u16(0); // comment
    central.u16(0); // disk
    central.u16(0); // internal attributes
    central.u32(0); // external attributes
    central.u32(offset);
    central.bytes(name);
    chunks.push(lh, data);
    offset += lh.length + data.length;
  }
  const cd = central.result();
  const end = new Bytes();
  end.u32(0x06054b50);
  end.u16(0);
  end.u16(0);
  end.u16(records.length);
  end.u16(records.length);
  end.u32(cd.length);
  end.u32(offset);
  end.u16(0);
  if (records.length > 0xffff) throw formatError('torch.save writer: more than 65535 records need zip64');
  chunks.push(cd, end.result());
  return chunks;
}
