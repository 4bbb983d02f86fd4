/**
 * A1111 / kohya file hashes (spec samplers.md §10.2, lora-formats.md §1.7), all streamed in 1 MiB blocks so
 * multi-GB checkpoints are never held in memory:
 *  - "Model hash" (A1111 >= 1.0): first 10 hex of SHA-256 of the whole file (modules/hashes.sha256 + shorthash).
 *  - legacy model hash: SHA-256 of the 0x10000 bytes at offset 0x100000, first 8 hex (sd_models.model_hash).
 *  - addnet hash of a safetensors file: SHA-256 of everything after the 8 + N byte header (hashes.addnet_hash_safetensors,
 *    kohya's `sshs_model_hash`), so editing metadata does not change it.
 *  - "Lora hashes" / "TI hashes": first 12 hex.
 */
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import nodePath from 'node:path';
import { SdtuneError } from '../errors.js';
import { SafetensorsFile } from './safetensors.js';

const BLOCK = 1 << 20;

const ioError = (path: string, e: unknown) =>
  e instanceof SdtuneError ? e : new SdtuneError('file', `${path}: cannot read for hashing (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);

/** Streamed SHA-256 (hex) of bytes [start, end) of a file; a range past EOF hashes what exists (like Python's read). */
export async function fileSha256(path: string, start = 0, end = Infinity): Promise<string> {
  const hash = createHash('sha256');
  if (end > start) {
    try {
      const stream = createReadStream(path, { start, end: Number.isFinite(end) ? end - 1 : undefined, highWaterMark: BLOCK });
      for await (const block of stream) hash.update(block as Buffer);
    } catch (e) {
      throw ioError(path, e);
    }
  }
  return hash.digest('hex');
}

/** A1111 "Model hash": first 10 hex chars of the whole file's SHA-256. */
export async function modelHash(path: string): Promise<string> {
  return (await fileSha256(path)).slice(0, 10);
}

/** A1111 "Model hash" of a model path: the single file's, or the UNet weights' of a diffusers folder (none without one). */
export async function modelPathHash(model: string): Promise<string | undefined> {
  if (statSync(model).isFile()) return modelHash(model);
  for (const f of ['unet/diffusion_pytorch_model.safetensors', 'unet/diffusion_pytorch_model.fp16.safetensors']) {
    if (existsSync(nodePath.join(model, f))) return modelHash(nodePath.join(model, f));
  }
  return undefined;
}

/** A1111 legacy 8-hex hash (sd_models.model_hash): SHA-256 of [0x100000, 0x110000); a file under 1 MiB hashes no bytes. */
export async function legacyModelHash(path: string): Promise<string> {
  return (await fileSha256(path, 0x100000, 0x110000)).slice(0, 8);
}

/** kohya/addnet hash (full hex) of a safetensors file: SHA-256 of the bytes after the header (hashes.addnet_hash_safetensors). */
export async function addnetHash(path: string): Promise<string> {
  let headerEnd: number;
  try {
    const fh = await open(path, 'r');
    try {
      const head = Buffer.alloc(8);
      const { bytesRead } = await fh.read(head, 0, 8, 0);
      const size = (await fh.stat()).size;
      const n = bytesRead === 8 ? head.readBigUInt64LE(0) : -1n;
      if (n < 0n || 8n + n > BigInt(size)) throw new SdtuneError('file', `${path}: not a safetensors file (header length does not fit the ${size}-byte file)`);
      headerEnd = 8 + Number(n);
    } finally {
      await fh.close();
    }
  } catch (e) {
    throw ioError(path, e);
  }
  return fileSha256(path, headerEnd);
}

/**
 * A1111's LoRA short hash for "Lora hashes" (Lora network.NetworkOnDisk): the `sshs_model_hash` metadata when present,
 * else the addnet hash for .safetensors, the whole-file SHA-256 otherwise; first 12 hex chars.
 */
export async function loraHash(path: string): Promise<string> {
  if (!/\.safetensors$/i.test(path)) return (await fileSha256(path)).slice(0, 12);
  const f = await SafetensorsFile.open(path);
  const stored = f.metadata.sshs_model_hash;
  await f.close();
  return (stored || (await addnetHash(path))).slice(0, 12);
}

/** A1111 "TI hashes": first 12 hex chars of the embedding file's SHA-256. */
export async function embeddingHash(path: string): Promise<string> {
  return (await fileSha256(path)).slice(0, 12);
}
