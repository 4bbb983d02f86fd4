/**
 * Atomic file writes: data goes to a hidden temp file next to the target, is fsync'ed, then renamed over the
 * target, so readers never see a half-written checkpoint and a crash leaves the old file intact.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, rename, rm, type FileHandle } from 'node:fs/promises';
import path from 'node:path';

const MAX_IO = 1 << 30; // keep each fs call well under Node's 2 GiB per-call limit

/** Write all of `data` at the handle's current position (loops over short writes and > 1 GiB buffers). */
export async function writeAll(fh: FileHandle, data: Uint8Array): Promise<void> {
  for (let off = 0; off < data.length; ) {
    const { bytesWritten } = await fh.write(data, off, Math.min(data.length - off, MAX_IO), null);
    off += bytesWritten;
  }
}

/** Let the caller stream into an open temp file; the file replaces `target` only after `fill` resolves. */
export async function withAtomicFile(target: string, fill: (fh: FileHandle) => Promise<void>): Promise<void> {
  const dir = path.dirname(path.resolve(target));
  await mkdir(dir, { recursive: true });
  const tmp = path.join(dir, `.${path.basename(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  const fh = await open(tmp, 'wx');
  let closed = false;
  try {
    await fill(fh);
    await fh.sync();
    closed = true;
    await fh.close();
    await rename(tmp, target);
  } catch (err) {
    if (!closed) await fh.close().catch(() => {});
    await rm(tmp, { force: true }).catch(() => {});
    throw err;
  }
  await syncDir(dir);
}

/** Write a file atomically from one buffer or from chunks written in order. */
export async function writeFileAtomic(target: string, data: Uint8Array | Uint8Array[]): Promise<void> {
  await withAtomicFile(target, async (fh) => {
    for (const chunk of Array.isArray(data) ? data : [data]) await writeAll(fh, chunk);
  });
}

/** Best-effort fsync of a directory so the rename itself is durable (not supported on every platform). */
async function syncDir(dir: string): Promise<void> {
  try {
    const d = await open(dir, 'r');
    await d.sync().finally(() => d.close());
  } catch {
    /* ignore: e.g. Windows cannot open directories */
  }
}
