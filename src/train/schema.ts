/**
 * Config schemas (zod): one declaration per key gives its type (z.output), its default (.default) and its
 * validation. The leaf builders here also record what a key accepts in words ("an integer >= 1 or null"), so every
 * message says expected vs found the same way, whatever section or method the key belongs to. Light on purpose
 * (no tfjs): the CLI reads the method schemas to declare its commands.
 */
import { z } from 'zod';

/** What a leaf accepts, for messages. */
export interface LeafSpec {
  t: 'str' | 'int' | 'num' | 'bool' | 'enum' | 'strs' | 'nums' | 'size';
  min?: number; // inclusive unless minOpen
  max?: number; // inclusive unless maxOpen
  minOpen?: boolean;
  maxOpen?: boolean;
  mult?: number; // integers: multiple of
  values?: readonly string[]; // enum
  int?: boolean; // nums: integers
}

const SPECS = new WeakMap<z.ZodType, LeafSpec>();
const tag = <T extends z.ZodType>(s: T, spec: LeafSpec): T => (SPECS.set(s, spec), s);

interface Range {
  max?: number;
  minOpen?: boolean;
  maxOpen?: boolean;
}

/** A string. */
export const str = () => tag(z.string(), { t: 'str' });
/** true or false. */
export const bool = () => tag(z.boolean(), { t: 'bool' });
/** An integer >= min (optionally <= / < max, a multiple of mult). */
export function int(min: number, o: Omit<Range, 'minOpen'> & { mult?: number } = {}) {
  let s = z.number().int().gte(min);
  if (o.max !== undefined) s = o.maxOpen ? s.lt(o.max) : s.lte(o.max);
  if (o.mult) s = s.multipleOf(o.mult);
  return tag(s, { t: 'int', min, ...o });
}
/** A finite number >= min (> with minOpen; optionally <= / < max). */
export function num(min: number, o: Range = {}) {
  let s = o.minOpen ? z.number().gt(min) : z.number().gte(min);
  if (o.max !== undefined) s = o.maxOpen ? s.lt(o.max) : s.lte(o.max);
  return tag(s, { t: 'num', min, ...o });
}
/** One of the listed strings. */
export const oneOf = <const T extends readonly string[]>(values: T) => tag(z.enum(values), { t: 'enum', values });
/** A list of strings (a single command-line value is a list of one). */
export const strs = () => tag(z.array(z.string()), { t: 'strs' });
/** A list of numbers, each >= min (> with minOpen; optionally <= / < max; integers with `int`). */
export function nums(min: number, o: Range & { int?: boolean } = {}) {
  let e = o.int ? z.number().int() : z.number();
  e = o.minOpen ? e.gt(min) : e.gte(min);
  if (o.max !== undefined) e = o.maxOpen ? e.lt(o.max) : e.lte(o.max);
  return tag(z.array(e), { t: 'nums', min, ...o });
}
/** A size in pixels, multiple of 8: 512 (square) or [width, height]; always read as [width, height]. */
export function size() {
  const side = z.number().int().gte(8).multipleOf(8);
  return tag(z.union([side.transform((s) => [s, s] as [number, number]), z.tuple([side, side])]), { t: 'size' });
}
/** `s` or null, null by default (null always has a documented meaning). */
export const orNull = <T extends z.ZodType>(s: T) => s.nullable().default(null);

/** The leaf builder's spec under the .default() / .nullable() wrappers, and whether null is accepted. */
export function leafSpec(s: z.ZodType): { spec: LeafSpec; nullable: boolean } {
  let nullable = false;
  let cur: z.ZodType = s;
  for (;;) {
    const spec = SPECS.get(cur);
    if (spec) return { spec, nullable };
    if (cur instanceof z.ZodNullable) nullable = true;
    if (cur instanceof z.ZodNullable || cur instanceof z.ZodDefault || cur instanceof z.ZodOptional) cur = cur.unwrap() as z.ZodType;
    else throw new Error('config schema: a key must be built with the leaf builders of train/schema.ts');
  }
}

/** "an integer >= 1 or null", "one of "a", "b"" (what a key accepts, in messages). */
export function expected(s: z.ZodType): string {
  const { spec: p, nullable } = leafSpec(s);
  const range = (what: string) => {
    if (p.max === undefined) return `${what} ${p.minOpen ? '>' : '>='} ${p.min}`;
    return `${what} in ${p.minOpen ? '(' : '['}${p.min}, ${p.max}${p.maxOpen ? ')' : ']'}`;
  };
  const base = {
    str: 'a string',
    int: range('an integer') + (p.mult ? `, a multiple of ${p.mult}` : ''),
    num: range('a number'),
    bool: 'true or false',
    enum: `one of ${(p.values ?? []).map((v) => JSON.stringify(v)).join(', ')}`,
    strs: 'a list of strings',
    nums: `a list of ${range(p.int ? 'integers' : 'numbers')}`, // "a list of numbers > 0"
    size: 'a size in pixels, multiple of 8: 512 or [width, height]',
  }[p.t];
  if (!nullable) return base;
  return p.t === 'size' ? `${base}, or null for the model's own size` : `${base} or null`;
}

/** A section: its leaves by dotted key (`train.ema.decay`) and its nested groups (`train.ema`). */
export interface SectionKeys {
  leaves: Map<string, z.ZodType>;
  groups: string[];
}

/** The dotted keys of a section schema (a z.object of leaves and nested z.objects). */
export function sectionKeys(name: string, obj: z.ZodObject): SectionKeys {
  const out: SectionKeys = { leaves: new Map(), groups: [name] };
  const walk = (o: z.ZodObject, prefix: string) => {
    for (const [k, s] of Object.entries(o.shape)) {
      const key = `${prefix}.${k}`;
      if (s instanceof z.ZodObject) {
        out.groups.push(key);
        walk(s, key);
      } else out.leaves.set(key, s as z.ZodType);
    }
  };
  walk(obj, name);
  return out;
}

/** The value of a leaf as validated (defaults filled, sizes as [w, h]); `ok: false` when it does not fit. */
export function parseLeaf(s: z.ZodType, v: unknown): { ok: true; value: unknown } | { ok: false } {
  const r = s.safeParse(v);
  return r.success ? { ok: true, value: r.data } : { ok: false };
}

export const isMap = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
/** A value as messages quote it, on one short line whatever the file holds. */
export const show = (v: unknown): string => {
  const s = v === null ? 'null' : Array.isArray(v) ? JSON.stringify(v) : isMap(v) ? 'a mapping' : typeof v === 'string' ? JSON.stringify(v) : String(v);
  return s.length > 100 ? `${s.slice(0, 97)}...` : s;
};

/** Edit distance (Levenshtein), for "did you mean". */
export function levenshtein(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[b.length];
}

/** The leaf's kind (for reading command-line strings). */
export const leafKind = (s: z.ZodType) => leafSpec(s).spec.t;
