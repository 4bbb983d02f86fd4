/**
 * Atomic file writes: data goes to a hidden temp file next to the target, is fsync'ed, then renamed over the
 * target, so readers never see a half-written checkpoint and a crash leaves the old file intact.
 */
import { randomBytes } from 'node:crypto';
import { link, mkdir, open, rename, rm, stat, statfs, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError, fileError } from '../errors.js';

const MAX_IO = 1 << 30; // keep each fs call well under Node's 2 GiB per-call limit

/** Write all of `data` at the handle's current position (loops over short writes and > 1 GiB buffers). */
export async function writeAll(fh: FileHandle, data: Uint8Array): Promise<void> {
  for (let off = 0; off < data.length; ) {
    const { bytesWritten } = await fh.write(data, off, Math.min(data.length - off, MAX_IO), null);
    off += bytesWritten;
  }
}

/** Why a write failed when the disk or the folder is at fault, not sdtune (the errno codes of write(2), open(2), ...). */
const WRITE_FAILURES: Record<string, string> = {
  ENOSPC: 'no space left on the device',
  EDQUOT: 'disk quota exceeded',
  EFBIG: 'file too large for the file system',
  EROFS: 'read-only file system',
  EIO: 'I/O error',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
};
/** Codes a failure inside the caller's `fill` is attributed to the target for (its other errors are its own). */
const FILL_FAILURES = new Set(['ENOSPC', 'EDQUOT', 'EFBIG', 'EROFS', 'EIO']);

const fmtBytes = (n: number) => {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
};

/**
 * A system error while writing `target` as one line naming the path, the cause and, when space ran out, the free
 * space left (the temp file is already gone, so this is what a retry would have); anything else is returned as is.
 */
async function writeFailure(err: unknown, target: string, dir: string, fromFill: boolean): Promise<unknown> {
  const e = err as NodeJS.ErrnoException;
  if (err instanceof SdtuneError || !(err instanceof Error) || typeof e.code !== 'string' || typeof e.syscall !== 'string') return err;
  if (fromFill && !(FILL_FAILURES.has(e.code) && e.syscall === 'write')) return err;
  let why = `${WRITE_FAILURES[e.code] ?? e.message.replace(/^\w+: /, '').split(',')[0]} (${e.code}`;
  if (e.code === 'ENOSPC' || e.code === 'EDQUOT' || e.code === 'EFBIG') {
    const fs = await statfs(dir).catch(() => undefined);
    if (fs) why += `, ${fmtBytes(fs.bavail * fs.bsize)} free in ${dir}`;
  }
  const existed = await stat(target).then(() => true, () => false);
  return fileError(`cannot write ${target}: ${why}); nothing was written${existed ? `, the existing ${path.basename(target)} is unchanged` : ''}`);
}

/**
 * Let the caller stream into an open temp file; the file replaces `target` only after `fill` resolves. A failure of
 * the disk or the folder (full, read-only, no permission) is an SdtuneError('file') naming `target`, and leaves
 * neither a temp file nor a changed target.
 */
/** Thrown by an `exclusive` atomic write whose target appeared meanwhile (nothing was written). */
export class TargetExistsError extends Error {
  constructor(readonly target: string) {
    super(`${target} already exists`);
  }
}

export interface AtomicOptions {
  /** never replace an existing target: the temp file is hard-linked into place (fails with TargetExistsError) */
  exclusive?: boolean;
}

export async function withAtomicFile(target: string, fill: (fh: FileHandle) => Promise<void>, opts: AtomicOptions = {}): Promise<void> {
  const dir = path.dirname(path.resolve(target));
  const tmp = path.join(dir, `.${path.basename(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  let fh: FileHandle;
  try {
    await mkdir(dir, { recursive: true });
    fh = await open(tmp, 'wx');
  } catch (err) {
    throw await writeFailure(err, target, dir, false);
  }
  let closed = false;
  let filled = false;
  try {
    await fill(fh);
    filled = true;
    await fh.sync();
    closed = true;
    await fh.close();
    if (opts.exclusive) {
      await link(tmp, target); // atomic and never over an existing file (EEXIST)
      await rm(tmp, { force: true });
    } else await rename(tmp, target);
  } catch (err) {
    if (!closed) await fh.close().catch(() => {});
    await rm(tmp, { force: true }).catch(() => {});
    if (opts.exclusive && (err as NodeJS.ErrnoException).code === 'EEXIST') throw new TargetExistsError(target);
    throw await writeFailure(err, target, dir, !filled);
  }
  await syncDir(dir);
}

/** Write a file atomically from one buffer or from chunks written in order. */
export async function writeFileAtomic(target: string, data: Uint8Array | Uint8Array[], opts: AtomicOptions = {}): Promise<void> {
  await withAtomicFile(target, async (fh) => {
    for (const chunk of Array.isArray(data) ? data : [data]) await writeAll(fh, chunk);
  }, opts);
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
