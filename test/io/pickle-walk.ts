/**
 * Test-only: a structural reader of torch.save zips, to check what src/io/pickle-write.ts writes against what torch
 * writes. It parses the zip's central directory and interprets the protocol-2 opcodes torch uses into inert
 * values (globals stay names; REDUCE records the call). Not a loader: no limits, no security, trusted input only.
 */

export class PGlobal {
  constructor(readonly name: string) {}
}
export class PFloat {
  constructor(readonly value: number) {}
}
export class PTuple {
  constructor(readonly items: unknown[]) {}
}
export class PDict {
  /** BUILD's state, when any */
  state?: unknown;
  constructor(
    readonly kind: 'dict' | 'collections.OrderedDict',
    readonly entries: [unknown, unknown][] = [],
  ) {}
  get(key: unknown): unknown {
    return this.entries.find(([k]) => k === key)?.[1];
  }
  keys(): unknown[] {
    return this.entries.map(([k]) => k);
  }
}
export class PStorage {
  constructor(
    readonly cls: string,
    readonly key: string,
    readonly location: string,
    readonly numel: number,
  ) {}
}
export class PTensor {
  constructor(
    readonly storage: PStorage,
    readonly offset: number,
    readonly size: number[],
    readonly stride: number[],
    readonly requiresGrad: boolean,
  ) {}
}
/** REDUCE of anything else (kept, not called) */
export class PCall {
  constructor(
    readonly fn: unknown,
    readonly args: unknown,
  ) {}
}

export interface Walked {
  value: unknown;
  /** opcode names used */
  opcodes: Set<string>;
  /** GLOBAL arguments as "module.name", in first-use order */
  globals: string[];
}

const NAMES: Record<number, string> = {
  0x80: 'PROTO', 0x2e: 'STOP', 0x28: 'MARK', 0x4e: 'NONE', 0x88: 'NEWTRUE', 0x89: 'NEWFALSE', 0x4a: 'BININT', 0x4b: 'BININT1',
  0x4d: 'BININT2', 0x8a: 'LONG1', 0x47: 'BINFLOAT', 0x58: 'BINUNICODE', 0x29: 'EMPTY_TUPLE', 0x85: 'TUPLE1', 0x86: 'TUPLE2',
  0x87: 'TUPLE3', 0x74: 'TUPLE', 0x5d: 'EMPTY_LIST', 0x61: 'APPEND', 0x65: 'APPENDS', 0x7d: 'EMPTY_DICT', 0x73: 'SETITEM',
  0x75: 'SETITEMS', 0x63: 'GLOBAL', 0x52: 'REDUCE', 0x62: 'BUILD', 0x51: 'BINPERSID', 0x71: 'BINPUT', 0x72: 'LONG_BINPUT',
  0x68: 'BINGET', 0x6a: 'LONG_BINGET',
};

/** Interpret a protocol-2 pickle into P* values. */
export function walkPickle(b: Uint8Array): Walked {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const stack: unknown[] = [];
  const marks: number[] = [];
  const memo = new Map<number, unknown>();
  const opcodes = new Set<string>();
  const globals: string[] = [];
  const MARK = Symbol('mark');
  const popMark = () => {
    const at = marks.pop()!;
    const items = stack.splice(at);
    items.shift(); // the mark
    return items;
  };
  let i = 0;
  const line = () => {
    const end = b.indexOf(0x0a, i);
    const s = new TextDecoder().decode(b.subarray(i, end));
    i = end + 1;
    return s;
  };
  for (;;) {
    const op = b[i++];
    const name = NAMES[op];
    if (!name) throw new Error(`pickle-walk: opcode 0x${op.toString(16)} at ${i - 1}`);
    opcodes.add(name);
    switch (name) {
      case 'PROTO': i++; break;
      case 'STOP': return { value: stack.pop(), opcodes, globals };
      case 'MARK': marks.push(stack.length); stack.push(MARK); break;
      case 'NONE': stack.push(null); break;
      case 'NEWTRUE': stack.push(true); break;
      case 'NEWFALSE': stack.push(false); break;
      case 'BININT': stack.push(dv.getInt32(i, true)); i += 4; break;
      case 'BININT1': stack.push(b[i++]); break;
      case 'BININT2': stack.push(dv.getUint16(i, true)); i += 2; break;
      case 'LONG1': {
        const n = b[i++];
        let v = 0n;
        for (let k = n - 1; k >= 0; k--) v = (v << 8n) | BigInt(b[i + k]);
        if (n && b[i + n - 1] & 0x80) v -= 1n << BigInt(8 * n);
        i += n;
        stack.push(v);
        break;
      }
      case 'BINFLOAT': stack.push(new PFloat(dv.getFloat64(i, false))); i += 8; break;
      case 'BINUNICODE': {
        const n = dv.getUint32(i, true);
        stack.push(new TextDecoder().decode(b.subarray(i + 4, i + 4 + n)));
        i += 4 + n;
        break;
      }
      case 'EMPTY_TUPLE': stack.push(new PTuple([])); break;
      case 'TUPLE1': case 'TUPLE2': case 'TUPLE3': {
        const n = op - 0x84;
        stack.push(new PTuple(stack.splice(stack.length - n)));
        break;
      }
      case 'TUPLE': stack.push(new PTuple(popMark())); break;
      case 'EMPTY_LIST': stack.push([]); break;
      case 'APPEND': { const v = stack.pop(); (stack[stack.length - 1] as unknown[]).push(v); break; }
      case 'APPENDS': { const items = popMark(); (stack[stack.length - 1] as unknown[]).push(...items); break; }
      case 'EMPTY_DICT': stack.push(new PDict('dict')); break;
      case 'SETITEM': { const v = stack.pop(); const k = stack.pop(); (stack[stack.length - 1] as PDict).entries.push([k, v]); break; }
      case 'SETITEMS': {
        const items = popMark();
        const d = stack[stack.length - 1] as PDict;
        for (let k = 0; k < items.length; k += 2) d.entries.push([items[k], items[k + 1]]);
        break;
      }
      case 'GLOBAL': {
        const g = `${line()}.${line()}`;
        if (!globals.includes(g)) globals.push(g);
        stack.push(new PGlobal(g));
        break;
      }
      case 'REDUCE': {
        const args = stack.pop() as PTuple;
        const fn = stack.pop() as PGlobal;
        if (fn instanceof PGlobal && fn.name === 'collections.OrderedDict') stack.push(new PDict('collections.OrderedDict'));
        else if (fn instanceof PGlobal && fn.name === 'torch._utils._rebuild_tensor_v2') {
          const [st, off, size, stride, rg] = args.items as [PStorage, number, PTuple, PTuple, boolean];
          stack.push(new PTensor(st, off, size.items as number[], stride.items as number[], rg));
        } else stack.push(new PCall(fn, args));
        break;
      }
      case 'BUILD': { const st = stack.pop(); (stack[stack.length - 1] as PDict).state = st; break; }
      case 'BINPERSID': {
        const [, cls, key, loc, numel] = (stack.pop() as PTuple).items as [string, PGlobal, string, string, number];
        stack.push(new PStorage(cls.name, key, loc, numel));
        break;
      }
      case 'BINPUT': memo.set(b[i++], stack[stack.length - 1]); break;
      case 'LONG_BINPUT': memo.set(dv.getUint32(i, true), stack[stack.length - 1]); i += 4; break;
      case 'BINGET': stack.push(memo.get(b[i++])); break;
      case 'LONG_BINGET': stack.push(memo.get(dv.getUint32(i, true))); i += 4; break;
    }
  }
}

export interface ZipRecord {
  name: string;
  /** local header offset */
  offset: number;
  size: number;
  /** where the data starts (local offset + 30 + name + local extra) */
  dataStart: number;
  crc: number;
  method: number;
}

/** A stored zip's records from its central directory (end record without a comment, no zip64: what torch writes for small files). */
export function zipRecords(b: Uint8Array): ZipRecord[] {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const eocd = b.length - 22;
  if (dv.getUint32(eocd, true) !== 0x06054b50) throw new Error('pickle-walk: no end-of-central-directory record at the end');
  const n = dv.getUint16(eocd + 10, true);
  let p = dv.getUint32(eocd + 16, true);
  const out: ZipRecord[] = [];
  for (let k = 0; k < n; k++) {
    if (dv.getUint32(p, true) !== 0x02014b50) throw new Error(`pickle-walk: bad central header at ${p}`);
    const method = dv.getUint16(p + 10, true);
    const crc = dv.getUint32(p + 16, true);
    const size = dv.getUint32(p + 24, true);
    const nameLen = dv.getUint16(p + 28, true);
    const extraLen = dv.getUint16(p + 30, true);
    const commentLen = dv.getUint16(p + 32, true);
    const offset = dv.getUint32(p + 42, true);
    const name = new TextDecoder().decode(b.subarray(p + 46, p + 46 + nameLen));
    if (dv.getUint32(offset, true) !== 0x04034b50) throw new Error(`pickle-walk: bad local header for ${name}`);
    const dataStart = offset + 30 + dv.getUint16(offset + 26, true) + dv.getUint16(offset + 28, true);
    out.push({ name, offset, size, dataStart, crc, method });
    p += 46 + nameLen + extraLen + commentLen;
  }
  return out;
}

/** A torch.save zip: its records, the walked data.pkl and each record's bytes. */
export function walkTorchZip(b: Uint8Array) {
  const records = zipRecords(b);
  const data = new Map(records.map((r) => [r.name, b.subarray(r.dataStart, r.dataStart + r.size)]));
  const pkl = records.find((r) => r.name.endsWith('/data.pkl'));
  if (!pkl) throw new Error('pickle-walk: no data.pkl record');
  const prefix = pkl.name.slice(0, -'data.pkl'.length);
  return { records, data, prefix, pickle: walkPickle(data.get(pkl.name)!) };
}
