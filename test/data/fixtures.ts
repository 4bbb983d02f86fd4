/** Test images written on the fly into temp folders (the data tests never read ../shared). */
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import sharp from 'sharp';

/** A fresh temp folder and its cleanup. */
export async function tempDir(): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(tmpdir(), 'sdtune-data-'));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** A w x h RGB image whose pixels depend on (x, y, tag), in png/jpg/webp by the extension; parent folders created. */
export async function writeImage(file: string, w: number, h: number, tag = 0, caption?: string): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const d = Buffer.alloc(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = (y * w + x) * 3;
      d[i] = (x * 255) / Math.max(1, w - 1);
      d[i + 1] = (y * 255) / Math.max(1, h - 1);
      d[i + 2] = (tag * 37) % 256;
    }
  }
  const img = sharp(d, { raw: { width: w, height: h, channels: 3 } });
  const ext = path.extname(file).toLowerCase();
  const buf = await (ext === '.png' ? img.png() : ext === '.webp' ? img.webp({ lossless: true }) : img.jpeg({ quality: 95 })).toBuffer();
  await writeFile(file, buf);
  if (caption !== undefined) await writeFile(file.slice(0, -ext.length) + '.txt', caption);
}
