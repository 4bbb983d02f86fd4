/**
 * Adapter flag values -> the library's structured options (argv stays in src/cli): `--lora FILE[:WEIGHT]`,
 * `--embedding FILE[:TOKEN]`, `--hypernetwork FILE[:STRENGTH]`. Light on purpose (no tfjs).
 */
import { usageError } from '../errors.js';

const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

/**
 * Parse "file.safetensors:0.7" (sd-scripts `--network_weights` + `--network_mul`, A1111 `<lora:name:0.7>` in flag
 * form); the weight defaults to `defaultWeight`; a Windows drive letter (`C:\x.safetensors`) is not a separator.
 */
export function parseAdapterArg(arg: string, defaultWeight = 1.0): { path: string; weight: number } {
  const i = arg.lastIndexOf(':');
  const tail = arg.slice(i + 1);
  const split = i >= 0 && !(i === 1 && /^[A-Za-z]$/.test(arg[0])) && (tail === '' || NUMBER.test(tail));
  const file = split ? arg.slice(0, i) : arg;
  if (!file) throw usageError(`adapter "${arg}": missing file name`);
  if (split && tail === '') throw usageError(`adapter "${arg}": missing weight after ":" (use file.safetensors:0.8)`);
  return { path: file, weight: split ? Number(tail) : defaultWeight };
}

/** `--lora FILE[:WEIGHT]` (weight 1 by default). */
export const loraArg = (arg: string) => parseAdapterArg(arg);

/** `--hypernetwork FILE[:STRENGTH]` (strength 1 by default). */
export function hypernetworkArg(arg: string): { path: string; strength: number } {
  const { path, weight } = parseAdapterArg(arg);
  return { path, strength: weight };
}

/** `--embedding FILE[:TOKEN]`: the token after the last ":" (not a drive letter's, not a path's). */
export function embeddingArg(arg: string): { path: string; token?: string } {
  const sep = arg.lastIndexOf(':');
  const hasToken = sep > 1 && !/^[\\/]/.test(arg.slice(sep + 1)); // "C:\x" is a drive letter, not a token
  if (!hasToken) {
    if (!arg) throw usageError('embedding "": missing file name');
    return { path: arg };
  }
  return { path: arg.slice(0, sep), token: arg.slice(sep + 1) };
}

/** A repeatable flag's values (absent, one, or many) mapped by `parse`. */
export const adapterArgs = <T>(v: unknown, parse: (arg: string) => T): T[] | undefined =>
  v === undefined ? undefined : [v].flat().map((a) => parse(String(a)));
