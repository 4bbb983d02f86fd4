/**
 * PyTorch pickle files (`.ckpt`, `.pt`, `.pth`, `.bin`) read as DATA (spec: shared/golden/pickle/README.md; opcodes:
 * CPython Lib/pickletools.py, protocols 0-5; containers: torch/serialization.py). `torch.load` and "safe" unpicklers
 * resolve globals to code and call them; this reader interprets the opcodes itself and maps each global of a short
 * allow-list (tensor rebuilds, storage dtypes, OrderedDict, a few builtins) to a data constructor. Any other global
 * is refused when it is named, before anything could use it. Tensors stay in the file: a tensor is its storage's byte
 * range plus offset, size and stride, read (and gathered, for views) only when asked, like safetensors.
 *
 * Both torch.save containers: the zip (`<folder>/data.pkl` + `<folder>/data/<key>` storages) and the legacy stream
 * (magic number, protocol, sys info, object, storage keys pickles, then each storage as int64 count + bytes). Every
 * length, count and depth is bounded before memory is spent on it.
 */
import { open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError, fmtShape, formatError } from '../errors.js';
import { type Dtype, type LazyTensor, type RawTensor, DTYPE_SIZE, SafetensorsFile, bf16BitsToF32, f16BitsToF32 } from './safetensors.js';
import { ZipArchive, readAt } from './zip.js';

// ---- values -----------------------------------------------------------------------------------------------------

/** A storage named by a persistent id: its dtype, key and element count; `bytes` is where it lies in the file. */
export interface PyStorage {
  kind: 'storage';
  dtype: Dtype;
  key: string;
  location: string;
  numel: number;
  /** file byte range [start, start + numel * size), set once the container resolves the key */
  start?: number;
}
/** `_rebuild_tensor_v2(storage, offset, size, stride, ...)`: a (possibly strided) view of a storage, in elements. */
export interface PyTensor {
  kind: 'tensor';
  storage: PyStorage;
  dtype: Dtype;
  offset: number;
  shape: number[];
  stride: number[];
  requiresGrad: boolean;
}
/** An allow-listed global as a value (a class or function reference; never called). */
export interface PyGlobal {
  kind: 'global';
  name: string;
}
/** An instance of an allow-listed record class (Lightning's ModelCheckpoint, a ParameterDict, a numpy dtype...). */
export interface PyObject {
  kind: 'object';
  className: string;
  args: PyValue[];
  state?: PyValue;
}
/** A Python dict or OrderedDict, in insertion order; keys are str, int, float, bool, None or tuples (by reference). */
export type PyDict = Map<PyValue, PyValue>;
export type PyValue = null | boolean | number | bigint | string | Uint8Array | PyValue[] | PyDict | Set<PyValue> | PyTensor | PyStorage | PyGlobal | PyObject;

const TUPLES = new WeakSet<object>();
/** Whether an array was a Python tuple (lists are arrays too). */
export const isTuple = (v: unknown): v is PyValue[] => typeof v === 'object' && v !== null && TUPLES.has(v);
const tuple = (xs: PyValue[]): PyValue[] => (TUPLES.add(xs), xs);
const isKind = <K extends string>(v: unknown, k: K): v is { kind: K } => typeof v === 'object' && v !== null && !(v instanceof Map) && !Array.isArray(v) && (v as { kind?: unknown }).kind === k;
export const isTensor = (v: unknown): v is PyTensor => isKind(v, 'tensor');
export const isDict = (v: unknown): v is PyDict => v instanceof Map;

/** Limits for one pickle: generous for real checkpoints (SD v1: ~200 KB of pickle, ~6,000 memo entries). */
export const PICKLE_LIMITS = {
  /** bytes of one pickle held in memory */
  maxBytes: 64 << 20,
  /** values on the stack, in the memo, and created in all */
  maxStack: 1_000_000,
  maxMemo: 2_000_000,
  maxValues: 8_000_000,
  /** nested MARKs (open tuples/lists/dicts being built) */
  maxMarks: 10_000,
  /** bytes of one LONG (Python int); the torch magic number takes 10 */
  maxLongBytes: 256,
} as const;
/** Depth of containers a consumer walks (an SD checkpoint nests 3 deep: dict > state_dict > tensor). */
export const MAX_NESTING = 64;

// ---- the allow-list ---------------------------------------------------------------------------------------------

const STORAGE_DTYPES: Record<string, Dtype> = {
  FloatStorage: 'F32', HalfStorage: 'F16', BFloat16Storage: 'BF16', DoubleStorage: 'F64', LongStorage: 'I64', IntStorage: 'I32',
  ShortStorage: 'I16', CharStorage: 'I8', ByteStorage: 'U8', BoolStorage: 'BOOL', UntypedStorage: 'U8',
};
/** torch.<dtype> objects (arguments of _rebuild_tensor_v3, fields of some checkpoints). */
const TORCH_DTYPES: Record<string, Dtype> = {
  float32: 'F32', float: 'F32', float16: 'F16', half: 'F16', bfloat16: 'BF16', float64: 'F64', double: 'F64', int64: 'I64', long: 'I64',
  int32: 'I32', int: 'I32', int16: 'I16', short: 'I16', int8: 'I8', uint8: 'U8', bool: 'BOOL',
};
/** Classes whose instances are kept as inert records (args and state as data). */
const RECORD_CLASSES = new Set([
  'torch.nn.modules.container.ParameterDict', 'torch.nn.modules.container.ParameterList',
  'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint', 'lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint',
  'numpy.dtype', 'numpy.ndarray', 'numpy.core.multiarray._reconstruct', 'numpy._core.multiarray._reconstruct',
  'numpy.core.multiarray.scalar', 'numpy._core.multiarray.scalar', 'builtins.object', 'argparse.Namespace',
]);
/** Known globals that are data but that this reader does not turn into tensors: refused with what they are. */
const UNSUPPORTED_GLOBALS: Record<string, string> = {
  'torch._utils._rebuild_qtensor': 'a quantized tensor', 'torch._utils._rebuild_sparse_tensor': 'a sparse tensor',
  'torch._utils._rebuild_sparse_csr_tensor': 'a sparse tensor', 'torch._utils._rebuild_meta_tensor_no_storage': 'a meta tensor (no data)',
  'torch._utils._rebuild_wrapper_subclass': 'a tensor subclass', 'torch._utils._rebuild_device_tensor_from_numpy': 'a numpy-backed device tensor',
  'torch._utils._rebuild_nested_tensor': 'a nested tensor', 'torch.ComplexFloatStorage': 'a complex tensor', 'torch.ComplexDoubleStorage': 'a complex tensor',
  'torch.QInt8Storage': 'a quantized tensor', 'torch.QUInt8Storage': 'a quantized tensor', 'torch.QInt32Storage': 'a quantized tensor',
};
/** Python 2 module names as pickle's fix_imports maps them. */
const PY2_MODULES: Record<string, string> = { __builtin__: 'builtins', copy_reg: 'copyreg' };

type Impl = (args: PyValue[], ctx: Ctx) => PyValue;
interface Ctx {
  fail: (msg: string) => never;
}

const num = (v: PyValue, what: string, ctx: Ctx): number => {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return v;
  return ctx.fail(`${what} is ${describe(v)}, expected a non-negative integer`);
};
const ints = (v: PyValue, what: string, ctx: Ctx): number[] => {
  if (!Array.isArray(v) || v.length > 64) return ctx.fail(`${what} is ${describe(v)}, expected a tuple of at most 64 integers`);
  return v.map((x, i) => num(x, `${what}[${i}]`, ctx));
};

/** `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`. */
function rebuildTensor(args: PyValue[], ctx: Ctx, dtype?: Dtype): PyTensor {
  const [storage, offset, size, stride, requiresGrad] = args;
  if (!isKind(storage, 'storage')) return ctx.fail(`tensor rebuild expects a storage first, got ${describe(storage)}`);
  const shape = ints(size ?? null, 'tensor size', ctx), strides = ints(stride ?? null, 'tensor stride', ctx);
  if (shape.length !== strides.length) return ctx.fail(`tensor size ${fmtShape(shape)} and stride ${fmtShape(strides)} differ in length`);
  const st = storage as PyStorage;
  return { kind: 'tensor', storage: st, dtype: dtype ?? st.dtype, offset: num(offset ?? null, 'tensor storage offset', ctx), shape, stride: strides, requiresGrad: requiresGrad === true };
}

const tensorArg = (v: PyValue, ctx: Ctx): PyTensor => (isTensor(v) ? v : ctx.fail(`parameter rebuild expects a tensor, got ${describe(v)}`));

const FUNCTIONS: Record<string, Impl> = {
  'torch._utils._rebuild_tensor_v2': (a, ctx) => rebuildTensor(a, ctx),
  'torch._utils._rebuild_tensor': (a, ctx) => rebuildTensor(a, ctx),
  'torch._utils._rebuild_tensor_v3': (a, ctx) => {
    const dt = a[6];
    if (!isKind(dt, 'object') || dt.className !== 'torch.dtype') return ctx.fail(`_rebuild_tensor_v3 expects a torch dtype, got ${describe(dt ?? null)}`);
    return rebuildTensor(a, ctx, dt.args[0] as Dtype);
  },
  'torch._utils._rebuild_parameter': (a, ctx) => ({ ...tensorArg(a[0] ?? null, ctx), requiresGrad: a[1] === true }),
  'torch._utils._rebuild_parameter_with_state': (a, ctx) => ({ ...tensorArg(a[0] ?? null, ctx), requiresGrad: a[1] === true }),
  // torch._tensor._rebuild_from_type_v2(func, type, args, state): a plain Tensor / Parameter rebuilt by func(*args)
  'torch._tensor._rebuild_from_type_v2': (a, ctx) => {
    const [fn, cls, args] = a;
    if (!isKind(fn, 'global') || !FUNCTIONS[fn.name] || !Array.isArray(args)) return ctx.fail('_rebuild_from_type_v2 expects a rebuild function and its arguments');
    if (!isKind(cls, 'global') || !['torch.Tensor', 'torch.nn.parameter.Parameter'].includes(cls.name)) return ctx.fail(`_rebuild_from_type_v2 of ${describe(cls ?? null)} (a tensor subclass) is not read`);
    return FUNCTIONS[fn.name](args, ctx);
  },
  'collections.OrderedDict': (a, ctx) => {
    const d: PyDict = new Map();
    if (a.length === 0) return d;
    if (a.length === 1 && Array.isArray(a[0])) {
      for (const kv of a[0]) {
        if (!Array.isArray(kv) || kv.length !== 2) return ctx.fail('OrderedDict expects (key, value) pairs');
        d.set(kv[0], kv[1]);
      }
      return d;
    }
    return ctx.fail(`OrderedDict called with ${describe(a)}`);
  },
  'builtins.set': (a) => new Set(Array.isArray(a[0]) ? a[0] : []),
  'builtins.frozenset': (a) => new Set(Array.isArray(a[0]) ? a[0] : []),
  'builtins.bytearray': (a, ctx) => (a.length === 0 ? new Uint8Array(0) : a[0] instanceof Uint8Array ? a[0] : ctx.fail('bytearray expects bytes')),
  'torch.Size': (a, ctx) => tuple(ints(a[0] ?? tuple([]), 'torch.Size', ctx)),
  // protocol 2 pickles Python 3 bytes as _codecs.encode(text, 'latin1')
  '_codecs.encode': (a, ctx) => {
    const [text, enc] = a;
    if (typeof text !== 'string') return ctx.fail('_codecs.encode expects a string');
    if (enc !== 'latin1' && enc !== 'latin-1' && enc !== undefined) return ctx.fail(`_codecs.encode with encoding ${describe(enc)} is not read`);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c > 255) return ctx.fail('_codecs.encode: text is not latin-1');
      out[i] = c;
    }
    return out;
  },
  // copyreg._reconstructor(cls, base, state): protocol 0/1 object creation; only for record classes
  'copyreg._reconstructor': (a, ctx) => {
    const cls = a[0];
    if (!isKind(cls, 'global') || !RECORD_CLASSES.has(cls.name)) return ctx.fail(`copyreg._reconstructor of ${describe(cls ?? null)}`);
    return { kind: 'object', className: cls.name, args: [] };
  },
};

/** Resolve `module.name` against the allow-list; the refusal names the global (nothing is ever looked up). */
function resolveGlobal(module: string, name: string, ctx: Ctx, refuse: (g: string) => never): PyValue {
  const full = `${PY2_MODULES[module] ?? module}.${name}`;
  if (module === 'torch' && STORAGE_DTYPES[name]) return { kind: 'global', name: full };
  if (module === 'torch' && TORCH_DTYPES[name]) return { kind: 'object', className: 'torch.dtype', args: [TORCH_DTYPES[name]] };
  if (FUNCTIONS[full] || RECORD_CLASSES.has(full) || full === 'torch.Tensor' || full === 'torch.nn.parameter.Parameter') return { kind: 'global', name: full };
  if (UNSUPPORTED_GLOBALS[full]) return ctx.fail(`it uses ${full} (${UNSUPPORTED_GLOBALS[full]}), which sdtune does not read`);
  return refuse(full);
}

/** Call an allow-listed global (REDUCE / NEWOBJ / INST / OBJ): its data constructor, or an inert record. */
function construct(callee: PyValue, args: PyValue[], ctx: Ctx): PyValue {
  if (!isKind(callee, 'global')) return ctx.fail(`calls ${describe(callee)}, which is not a function`);
  const fn = FUNCTIONS[callee.name];
  if (fn) return fn(args, ctx);
  if (RECORD_CLASSES.has(callee.name)) return { kind: 'object', className: callee.name, args };
  return ctx.fail(`calls ${callee.name}, which builds no data`);
}

/** A short description of a value for messages. */
export function describe(v: PyValue | undefined): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'None';
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 37)}...` : v);
  if (typeof v !== 'object') return String(v);
  if (v instanceof Uint8Array) return `bytes (${v.length})`;
  if (v instanceof Map) return `a dict (${v.size} items)`;
  if (v instanceof Set) return `a set (${v.size} items)`;
  if (Array.isArray(v)) return `a ${isTuple(v) ? 'tuple' : 'list'} (${v.length} items)`;
  switch (v.kind) {
    case 'tensor': return `a tensor ${fmtShape(v.shape)}`;
    case 'storage': return `a storage (${v.dtype})`;
    case 'global': return v.name;
    default: return `a ${v.className}`;
  }
}

// ---- the machine ------------------------------------------------------------------------------------------------

export interface UnpickleOptions {
  /** the file, for messages */
  file: string;
  /** byte offset of the pickle in the file, for messages */
  base?: number;
  /** BINPERSID / PERSID: turn a persistent id into a value (torch: a storage); absent = refused */
  persistentLoad?: (pid: PyValue, ctx: Ctx) => PyValue;
}

/** The refusal of a global that is not data. */
export function refusal(file: string, global: string): SdtuneError {
  return new SdtuneError(
    'unsupported',
    `refusing to load ${file}: it calls ${global} (not a tensor); convert it in a sandbox or ask its author for a .safetensors`,
  );
}

const enum Op {
  MARK = 0x28, STOP = 0x2e, POP = 0x30, POP_MARK = 0x31, DUP = 0x32, FLOAT = 0x46, INT = 0x49, BININT = 0x4a, BININT1 = 0x4b,
  LONG = 0x4c, BININT2 = 0x4d, NONE = 0x4e, PERSID = 0x50, BINPERSID = 0x51, REDUCE = 0x52, STRING = 0x53, BINSTRING = 0x54,
  SHORT_BINSTRING = 0x55, UNICODE = 0x56, BINUNICODE = 0x58, APPEND = 0x61, BUILD = 0x62, GLOBAL = 0x63, DICT = 0x64,
  EMPTY_DICT = 0x7d, APPENDS = 0x65, GET = 0x67, BINGET = 0x68, INST = 0x69, LONG_BINGET = 0x6a, LIST = 0x6c, EMPTY_LIST = 0x5d,
  OBJ = 0x6f, PUT = 0x70, BINPUT = 0x71, LONG_BINPUT = 0x72, SETITEM = 0x73, TUPLE = 0x74, EMPTY_TUPLE = 0x29, SETITEMS = 0x75,
  BINFLOAT = 0x47, PROTO = 0x80, NEWOBJ = 0x81, EXT1 = 0x82, EXT2 = 0x83, EXT4 = 0x84, TUPLE1 = 0x85, TUPLE2 = 0x86, TUPLE3 = 0x87,
  NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a, LONG4 = 0x8b, BINBYTES = 0x42, SHORT_BINBYTES = 0x43, SHORT_BINUNICODE = 0x8c,
  BINUNICODE8 = 0x8d, BINBYTES8 = 0x8e, EMPTY_SET = 0x8f, ADDITEMS = 0x90, FROZENSET = 0x91, NEWOBJ_EX = 0x92, STACK_GLOBAL = 0x93,
  MEMOIZE = 0x94, FRAME = 0x95, BYTEARRAY8 = 0x96, NEXT_BUFFER = 0x97, READONLY_BUFFER = 0x98,
}

const utf8 = new TextDecoder('utf-8', { fatal: true });
const latin1 = (b: Uint8Array) => {
  let s = '';
  for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode(...b.subarray(i, i + 8192));
  return s;
};

/** Little-endian two's complement bytes -> int (number when safe, else bigint). */
function decodeLong(b: Uint8Array): number | bigint {
  if (b.length === 0) return 0;
  let v = 0n;
  for (let i = b.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]);
  if (b[b.length - 1] & 0x80) v -= 1n << BigInt(8 * b.length);
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

/** Python string-literal escapes of protocol 0 STRING (`'...'` with \\, \n, \xhh, octal). */
function unescapePy(s: string, fail: (m: string) => never): string {
  let out = '';
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (c !== '\\') {
      out += c;
      continue;
    }
    const n = s[++i];
    const simple: Record<string, string> = { '\\': '\\', "'": "'", '"': '"', n: '\n', t: '\t', r: '\r', a: '\x07', b: '\b', f: '\f', v: '\v', '\n': '' };
    if (n !== undefined && n in simple) out += simple[n];
    else if (n === 'x' && /^[0-9a-fA-F]{2}$/.test(s.slice(i + 1, i + 3))) (out += String.fromCharCode(parseInt(s.slice(i + 1, i + 3), 16))), (i += 2);
    else if (n !== undefined && /[0-7]/.test(n)) {
      const m = /^[0-7]{1,3}/.exec(s.slice(i, i + 3))![0];
      out += String.fromCharCode(parseInt(m, 8) & 0xff);
      i += m.length - 1;
    } else fail(`bad escape in a STRING literal`);
  }
  return out;
}

/** protocol 0 UNICODE: raw-unicode-escape (\uXXXX, \UXXXXXXXX; other bytes are latin-1). */
function rawUnicodeEscape(s: string, fail: (m: string) => never): string {
  return s.replace(/\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})/g, (_, a: string | undefined, b: string | undefined) => {
    const cp = parseInt(a ?? b!, 16);
    if (cp > 0x10ffff) fail('UNICODE escape out of range');
    return String.fromCodePoint(cp);
  });
}

/**
 * Interpret one pickle starting at `start` of `bytes` as data. Returns the value and the offset after STOP.
 * Globals outside the allow-list throw `refusal(...)` when they are named; every other problem is one SdtuneError.
 */
export function unpickle(bytes: Uint8Array, opts: UnpickleOptions, start = 0): { value: PyValue; end: number } {
  const file = opts.file;
  const base = opts.base ?? 0;
  const L = PICKLE_LIMITS;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = start;
  let opAt = start;
  const fail = (msg: string): never => {
    throw new SdtuneError('format', `${file}: ${msg} (pickle opcode at byte ${base + opAt})`);
  };
  const ctx: Ctx = { fail };
  const truncated = (): never => {
    throw new SdtuneError('file', `${file}: the pickle ends at byte ${base + bytes.length} in the middle of an opcode (file truncated?)`);
  };
  const need = (n: number) => {
    if (!(n >= 0) || n > bytes.length - pos) {
      if (n > L.maxBytes) fail(`a length field claims ${n} bytes, more than the rest of the pickle (${bytes.length - pos} bytes)`);
      truncated();
    }
  };
  const take = (n: number) => {
    need(n);
    const b = bytes.subarray(pos, pos + n);
    pos += n;
    return b;
  };
  const u8 = () => (need(1), bytes[pos++]);
  const u16 = () => (need(2), (pos += 2), dv.getUint16(pos - 2, true));
  const i32 = () => (need(4), (pos += 4), dv.getInt32(pos - 4, true));
  const u32 = () => (need(4), (pos += 4), dv.getUint32(pos - 4, true));
  const u64 = () => {
    need(8);
    const v = dv.getBigUint64(pos, true);
    pos += 8;
    return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
  };
  const line = () => {
    const nl = bytes.indexOf(0x0a, pos);
    if (nl < 0) truncated();
    const s = latin1(bytes.subarray(pos, nl));
    pos = nl + 1;
    return s.endsWith('\r') ? s.slice(0, -1) : s;
  };
  const text = (b: Uint8Array) => {
    try {
      return utf8.decode(b);
    } catch {
      return fail('a string is not valid UTF-8');
    }
  };

  let stack: PyValue[] = [];
  const marks: PyValue[][] = [];
  const memo = new Map<number, PyValue>();
  let created = 0;
  const push = (v: PyValue) => {
    if (stack.length >= L.maxStack) fail(`the pickle stack grows past ${L.maxStack.toLocaleString('en-US')} values`);
    if (++created > L.maxValues) fail(`the pickle builds more than ${L.maxValues.toLocaleString('en-US')} values`);
    stack.push(v);
  };
  const pop = (): PyValue => {
    if (!stack.length) fail(marks.length ? 'an opcode pops past a MARK' : 'an opcode pops from an empty stack');
    return stack.pop()!;
  };
  const top = (): PyValue => (stack.length ? stack[stack.length - 1] : fail('an opcode needs a value on an empty stack'));
  const popMark = (): PyValue[] => {
    const items = stack;
    if (!marks.length) fail('an opcode needs a MARK that is not there');
    stack = marks.pop()!;
    return items;
  };
  const put = (i: number) => {
    if (!memo.has(i) && memo.size >= L.maxMemo) fail(`the pickle memo grows past ${L.maxMemo.toLocaleString('en-US')} entries`);
    memo.set(i, top());
  };
  const get = (i: number) => (memo.has(i) ? push(memo.get(i)!) : fail(`memo entry ${i} is read before it is written`));
  const list = (v: PyValue): PyValue[] => (Array.isArray(v) && !isTuple(v) ? v : fail(`appends to ${describe(v)}, not a list`));
  const dict = (v: PyValue): PyDict => (v instanceof Map ? v : fail(`sets an item of ${describe(v)}, not a dict`));
  const set = (v: PyValue): Set<PyValue> => (v instanceof Set ? v : fail(`adds to ${describe(v)}, not a set`));
  const setItems = (d: PyDict, items: PyValue[]) => {
    if (items.length % 2) fail('SETITEMS with an odd number of values');
    for (let i = 0; i < items.length; i += 2) d.set(items[i], items[i + 1]);
  };
  const global = (module: string, name: string) => resolveGlobal(module, name, ctx, (g) => { throw refusal(file, g); });
  const persistent = (pid: PyValue) => (opts.persistentLoad ? opts.persistentLoad(pid, ctx) : fail(`uses a persistent id (${describe(pid)}) outside a torch container`));
  const asLong = (v: number | bigint) => (typeof v === 'bigint' ? fail('an integer too large for this reader') : v);

  for (;;) {
    opAt = pos;
    if (pos >= bytes.length) truncated();
    const op = bytes[pos++];
    switch (op) {
      case Op.PROTO: {
        const v = u8();
        if (v > 5) fail(`pickle protocol ${v} is newer than 5, the highest this reader knows`);
        break;
      }
      case Op.FRAME: {
        const n = u64();
        if (n > bytes.length - pos) fail(`a FRAME claims ${n} bytes, more than the rest of the pickle`);
        break;
      }
      case Op.STOP:
        if (stack.length !== 1 || marks.length) fail(`STOP with ${stack.length} values on the stack and ${marks.length} open MARKs`);
        return { value: stack[0], end: pos };
      case Op.MARK:
        if (marks.length >= L.maxMarks) fail(`more than ${L.maxMarks} nested MARKs`);
        marks.push(stack);
        stack = [];
        break;
      case Op.POP:
        if (stack.length) stack.pop();
        else popMark();
        break;
      case Op.POP_MARK: popMark(); break;
      case Op.DUP: push(top()); break;
      // numbers
      case Op.NONE: push(null); break;
      case Op.NEWTRUE: push(true); break;
      case Op.NEWFALSE: push(false); break;
      case Op.BININT: push(i32()); break;
      case Op.BININT1: push(u8()); break;
      case Op.BININT2: push(u16()); break;
      case Op.LONG1: case Op.LONG4: {
        const n = op === Op.LONG1 ? u8() : u32();
        if (n > L.maxLongBytes) fail(`a LONG of ${n} bytes, more than this reader's ${L.maxLongBytes}`);
        push(decodeLong(take(n)));
        break;
      }
      case Op.INT: {
        const s = line();
        if (s === '00' || s === '01') push(s === '01');
        else if (/^[+-]?\d{1,300}$/.test(s)) {
          const b = BigInt(s);
          push(b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(b) : b);
        } else fail(`INT ${JSON.stringify(s.slice(0, 20))} is not an integer`);
        break;
      }
      case Op.LONG: {
        const s = line().replace(/L$/, '');
        if (!/^[+-]?\d{1,300}$/.test(s)) fail(`LONG ${JSON.stringify(s.slice(0, 20))} is not an integer`);
        const b = BigInt(s);
        push(b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(b) : b);
        break;
      }
      case Op.FLOAT: {
        const s = line();
        const v = Number(s);
        if (Number.isNaN(v) && !/^[+-]?nan$/i.test(s)) fail(`FLOAT ${JSON.stringify(s.slice(0, 20))} is not a number`);
        push(v);
        break;
      }
      case Op.BINFLOAT: need(8); push(dv.getFloat64(pos, false)); pos += 8; break;
      // strings and bytes
      case Op.BINUNICODE: push(text(take(u32()))); break;
      case Op.SHORT_BINUNICODE: push(text(take(u8()))); break;
      case Op.BINUNICODE8: push(text(take(u64()))); break;
      case Op.BINSTRING: {
        const n = i32();
        if (n < 0) fail('BINSTRING with a negative length');
        push(latin1(take(n)));
        break;
      }
      case Op.SHORT_BINSTRING: push(latin1(take(u8()))); break;
      case Op.STRING: {
        const s = line();
        if (s.length < 2 || (s[0] !== "'" && s[0] !== '"') || s[s.length - 1] !== s[0]) fail('STRING literal is not quoted');
        push(unescapePy(s.slice(1, -1), fail));
        break;
      }
      case Op.UNICODE: push(rawUnicodeEscape(line(), fail)); break;
      case Op.BINBYTES: push(take(u32()).slice()); break;
      case Op.SHORT_BINBYTES: push(take(u8()).slice()); break;
      case Op.BINBYTES8: case Op.BYTEARRAY8: push(take(u64()).slice()); break;
      // containers
      case Op.EMPTY_TUPLE: push(tuple([])); break;
      case Op.TUPLE1: push(tuple([pop()])); break;
      case Op.TUPLE2: { const b = pop(), a = pop(); push(tuple([a, b])); break; }
      case Op.TUPLE3: { const c = pop(), b = pop(), a = pop(); push(tuple([a, b, c])); break; }
      case Op.TUPLE: { const items = popMark(); push(tuple(items)); break; }
      case Op.EMPTY_LIST: push([]); break;
      case Op.LIST: { const items = popMark(); push(items); break; }
      case Op.APPEND: { const v = pop(); list(top()).push(v); break; }
      case Op.APPENDS: { const items = popMark(); const l = list(top()); for (const v of items) l.push(v); break; }
      case Op.EMPTY_DICT: push(new Map()); break;
      case Op.DICT: { const items = popMark(); const d: PyDict = new Map(); setItems(d, items); push(d); break; }
      case Op.SETITEM: { const v = pop(), k = pop(); dict(top()).set(k, v); break; }
      case Op.SETITEMS: { const items = popMark(); setItems(dict(top()), items); break; }
      case Op.EMPTY_SET: push(new Set()); break;
      case Op.ADDITEMS: { const items = popMark(); const s = set(top()); for (const v of items) s.add(v); break; }
      case Op.FROZENSET: { const items = popMark(); push(new Set(items)); break; }
      // memo
      case Op.PUT: {
        const s = line();
        if (!/^\d{1,10}$/.test(s)) fail('PUT index is not a number');
        put(Number(s));
        break;
      }
      case Op.BINPUT: put(u8()); break;
      case Op.LONG_BINPUT: put(u32()); break;
      case Op.MEMOIZE: put(memo.size); break;
      case Op.GET: {
        const s = line();
        if (!/^\d{1,10}$/.test(s)) fail('GET index is not a number');
        get(Number(s));
        break;
      }
      case Op.BINGET: get(u8()); break;
      case Op.LONG_BINGET: get(u32()); break;
      // globals and calls: only the allow-list, each a data constructor
      case Op.GLOBAL: { const module = line(); const name = line(); push(global(module, name)); break; }
      case Op.STACK_GLOBAL: {
        const name = pop(), module = pop();
        if (typeof name !== 'string' || typeof module !== 'string') fail('STACK_GLOBAL needs two strings');
        push(global(module as string, name as string));
        break;
      }
      case Op.REDUCE: {
        const args = pop(), fn = pop();
        if (!isTuple(args)) fail(`REDUCE arguments are ${describe(args)}, not a tuple`);
        push(construct(fn, args as PyValue[], ctx));
        break;
      }
      case Op.NEWOBJ: {
        const args = pop(), cls = pop();
        if (!isTuple(args)) fail(`NEWOBJ arguments are ${describe(args)}, not a tuple`);
        push(construct(cls, args as PyValue[], ctx));
        break;
      }
      case Op.NEWOBJ_EX: {
        const kwargs = pop(), args = pop(), cls = pop();
        if (!isTuple(args) || !(kwargs instanceof Map)) fail('NEWOBJ_EX needs a tuple and a dict');
        if ((kwargs as PyDict).size) fail('NEWOBJ_EX with keyword arguments is not read');
        push(construct(cls, args as PyValue[], ctx));
        break;
      }
      case Op.INST: {
        const module = line(), name = line();
        const cls = global(module, name);
        const args = popMark();
        push(construct(cls, args, ctx));
        break;
      }
      case Op.OBJ: {
        const items = popMark();
        if (!items.length) fail('OBJ without a class');
        push(construct(items[0], items.slice(1), ctx));
        break;
      }
      case Op.BUILD: {
        const state = pop();
        const obj = top();
        if (obj instanceof Map) break; // an OrderedDict's attributes (state_dict()'s _metadata): dropped
        if (isKind(obj, 'object')) (obj as PyObject).state = state;
        else if (isTensor(obj)) break; // tensor attributes (e.g. Parameter state) carry no data we read
        else fail(`BUILD on ${describe(obj)}`);
        break;
      }
      case Op.BINPERSID: push(persistent(pop())); break;
      case Op.PERSID: push(persistent(line())); break;
      case Op.EXT1: case Op.EXT2: case Op.EXT4: {
        const code = op === Op.EXT1 ? u8() : op === Op.EXT2 ? u16() : asLong(u32());
        throw refusal(file, `the copyreg extension registry (code ${code}), which can name any callable`);
      }
      case Op.NEXT_BUFFER: case Op.READONLY_BUFFER:
        fail('uses out-of-band buffers (pickle protocol 5), which a file cannot carry');
        break;
      default:
        fail(`unknown pickle opcode 0x${op.toString(16).padStart(2, '0')} (not a pickle, or corrupt)`);
    }
  }
}

// ---- torch containers -------------------------------------------------------------------------------------------

/** One tensor of a torch file as the loaders see it (same fields as a safetensors TensorInfo, minus offsets). */
export interface TorchTensorInfo {
  name: string;
  dtype: Dtype;
  shape: number[];
  tensor: PyTensor;
}

/** What the loaders need of an open tensor file; SafetensorsFile and TorchFile both provide it. */
export interface TensorFile {
  readonly path: string;
  readonly metadata: Record<string, string>;
  readonly tensors: ReadonlyMap<string, { name: string; dtype: Dtype; shape: number[] }>;
  keys(): string[];
  has(name: string): boolean;
  info(name: string): { name: string; dtype: Dtype; shape: number[] };
  read(name: string): Promise<RawTensor>;
  readFloat(name: string): Promise<RawTensor & { data: Float32Array }>;
  close(): Promise<void>;
}

export interface TorchOpenOptions {
  /** flatten `obj.state_dict` when the object has one (Lightning checkpoints); default: the whole object */
  stateDict?: boolean;
}

export const PICKLE_EXTENSIONS = /\.(ckpt|pt|pth|bin|pkl)$/i;
const LEGACY_MAGIC = 0x1950a86a20f9469cfc6cn;
/** Opcodes a protocol 0/1 pickle (no PROTO header) can start with: MARK, GLOBAL, containers, scalars. */
const PICKLE_START = new Set([...'(cdl]})NIJKMSVXUTFGL'].map((c) => c.charCodeAt(0)));
const FLOAT_DTYPES: ReadonlySet<Dtype> = new Set(['F32', 'F16', 'BF16', 'F64']);
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const MAX_TENSORS = 100_000;
const MAX_WALK = 2_000_000;

/** A storage persistent id: ('storage', <torch.XStorage>, key, location, numel[, view_metadata]). */
function storageOf(pid: PyValue, ctx: Ctx, seen: Map<string, PyStorage>): PyStorage {
  if (!isTuple(pid) || (pid.length !== 5 && pid.length !== 6) || pid[0] !== 'storage')
    return ctx.fail(`persistent id ${describe(pid)} is not a torch storage ('storage', type, key, location, size)`);
  const [, type, key, location, numel, view] = pid;
  if (!isKind(type, 'global') || !type.name.startsWith('torch.') || !STORAGE_DTYPES[type.name.slice(6)]) return ctx.fail(`storage type ${describe(type ?? null)} is not a torch storage class`);
  if (typeof key !== 'string' || key.length > 256) return ctx.fail('storage key is not a short string');
  if (typeof location !== 'string') return ctx.fail('storage location is not a string');
  const n = num(numel ?? null, `storage "${key}" size`, ctx);
  if (view !== undefined && view !== null) return ctx.fail(`storage "${key}" is a legacy storage view, which this reader does not read`);
  const dtype = STORAGE_DTYPES[type.name.slice(6)];
  const had = seen.get(key);
  if (had) {
    if (had.dtype !== dtype || had.numel !== n) return ctx.fail(`storage "${key}" is named twice with different types or sizes`);
    return had;
  }
  const s: PyStorage = { kind: 'storage', dtype, key, location, numel: n };
  seen.set(key, s);
  return s;
}

/** Decode little-endian element bytes (a fresh, aligned buffer) to Float32Array / Int32Array. */
function decodeElements(file: string, name: string, dtype: Dtype, b: Uint8Array): Float32Array | Int32Array {
  const size = DTYPE_SIZE[dtype];
  if (!LITTLE_ENDIAN && size > 1) for (let i = 0; i < b.length; i += size) b.subarray(i, i + size).reverse();
  const buf = b.buffer as ArrayBuffer;
  switch (dtype) {
    case 'F32': return new Float32Array(buf, b.byteOffset, b.length / 4);
    case 'F16': return f16BitsToF32(new Uint16Array(buf, b.byteOffset, b.length / 2));
    case 'BF16': return bf16BitsToF32(new Uint16Array(buf, b.byteOffset, b.length / 2));
    case 'F64': return Float32Array.from(new Float64Array(buf, b.byteOffset, b.length / 8));
    case 'I32': return new Int32Array(buf, b.byteOffset, b.length / 4);
    case 'I16': return Int32Array.from(new Int16Array(buf, b.byteOffset, b.length / 2));
    case 'I8': return Int32Array.from(new Int8Array(buf, b.byteOffset, b.length));
    case 'U8': case 'BOOL': return Int32Array.from(b);
    case 'I64': {
      const w = new BigInt64Array(buf, b.byteOffset, b.length / 8);
      const out = new Int32Array(w.length);
      for (let i = 0; i < w.length; i++) {
        if (w[i] > 2147483647n || w[i] < -2147483648n) throw new SdtuneError('unsupported', `${file}: tensor "${name}" (I64) has values outside the int32 range`);
        out[i] = Number(w[i]);
      }
      return out;
    }
    default: throw new SdtuneError('unsupported', `${file}: tensor "${name}" has unsupported dtype ${dtype}`);
  }
}

/**
 * Plain JS value of a pickled scalar/container (for metadata and structures handed to other modules): dicts become
 * objects, tuples/lists/sets arrays, big ints decimal strings, records `{__class__}`; tensors stay PyTensor. Bounded:
 * 64 levels and 2,000,000 parts in all (a value shared many times through the memo counts each time).
 */
export function toPlain(v: PyValue, budget = { parts: MAX_WALK }, depth = 0): unknown {
  if (depth > MAX_NESTING) throw formatError(`a value nests deeper than ${MAX_NESTING} levels`);
  if (--budget.parts < 0) throw formatError(`a value has more than ${MAX_WALK.toLocaleString('en-US')} parts (shared many times?)`);
  if (v === null || typeof v !== 'object') return typeof v === 'bigint' ? v.toString() : v;
  if (v instanceof Uint8Array) return v;
  if (Array.isArray(v)) return v.map((x) => toPlain(x, budget, depth + 1));
  if (v instanceof Set) return [...v].map((x) => toPlain(x, budget, depth + 1));
  if (v instanceof Map) return Object.fromEntries([...v].map(([k, x]) => [String(toPlain(k, budget, depth + 1)), toPlain(x, budget, depth + 1)]));
  if (v.kind === 'object') return { __class__: v.className };
  return v;
}

/** An open PyTorch file: its object parsed as data, tensors flattened to dotted keys and read on demand. */
export class TorchFile implements TensorFile {
  private closed = false;
  readonly tensors: ReadonlyMap<string, TorchTensorInfo>;
  readonly metadata: Record<string, string>;
  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    readonly format: 'zip' | 'legacy',
    /** the unpickled object (dicts are Maps; tensors are PyTensor records) */
    readonly root: PyValue,
    selected: PyValue,
    readonly fileSize: number,
  ) {
    const { tensors, metadata } = flatten(path, selected);
    this.tensors = tensors;
    this.metadata = metadata;
  }

  /** Open a torch.save file (zip or legacy); refuses non-data globals before anything else is read. */
  static async open(file: string, opts: TorchOpenOptions = {}): Promise<TorchFile> {
    let fh: FileHandle;
    try {
      fh = await open(file, 'r');
    } catch (e) {
      throw new SdtuneError('file', `${file}: cannot open (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw new SdtuneError('file', `${file}: not a regular file`);
      if (st.size < 2) throw new SdtuneError('file', `${file}: file too short (${st.size} bytes) to be a PyTorch file`);
      const head = await readAt(fh, 0, Math.min(4, st.size), file);
      let root: PyValue, format: 'zip' | 'legacy';
      if (head[0] === 0x50 && head[1] === 0x4b) ({ root, format } = { root: await readZip(fh, file, st.size), format: 'zip' });
      else if (head[0] === 0x80 || PICKLE_START.has(head[0])) ({ root, format } = { root: await readLegacy(fh, file, st.size), format: 'legacy' });
      else throw new SdtuneError('file', `${file}: not a PyTorch file (neither a torch.save zip nor a pickle: starts with 0x${[...head].map((b) => b.toString(16).padStart(2, '0')).join('')})`);
      const sd = opts.stateDict && root instanceof Map ? root.get('state_dict') : undefined;
      return new TorchFile(fh, file, format, root, sd instanceof Map ? sd : root, st.size);
    } catch (e) {
      await fh.close().catch(() => {});
      throw e;
    }
  }

  keys(): string[] {
    return [...this.tensors.keys()];
  }
  has(name: string): boolean {
    return this.tensors.has(name);
  }
  info(name: string): TorchTensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new SdtuneError('format', `${this.path}: no tensor "${name}" (${this.tensors.size} tensors in file)`);
    return t;
  }

  /** Read one tensor: its storage span, gathered by stride when it is a view, widened to Float32Array / Int32Array. */
  async read(name: string): Promise<RawTensor> {
    const t = this.info(name);
    if (this.closed) throw new SdtuneError('file', `${this.path}: read of "${name}" after close`);
    return { dtype: t.dtype, shape: [...t.shape], data: decodeElements(this.path, name, t.dtype, await this.readBytes(name, t.tensor)) };
  }
  /** Read a floating-point tensor; an integer dtype is refused naming the key. */
  async readFloat(name: string): Promise<RawTensor & { data: Float32Array }> {
    const t = this.info(name);
    if (!FLOAT_DTYPES.has(t.dtype)) throw new SdtuneError('format', `${this.path}: tensor "${name}" has dtype ${t.dtype}, expected a floating-point dtype (F32, F16, BF16 or F64)`);
    return (await this.read(name)) as RawTensor & { data: Float32Array };
  }
  /** Every tensor, one at a time (small files). */
  async readAll(): Promise<Map<string, RawTensor>> {
    const out = new Map<string, RawTensor>();
    for (const k of this.tensors.keys()) out.set(k, await this.read(k));
    return out;
  }
  /** A tensor as a LazyTensor (its stored dtype; data read when loaded). */
  lazy(name: string): LazyTensor {
    const t = this.info(name);
    return { shape: [...t.shape], dtype: t.dtype, load: async () => (await this.read(name)).data };
  }
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }

  /** The tensor's element bytes in row-major order (checked against its storage; views gathered). */
  private async readBytes(name: string, t: PyTensor): Promise<Uint8Array> {
    const es = DTYPE_SIZE[t.dtype];
    const st = t.storage;
    const storageBytes = st.numel * DTYPE_SIZE[st.dtype];
    if (st.start === undefined) throw new SdtuneError('format', `${this.path}: tensor "${name}": storage "${st.key}" has no data in the file`);
    let n = 1;
    for (const d of t.shape) n *= d;
    if (n === 0) return new Uint8Array(0);
    // the elements touched: offset .. offset + sum((size_i - 1) * stride_i), all inside the storage
    let last = t.offset;
    for (let i = 0; i < t.shape.length; i++) last += (t.shape[i] - 1) * t.stride[i];
    if (!Number.isSafeInteger(last) || (last + 1) * es > storageBytes)
      throw new SdtuneError('format', `${this.path}: tensor "${name}" (offset ${t.offset}, size ${fmtShape(t.shape)}, stride ${fmtShape(t.stride)}) reaches past its storage "${st.key}" of ${storageBytes} bytes`);
    let contiguous = true;
    for (let i = t.shape.length - 1, s = 1; i >= 0; s *= t.shape[i], i--) if (t.shape[i] !== 1 && t.stride[i] !== s) contiguous = false;
    if (contiguous) return readAt(this.fh, st.start + t.offset * es, n * es, this.path);
    // a view: read the span once, then gather element by element (last axis fastest)
    const span = await readAt(this.fh, st.start + t.offset * es, (last - t.offset + 1) * es, this.path);
    const out = new Uint8Array(n * es);
    const rank = t.shape.length;
    const idx = new Array<number>(rank).fill(0);
    let src = 0;
    for (let o = 0; o < n; o++) {
      out.set(span.subarray(src * es, src * es + es), o * es);
      for (let d = rank - 1; d >= 0; d--) {
        idx[d]++;
        src += t.stride[d];
        if (idx[d] < t.shape[d]) break;
        src -= t.stride[d] * t.shape[d];
        idx[d] = 0;
      }
    }
    return out;
  }
}

/** Tensors (by dotted key) and scalar metadata of an object; bounded depth and work, cycles refused. */
function flatten(file: string, root: PyValue): { tensors: Map<string, TorchTensorInfo>; metadata: Record<string, string> } {
  const tensors = new Map<string, TorchTensorInfo>();
  const metadata: Record<string, string> = {};
  const onPath = new Set<object>();
  let work = 0;
  const keyOf = (k: PyValue) => (typeof k === 'string' || typeof k === 'number' || typeof k === 'bigint' || typeof k === 'boolean' ? String(k) : k === null ? 'None' : undefined);
  const visit = (v: PyValue, key: string, depth: number): void => {
    if (++work > MAX_WALK) throw formatError(`${file}: the object has more than ${MAX_WALK.toLocaleString('en-US')} parts (shared many times?)`);
    if (depth > MAX_NESTING) throw formatError(`${file}: the object nests deeper than ${MAX_NESTING} levels at "${key}"`);
    if (isTensor(v)) {
      if (tensors.has(key)) throw formatError(`${file}: two tensors flatten to the key "${key}"`);
      if (tensors.size >= MAX_TENSORS) throw formatError(`${file}: more than ${MAX_TENSORS.toLocaleString('en-US')} tensors, the limit of this reader`);
      tensors.set(key, { name: key, dtype: v.dtype, shape: v.shape, tensor: v });
      return;
    }
    if (v === null || typeof v !== 'object') {
      if (key && Object.keys(metadata).length < MAX_TENSORS) metadata[key] = v === null ? 'None' : String(v);
      return;
    }
    if (onPath.has(v)) throw formatError(`${file}: the object contains itself at "${key}"`);
    const children: [string, PyValue][] = [];
    if (v instanceof Map) {
      for (const [k, x] of v) {
        const s = keyOf(k);
        if (s !== undefined) children.push([s, x]);
      }
    } else if (Array.isArray(v)) v.forEach((x, i) => children.push([String(i), x]));
    else if (!(v instanceof Uint8Array) && !(v instanceof Set) && v.kind === 'object' && v.state instanceof Map) children.push(['', v.state]);
    if (!children.length) return;
    onPath.add(v);
    for (const [k, x] of children) visit(x, key && k ? `${key}.${k}` : key || k, depth + 1);
    onPath.delete(v);
  };
  visit(root, '', 0);
  return { tensors, metadata };
}

/** Storages must have a data range in the file; a tensor's dtype must fit its storage (v3 may reinterpret bytes). */
function checkStorageBytes(file: string, s: PyStorage, available: number, what: string): void {
  const need = s.numel * DTYPE_SIZE[s.dtype];
  if (!Number.isSafeInteger(need) || need > available)
    throw new SdtuneError('file', `${file}: storage "${s.key}" (${s.numel} x ${s.dtype}) needs ${need} bytes but ${what} has ${available} (truncated or corrupt?)`);
}

/** The torch zip: the folder of `*\/data.pkl`, its pickle, storages `<folder>/data/<key>` (stored records). */
async function readZip(fh: FileHandle, file: string, size: number): Promise<PyValue> {
  const zip = await ZipArchive.open(fh, file, size);
  const pkls = [...zip.entries.keys()].filter((n) => n === 'data.pkl' || n.endsWith('/data.pkl'));
  if (!pkls.length) throw new SdtuneError('format', `${file}: a zip archive without a data.pkl record: not a torch.save file`);
  const pklName = pkls.sort((a, b) => a.length - b.length)[0];
  const prefix = pklName.slice(0, -'data.pkl'.length);
  const order = zip.entries.get(`${prefix}byteorder`);
  if (order) {
    const b = latin1(await zip.readEntry(order, 16)).trim();
    if (b !== 'little') throw new SdtuneError('unsupported', `${file}: its tensors are stored ${b}-endian; only little-endian files are read`);
  }
  const pkl = zip.entries.get(pklName)!;
  const bytes = await zip.readEntry(pkl, PICKLE_LIMITS.maxBytes);
  const seen = new Map<string, PyStorage>();
  const { value, end } = unpickle(bytes, { file, persistentLoad: (pid, ctx) => storageOf(pid, ctx, seen) });
  if (end !== bytes.length) throw new SdtuneError('format', `${file}: ${bytes.length - end} bytes after the end of ${pklName}`);
  for (const s of seen.values()) {
    const rec = zip.entries.get(`${prefix}data/${s.key}`);
    if (!rec) throw new SdtuneError('file', `${file}: storage "${s.key}" has no record ${prefix}data/${s.key} in the archive (truncated?)`);
    zip.assertStored(rec, 'storage');
    checkStorageBytes(file, s, rec.size, `record ${rec.name}`);
    s.start = await zip.dataOffset(rec);
  }
  return value;
}

/** Unpickle at `pos`, reading more of the file when the pickle is longer than the first read. */
async function pickleAt(fh: FileHandle, file: string, size: number, pos: number, opts: Omit<UnpickleOptions, 'file' | 'base'>): Promise<{ value: PyValue; end: number }> {
  for (let n = Math.min(size - pos, 1 << 20); ; n = Math.min(size - pos, n * 4, PICKLE_LIMITS.maxBytes)) {
    const bytes = await readAt(fh, pos, n, file);
    try {
      const r = unpickle(bytes, { file, base: pos, ...opts });
      return { value: r.value, end: pos + r.end };
    } catch (e) {
      const more = e instanceof SdtuneError && e.kind === 'file' && /middle of an opcode/.test(e.message);
      if (!more || pos + n >= size) throw e;
      if (n >= PICKLE_LIMITS.maxBytes) throw new SdtuneError('format', `${file}: a pickle at byte ${pos} is longer than the ${PICKLE_LIMITS.maxBytes} byte limit`);
    }
  }
}

/**
 * The legacy torch.save stream (torch/serialization.py `_legacy_save`): magic number, protocol version, sys info,
 * the object, the storage keys, then per key an int64 element count and the elements. A plain pickle (no magic
 * number) is read as one object without storages.
 */
async function readLegacy(fh: FileHandle, file: string, size: number): Promise<PyValue> {
  const magic = await pickleAt(fh, file, size, 0, {});
  if (magic.value !== LEGACY_MAGIC) {
    if (magic.end !== size) throw new SdtuneError('format', `${file}: ${size - magic.end} bytes after the pickle (not a torch.save file)`);
    return magic.value;
  }
  const proto = await pickleAt(fh, file, size, magic.end, {});
  if (proto.value !== 1001) throw new SdtuneError('unsupported', `${file}: legacy torch.save protocol ${describe(proto.value)} (only 1001 is read)`);
  const sys = await pickleAt(fh, file, size, proto.end, {});
  if (sys.value instanceof Map && sys.value.get('little_endian') === false) throw new SdtuneError('unsupported', `${file}: saved on a big-endian machine; only little-endian files are read`);
  const seen = new Map<string, PyStorage>();
  const obj = await pickleAt(fh, file, size, sys.end, { persistentLoad: (pid, ctx) => storageOf(pid, ctx, seen) });
  const keys = await pickleAt(fh, file, size, obj.end, {});
  if (!Array.isArray(keys.value) || !keys.value.every((k) => typeof k === 'string'))
    throw new SdtuneError('format', `${file}: the legacy storage-key list is ${describe(keys.value)}, not a list of strings`);
  let pos = keys.end;
  for (const key of keys.value as string[]) {
    const s = seen.get(key);
    if (!s) throw new SdtuneError('format', `${file}: the storage-key list names "${key}", which no tensor uses`);
    if (s.start !== undefined) throw new SdtuneError('format', `${file}: storage "${key}" is listed twice`);
    if (pos + 8 > size) throw new SdtuneError('file', `${file}: storage "${key}" header at byte ${pos} is past the end of the file (truncated?)`);
    const count = new DataView((await readAt(fh, pos, 8, file)).buffer).getBigInt64(0, true);
    if (count !== BigInt(s.numel)) throw new SdtuneError('format', `${file}: storage "${key}" at byte ${pos} has ${count} elements, the object says ${s.numel}`);
    checkStorageBytes(file, s, size - pos - 8, 'the rest of the file');
    s.start = pos + 8;
    pos = s.start + s.numel * DTYPE_SIZE[s.dtype];
  }
  for (const s of seen.values()) if (s.start === undefined) throw new SdtuneError('format', `${file}: storage "${s.key}" is not in the storage-key list`);
  return obj.value;
}

// ---- entry points -----------------------------------------------------------------------------------------------

/** Whether a path names a pickle by its extension (.ckpt, .pt, .pth, .bin, .pkl). */
export const isPickleFile = (p: string) => PICKLE_EXTENSIONS.test(p);

/** Open a tensor file: a PyTorch pickle by extension (.ckpt/.pt/.pth/.bin/.pkl), else a safetensors file. */
export async function openTensorFile(p: string, opts: TorchOpenOptions = {}): Promise<TensorFile> {
  return isPickleFile(p) ? TorchFile.open(p, opts) : SafetensorsFile.open(p);
}

/** One A1111 hypernetwork file as plain data: its fields and, per context width, the k and v state dicts. */
export interface HypernetworkPt {
  path: string;
  /** every non-integer key (layer_structure, activation_func, is_layer_norm, ...) as plain JS values, in file order */
  fields: Record<string, unknown>;
  /** context width -> [k, v] state dicts (`linear.0.weight` -> tensor, torch layout), each tensor read on load() */
  layers: Map<number, [Map<string, LazyTensor>, Map<string, LazyTensor>]>;
  close(): Promise<void>;
}

/**
 * Read an A1111 hypernetwork `.pt` (modules/hypernetworks/hypernetwork.py Hypernetwork.save) as data: integer keys
 * are context widths holding a 2-tuple (or list) of state dicts; everything else is a field. No hypernetwork logic
 * here; the file stays open until close().
 */
export async function readHypernetworkPt(file: string): Promise<HypernetworkPt> {
  const f = await TorchFile.open(file);
  try {
    if (!(f.root instanceof Map)) throw formatError(`${file}: not an A1111 hypernetwork (the object is ${describe(f.root)}, not a dict)`);
    const fields: Record<string, unknown> = {};
    const budget = { parts: MAX_WALK }; // shared by all fields
    const layers: HypernetworkPt['layers'] = new Map();
    const byTensor = new Map<PyTensor, string>([...f.tensors].map(([k, t]) => [t.tensor, k]));
    const stateDict = (v: PyValue, where: string) => {
      if (!(v instanceof Map)) throw formatError(`${file}: ${where} is ${describe(v)}, not a state dict`);
      const out = new Map<string, LazyTensor>();
      for (const [k, t] of v) {
        if (typeof k !== 'string' || !isTensor(t)) throw formatError(`${file}: ${where} entry ${describe(k)} is ${describe(t)}, not a named tensor`);
        out.set(k, f.lazy(byTensor.get(t)!));
      }
      return out;
    };
    for (const [k, v] of f.root) {
      if (typeof k === 'number') {
        if (!Array.isArray(v) || v.length !== 2) throw formatError(`${file}: width ${k} holds ${describe(v)}, expected (k, v) state dicts`);
        layers.set(k, [stateDict(v[0], `width ${k} k`), stateDict(v[1], `width ${k} v`)]);
      } else if (typeof k === 'string') fields[k] = toPlain(v, budget);
      else throw formatError(`${file}: key ${describe(k)} is neither a width nor a field name`);
    }
    if (!layers.size) throw formatError(`${file}: no integer (context width) keys: not an A1111 hypernetwork`);
    return { path: file, fields, layers, close: () => f.close() };
  } catch (e) {
    await f.close();
    throw e;
  }
}

/** `x.pt` -> `x` (for messages and output names). */
export const pickleStem = (p: string) => path.basename(p).replace(PICKLE_EXTENSIONS, '');
