import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { addnetHash, embeddingHash, fileSha256, legacyModelHash, loraHash, modelHash } from '../../src/io/hashes.js';
import { describeGolden, golden } from '../golden.js';

const dir = mkdtempSync(path.join(tmpdir(), 'sdtune-hash-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
const EMPTY = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** A minimal safetensors file: one F32 tensor of n values, optional metadata. */
function safetensors(n: number, metadata?: Record<string, string>): Buffer {
  const header = Buffer.from(JSON.stringify({ ...(metadata && { __metadata__: metadata }), w: { dtype: 'F32', shape: [n], data_offsets: [0, 4 * n] } }));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(header.length));
  const data = Buffer.from(Float32Array.from({ length: n }, (_, i) => i * 0.5).buffer);
  return Buffer.concat([len, header, data]);
}

describe('A1111 hashes (streamed)', () => {
  // 1.1 MiB + a bit, so the legacy window [0x100000, 0x110000) is full and reads cross 1 MiB block boundaries.
  const big = Uint8Array.from({ length: 0x110000 + 12345 }, (_, i) => (i * 2654435761) >>> 24);
  const bigFile = path.join(dir, 'model.ckpt');
  writeFileSync(bigFile, big);

  it('Model hash = first 10 hex of the whole-file SHA-256; ranges', async () => {
    expect(await fileSha256(bigFile)).toBe(sha(big));
    expect(await modelHash(bigFile)).toBe(sha(big).slice(0, 10));
    expect(await fileSha256(bigFile, 100, 0x100005)).toBe(sha(big.subarray(100, 0x100005)));
    expect(await embeddingHash(bigFile)).toBe(sha(big).slice(0, 12));
  });

  it('legacy hash = SHA-256 of [0x100000, 0x110000), 8 hex; a small file hashes nothing', async () => {
    expect(await legacyModelHash(bigFile)).toBe(sha(big.subarray(0x100000, 0x110000)).slice(0, 8));
    const small = path.join(dir, 'small.bin');
    writeFileSync(small, 'tiny');
    expect(await legacyModelHash(small)).toBe(EMPTY.slice(0, 8));
  });

  it('addnet hash skips the header, so metadata does not change it; loraHash prefers sshs_model_hash', async () => {
    const a = path.join(dir, 'a.safetensors');
    const b = path.join(dir, 'b.safetensors');
    const c = path.join(dir, 'c.safetensors');
    writeFileSync(a, safetensors(300));
    writeFileSync(b, safetensors(300, { ss_network_dim: '4' }));
    writeFileSync(c, safetensors(300, { sshs_model_hash: 'feedfacecafe0123' }));
    const data = safetensors(300).subarray(-1200);
    expect(await addnetHash(a)).toBe(sha(data));
    expect(await addnetHash(b)).toBe(sha(data));
    expect(await loraHash(b)).toBe(sha(data).slice(0, 12));
    expect(await loraHash(c)).toBe('feedfacecafe');
    const pt = path.join(dir, 'lora.pt');
    writeFileSync(pt, safetensors(3));
    expect(await loraHash(pt)).toBe(sha(safetensors(3)).slice(0, 12));
  });

  it('errors name the file', async () => {
    const missing = path.join(dir, 'missing.safetensors');
    await expect(fileSha256(missing)).rejects.toThrow(SdtuneError);
    await expect(modelHash(missing)).rejects.toThrow(/missing\.safetensors: cannot read for hashing \(ENOENT\)/);
    await expect(addnetHash(bigFile)).rejects.toThrow(/model\.ckpt: not a safetensors file/);
  });
});

describeGolden('hashes of golden files (reference values from Python hashlib)', () => {
  it('tiny kohya LoRA: addnet and model hash', async () => {
    const f = golden('lora', 'tiny_lora_kohya.safetensors');
    expect(await loraHash(f)).toBe('43b93b2bf046');
    expect(await addnetHash(f)).toBe('43b93b2bf046b26e850d0ad059c10c0b14b1001e541ccc64567f1b632d332bdc');
    expect(await modelHash(f)).toBe('29c7a854fa');
  });
});
