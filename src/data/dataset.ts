/**
 * Caption datasets as kohya sd-scripts and diffusers lay them out: images in a folder (png, jpg/jpeg, webp) and/or
 * kohya `<repeats>_<name>` subfolders, captions from `<image stem><caption extension>` (kohya: first line, stripped)
 * or a diffusers imagefolder `metadata.jsonl` ({"file_name", "text"}; it wins over a caption file). Every image is
 * fully decoded once here, so a corrupt file is reported and skipped before training rather than crashing mid-run.
 */
import { createHash } from 'node:crypto';
import { lstat, readdir, readFile, realpath, stat } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { SdtuneError, formatError, usageError } from '../errors.js';

/** One training image (before repeats are applied). */
export interface DataItem {
  path: string;
  caption: string;
  /** size after EXIF orientation, as it is trained */
  width: number;
  height: number;
  repeats: number;
  /** sha256 (hex) of the file content, the key of the latent cache */
  hash: string;
}
export interface ScanOptions {
  /** kohya `caption_extension`, e.g. ".txt" (a missing leading dot is added) */
  captionExtension: string;
  /** repeats of the images directly in `dir` (kohya subfolders carry their own) */
  repeats: number;
  /** name of the diffusers metadata file looked for in each folder; when given it must exist (default: metadata.jsonl if present) */
  metadata?: string | null;
  /** what an image without a caption trains on: 'empty' (the empty caption: warned about, default) or 'templates' (caption templates, as textual inversion fills them in: nothing to warn about) */
  uncaptioned?: 'empty' | 'templates';
  onWarning?: (message: string) => void;
}

/** Image file extensions picked up (case-insensitive). */
export const IMAGE_EXTENSIONS = ['.png', '.jpg', '.jpeg', '.webp'];
const REPEAT_FOLDER = /^(\d+)_(.+)$/;
const SCAN_CONCURRENCY = 8;

/** Scan `dir`, then its kohya `N_name` subfolders (names sorted, so the order is the same everywhere); bad images are warned about and skipped. */
export async function scanDataset(dir: string, opts: ScanOptions): Promise<DataItem[]> {
  const warn = opts.onWarning ?? (() => {});
  if (!Number.isInteger(opts.repeats) || opts.repeats < 1) throw usageError(`repeats must be a positive integer, got ${opts.repeats}`);
  const capExt = opts.captionExtension.startsWith('.') ? opts.captionExtension : `.${opts.captionExtension}`;
  const root = path.resolve(dir);
  const st = await stat(root).catch(() => undefined);
  if (!st?.isDirectory()) throw usageError(`dataset folder ${dir} does not exist or is not a folder`);

  const realRoot = await realpath(root);
  const folders: { dir: string; repeats: number }[] = [{ dir: root, repeats: opts.repeats }];
  const entries = await listDir(root);
  // real path -> the folder that scans it: each is scanned once, by its real folder rather than a symlink to it
  const scanned = new Map([[realRoot, root], ...entries.filter((e) => e.isDirectory() && Number(REPEAT_FOLDER.exec(e.name)?.[1] ?? 0) > 0).map((e) => [path.join(realRoot, e.name), path.join(root, e.name)] as const)]);
  for (const e of entries) {
    if (!(await isDir(root, e))) continue;
    const sub = path.join(root, e.name);
    const why = e.isSymbolicLink() ? await symlinkEscape(realRoot, sub, true) : undefined;
    const m = REPEAT_FOLDER.exec(e.name);
    const real = e.isSymbolicLink() ? await realpath(sub).catch(() => sub) : path.join(realRoot, e.name);
    if (why) warn(`ignoring subfolder ${sub}: ${why}`);
    else if (!m) warn(`ignoring subfolder ${sub}: not a kohya <repeats>_<name> folder`);
    else if (Number(m[1]) === 0) warn(`ignoring subfolder ${sub}: 0 repeats`);
    else if (scanned.has(real) && scanned.get(real) !== sub) warn(`ignoring subfolder ${sub}: a symlink to ${scanned.get(real)}, which is scanned already (its images would count twice)`);
    else {
      scanned.set(real, sub);
      folders.push({ dir: sub, repeats: Number(m[1]) });
    }
  }

  const items: DataItem[] = [];
  const metaName = opts.metadata ?? 'metadata.jsonl';
  let metaFound = false;
  let found = 0;
  let uncaptioned = 0;
  for (const folder of folders) {
    const entries = await listDir(folder.dir);
    const files: string[] = [];
    for (const e of entries) {
      if (e.isDirectory() || !IMAGE_EXTENSIONS.includes(path.extname(e.name).toLowerCase())) continue;
      const why = e.isSymbolicLink() ? await symlinkEscape(realRoot, path.join(folder.dir, e.name)) : undefined;
      if (why) warn(`skipping image ${path.join(folder.dir, e.name)}: ${why}`);
      else files.push(e.name);
    }
    found += files.length;
    let hasMeta = entries.some((e) => e.name === metaName && !e.isDirectory());
    const metaWhy = hasMeta ? await symlinkEscape(realRoot, path.join(folder.dir, metaName)) : undefined;
    if (metaWhy) {
      warn(`ignoring ${path.join(folder.dir, metaName)}: ${metaWhy}`);
      hasMeta = false;
    }
    metaFound ||= hasMeta;
    const meta = hasMeta ? await readMetadata(path.join(folder.dir, metaName), new Set(files), warn) : new Map<string, string>();
    // workers collect their warnings so they are reported in file order
    const scanned = await mapPool(files, SCAN_CONCURRENCY, async (name) => {
      const file = path.join(folder.dir, name);
      const notes: string[] = [];
      const image = await probeImage(file).catch((e: Error) => void notes.push(`skipping unreadable image ${file}: ${e.message}`));
      if (!image) return { notes };
      const caption = meta.get(name) ?? (await readCaption(file.slice(0, -path.extname(file).length) + capExt, realRoot, notes));
      return { notes, item: { path: file, caption: caption ?? '', repeats: folder.repeats, ...image }, captioned: caption !== undefined };
    });
    for (const { notes, item, captioned } of scanned) {
      for (const n of notes) warn(n);
      if (!item) continue;
      if (!captioned) uncaptioned++;
      items.push(item);
    }
  }
  if (opts.metadata && !metaFound) throw usageError(`metadata file ${opts.metadata} not found in ${root} or its <repeats>_<name> subfolders`);
  if (items.length === 0) {
    const what = `${IMAGE_EXTENSIONS.map((x) => `*${x}`).join(', ')} in ${root} and its <repeats>_<name> subfolders`;
    throw usageError(`no usable training images: looked for ${what}; ${found === 0 ? 'none found' : `all ${found} found were unreadable`}`);
  }
  if (uncaptioned > 0 && opts.uncaptioned !== 'templates') {
    warn(`${uncaptioned} of ${items.length} images have no caption (no <image>${capExt} and no ${metaName} entry); they use an empty caption`);
  }
  return items;
}

type Entry = { name: string; isDirectory(): boolean; isSymbolicLink(): boolean };

/** Directory entries by name (code-unit order), without hidden files (".cache", ".DS_Store", ...). */
async function listDir(dir: string): Promise<Entry[]> {
  try {
    const entries = (await readdir(dir, { withFileTypes: true })).filter((e) => !e.name.startsWith('.'));
    return entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  } catch (e) {
    throw new SdtuneError('file', `cannot list ${dir} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
}

/** A directory entry that is a folder (following symlinks). */
async function isDir(parent: string, e: Entry): Promise<boolean> {
  if (e.isDirectory()) return true;
  return e.isSymbolicLink() && (await stat(path.join(parent, e.name)).catch(() => undefined))?.isDirectory() === true;
}

/** Hash the file and decode it all (sharp fails on truncated/corrupt data; streamed through a thumbnail to bound memory). */
async function probeImage(file: string): Promise<{ width: number; height: number; hash: string }> {
  const buf = await readFile(file);
  const { autoOrient } = await sharp(buf).metadata(); // size after EXIF orientation
  await sharp(buf).resize(32, 32, { fit: 'inside' }).raw().toBuffer();
  return { width: autoOrient.width, height: autoOrient.height, hash: createHash('sha256').update(buf).digest('hex') };
}

/**
 * Why a symlink in the dataset must not be followed, or undefined when it may: its target lies outside the dataset
 * folder (a caption linked to /etc/hostname would be read into training and saved in the outputs) or, for a
 * subfolder, is the dataset folder itself or one above it (`1_loop -> .` would count every image again).
 * Links that do not resolve are left to the normal read, which reports them.
 */
async function symlinkEscape(realRoot: string, p: string, folder = false): Promise<string | undefined> {
  const target = await realpath(p).catch(() => undefined);
  if (target === undefined) return undefined;
  const within = (child: string, parent: string) => child === parent || child.startsWith(parent.endsWith(path.sep) ? parent : parent + path.sep);
  if (folder && within(realRoot, target)) return `a symlink to ${target}, the dataset folder itself or one above it (its images would count twice)`;
  return within(target, realRoot) ? undefined : `a symlink to ${target}, outside the dataset folder ${realRoot} (copy the file in to use it)`;
}

/** kohya read_caption: the first line, stripped (a BOM too); undefined when the file is absent or a symlink that leaves the dataset (noted). */
async function readCaption(file: string, realRoot: string, notes: string[]): Promise<string | undefined> {
  const link = await lstat(file).then((st) => st.isSymbolicLink(), () => false);
  const why = link ? await symlinkEscape(realRoot, file) : undefined;
  if (why) {
    notes.push(`ignoring caption ${file}: ${why}`);
    return undefined;
  }
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new SdtuneError('file', `cannot read caption ${file} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  const lines = text.replace(/^\uFEFF/, '').split(/\r?\n/);
  if (lines.slice(1).some((l) => l.trim() !== '')) notes.push(`caption ${file} has several lines; using the first (as kohya)`);
  return lines[0]!.trim();
}

/** diffusers imagefolder metadata.jsonl: file_name (relative to its folder) -> "text" (or "caption") column. */
async function readMetadata(file: string, images: Set<string>, warn: (m: string) => void): Promise<Map<string, string>> {
  const dir = path.dirname(file);
  const out = new Map<string, string>();
  const lines = (await readFile(file, 'utf8')).replace(/^\uFEFF/, '').split(/\r?\n/);
  lines.forEach((line, i) => {
    if (line.trim() === '') return;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (e) {
      throw formatError(`${file}:${i + 1}: not valid JSON (${(e as Error).message})`);
    }
    const r = row as Record<string, unknown>;
    if (typeof row !== 'object' || row === null || typeof r.file_name !== 'string') throw formatError(`${file}:${i + 1}: needs a "file_name" string`);
    const text = r.text ?? r.caption;
    if (typeof text !== 'string') throw formatError(`${file}:${i + 1}: needs a "text" string for ${r.file_name}`);
    const name = path.posix.normalize(r.file_name.replaceAll('\\', '/')).replace(/^\.\//, '');
    if (!images.has(name)) warn(`${file}:${i + 1}: ${r.file_name} is not an image in ${dir}; entry ignored`);
    else out.set(name, text);
  });
  return out;
}

/** Promise.all over `xs` with at most `n` calls of `f` in flight; results in input order. */
async function mapPool<T, R>(xs: readonly T[], n: number, f: (x: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(xs.length);
  let next = 0;
  const worker = async () => {
    while (next < xs.length) {
      const i = next++;
      out[i] = await f(xs[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, xs.length) }, worker));
  return out;
}
