import { createHash } from 'node:crypto';
import { mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { scanDataset } from '../../src/data/dataset.js';
import { tempDir, writeImage } from './fixtures.js';

let dir: string;
let cleanup: () => Promise<void>;
beforeEach(async () => ({ dir, cleanup } = await tempDir()));
afterEach(() => cleanup());

const scan = (d: string, extra: { captionExtension?: string; repeats?: number; uncaptioned?: 'empty' | 'templates' } = {}) => {
  const warnings: string[] = [];
  const p = scanDataset(d, { captionExtension: '.txt', repeats: 1, ...extra, onWarning: (m) => warnings.push(m) });
  return p.then((items) => ({ items, warnings }));
};

describe('scanDataset', () => {
  it('reads images with .txt captions (kohya: first line, stripped), sizes and content hashes', async () => {
    await writeImage(path.join(dir, 'b.png'), 8, 6, 1, '  a red circle, outlined style \nsecond line\n');
    await writeImage(path.join(dir, 'a.jpg'), 6, 8, 2, 'a blue square');
    await writeImage(path.join(dir, 'c.webp'), 4, 4, 3, 'a star');
    await writeFile(path.join(dir, 'notes.md'), 'not an image');
    const { items, warnings } = await scan(dir, { repeats: 2 });
    expect(items.map((i) => [path.basename(i.path), i.caption, i.width, i.height, i.repeats])).toEqual([
      ['a.jpg', 'a blue square', 6, 8, 2],
      ['b.png', 'a red circle, outlined style', 8, 6, 2],
      ['c.webp', 'a star', 4, 4, 2],
    ]);
    expect(items[1]!.hash).toBe(createHash('sha256').update(await readFile(path.join(dir, 'b.png'))).digest('hex'));
    expect(warnings).toEqual([expect.stringMatching(/b\.txt has several lines; using the first/)]);
  });

  it('honours the caption extension and counts images without a caption', async () => {
    await writeImage(path.join(dir, 'a.png'), 4, 4, 1);
    await writeFile(path.join(dir, 'a.caption'), 'from caption file');
    await writeImage(path.join(dir, 'b.png'), 4, 4, 2, 'only a txt');
    const { items, warnings } = await scan(dir, { captionExtension: 'caption' });
    expect(items.map((i) => i.caption)).toEqual(['from caption file', '']);
    expect(warnings).toEqual([expect.stringMatching(/^1 of 2 images have no caption.*\.caption/)]);
  });

  it('reads diffusers metadata.jsonl captions (they win over .txt) and warns about unknown entries', async () => {
    await writeImage(path.join(dir, 'x.png'), 4, 4, 1, 'txt caption');
    await writeImage(path.join(dir, 'y.png'), 4, 4, 2);
    const rows = [{ file_name: 'x.png', text: 'jsonl caption' }, { file_name: './y.png', text: 'why' }, { file_name: 'gone.png', text: 'missing' }];
    await writeFile(path.join(dir, 'metadata.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
    const { items, warnings } = await scan(dir);
    expect(items.map((i) => i.caption)).toEqual(['jsonl caption', 'why']);
    expect(warnings).toEqual([expect.stringMatching(/metadata\.jsonl:3: gone\.png is not an image/)]);
  });

  it('takes a custom metadata file name, which must then exist', async () => {
    await writeImage(path.join(dir, 'x.png'), 4, 4, 1, 'txt caption');
    await writeFile(path.join(dir, 'captions.jsonl'), JSON.stringify({ file_name: 'x.png', caption: 'from captions.jsonl' }));
    expect((await scanDataset(dir, { captionExtension: '.txt', repeats: 1, metadata: 'captions.jsonl' }))[0]!.caption).toBe('from captions.jsonl');
    expect((await scan(dir)).items[0]!.caption).toBe('txt caption');
    await expect(scanDataset(dir, { captionExtension: '.txt', repeats: 1, metadata: 'meta.jsonl' })).rejects.toThrow(/metadata file meta\.jsonl not found/);
  });

  it('rejects a malformed metadata.jsonl naming the line', async () => {
    await writeImage(path.join(dir, 'x.png'), 4, 4);
    await writeFile(path.join(dir, 'metadata.jsonl'), '{"file_name": "x.png", "text": "ok"}\n{oops\n');
    await expect(scan(dir)).rejects.toThrow(/metadata\.jsonl:2: not valid JSON/);
  });

  it('supports kohya <repeats>_<name> subfolders', async () => {
    await writeImage(path.join(dir, 'top.png'), 4, 4, 0, 'top');
    await writeImage(path.join(dir, '10_dog', 'd1.png'), 4, 4, 1, 'dog one');
    await writeImage(path.join(dir, '10_dog', 'd2.png'), 4, 4, 2, 'dog two');
    await writeImage(path.join(dir, '2_cat', 'c1.png'), 4, 4, 3, 'cat');
    await writeImage(path.join(dir, '0_skip', 's.png'), 4, 4, 4, 'skip');
    await writeImage(path.join(dir, 'misc', 'm.png'), 4, 4, 5, 'misc');
    await writeImage(path.join(dir, '.cache', 'h.png'), 4, 4, 6, 'hidden');
    const { items, warnings } = await scan(dir, { repeats: 3 });
    expect(items.map((i) => [path.relative(dir, i.path), i.caption, i.repeats])).toEqual([
      ['top.png', 'top', 3],
      [path.join('10_dog', 'd1.png'), 'dog one', 10],
      [path.join('10_dog', 'd2.png'), 'dog two', 10],
      [path.join('2_cat', 'c1.png'), 'cat', 2],
    ]);
    expect(warnings).toHaveLength(2);
    expect(warnings.join('\n')).toMatch(/0_skip: 0 repeats/);
    expect(warnings.join('\n')).toMatch(/misc: not a kohya <repeats>_<name> folder/);
  });

  it('warns about and skips corrupt or truncated images', async () => {
    await writeImage(path.join(dir, 'good.png'), 16, 16, 1, 'good');
    await writeFile(path.join(dir, 'garbage.png'), 'this is not a png');
    const full = await sharp({ create: { width: 64, height: 64, channels: 3, background: '#000', noise: { type: 'gaussian', mean: 128, sigma: 40 } } }).png().toBuffer();
    await writeFile(path.join(dir, 'truncated.png'), full.subarray(0, full.length >> 1));
    await writeFile(path.join(dir, 'truncated.txt'), 'cut');
    const { items, warnings } = await scan(dir);
    expect(items.map((i) => path.basename(i.path))).toEqual(['good.png']);
    expect(warnings).toHaveLength(2);
    expect(warnings[0]).toContain(path.join(dir, 'garbage.png'));
    expect(warnings[1]).toContain(path.join(dir, 'truncated.png'));
  });

  it('fails before training when nothing is usable, naming the folder and what it looked for', async () => {
    await writeFile(path.join(dir, 'a.txt'), 'caption without image');
    const err = await scan(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SdtuneError);
    expect((err as SdtuneError).kind).toBe('usage');
    expect((err as Error).message).toContain(dir);
    expect((err as Error).message).toMatch(/\*\.png, \*\.jpg, \*\.jpeg, \*\.webp.*none found/);

    await writeFile(path.join(dir, 'bad.jpg'), 'nope');
    await expect(scan(dir)).rejects.toThrow(/all 1 found were unreadable/);
    await expect(scan(path.join(dir, 'missing'))).rejects.toThrow(/does not exist/);
  });

  it('applies EXIF orientation to the recorded size', async () => {
    await mkdir(dir, { recursive: true });
    const img = await sharp({ create: { width: 8, height: 4, channels: 3, background: '#808080' } }).withMetadata({ orientation: 6 }).jpeg().toBuffer();
    await writeFile(path.join(dir, 'rot.jpg'), img);
    const { items } = await scan(dir);
    expect([items[0]!.width, items[0]!.height]).toEqual([4, 8]);
  });

  it('skips symlinks that leave the dataset folder or loop back to it, with a warning; links inside are followed', async () => {
    const data = path.join(dir, 'data');
    const outside = path.join(dir, 'outside');
    await writeImage(path.join(data, 'a.png'), 4, 4, 1);
    await writeImage(path.join(data, 'b.png'), 4, 4, 2, 'b caption');
    await writeImage(path.join(outside, 'x.png'), 4, 4, 3, 'secret caption');
    await symlink(path.join(outside, 'x.txt'), path.join(data, 'a.txt')); // the caption would become a file from elsewhere
    await symlink(path.join(outside, 'x.png'), path.join(data, 'c.png'));
    await symlink('.', path.join(data, '1_loop')); // would count a.png and b.png again
    await symlink('..', path.join(data, '2_up'));
    await symlink(outside, path.join(data, '3_out'));
    await symlink('b.txt', path.join(data, 'd.txt')); // inside: followed
    await symlink('b.png', path.join(data, 'd.png'));
    await writeImage(path.join(data, '5_real', 'e.png'), 4, 4, 4, 'e caption');
    await symlink('5_real', path.join(data, '4_dup')); // inside, but the same images again
    const { items, warnings } = await scan(data);
    expect(items.map((i) => [path.basename(i.path), i.caption, i.repeats])).toEqual([
      ['a.png', '', 1],
      ['b.png', 'b caption', 1],
      ['d.png', 'b caption', 1],
      ['e.png', 'e caption', 5],
    ]);
    const w = warnings.join('\n');
    expect(w).toMatch(/ignoring subfolder \S*1_loop: a symlink to \S+, the dataset folder itself or one above it/);
    expect(w).toMatch(/ignoring subfolder \S*2_up: a symlink to \S+, the dataset folder itself or one above it/);
    expect(w).toMatch(/ignoring subfolder \S*3_out: a symlink to \S*outside, outside the dataset folder/);
    expect(w).toMatch(/skipping image \S*c\.png: a symlink to \S*x\.png, outside the dataset folder/);
    expect(w).toMatch(/ignoring caption \S*a\.txt: a symlink to \S*x\.txt, outside the dataset folder/);
    expect(w).toMatch(/ignoring subfolder \S*4_dup: a symlink to \S*5_real, which is scanned already \(its images would count twice\)/);
    expect(w).toMatch(/1 of 4 images have no caption/);
    expect(w).not.toContain('secret');
    expect(warnings).toHaveLength(7);
  });
});

describe('bundled datasets (scripts/make-datasets.ts output)', () => {
  const root = path.join(import.meta.dirname, '..', '..', 'datasets');
  it('shapes: 16 captioned images, square and both orientations', async () => {
    const { items, warnings } = await scan(path.join(root, 'shapes'));
    expect(warnings).toEqual([]);
    expect(items).toHaveLength(16);
    expect(items.every((i) => /^an? \w+ \w+, outlined style$|^\w+ stripes, outlined style$/.test(i.caption))).toBe(true);
    const sizes = new Set(items.map((i) => `${i.width}x${i.height}`));
    expect([...sizes].sort()).toEqual(['64x64', '64x96', '96x64']);
  });
  it('logo: 8 uncaptioned 64x64 images', async () => {
    const { items, warnings } = await scan(path.join(root, 'logo'));
    expect(items.map((i) => [i.width, i.height, i.caption])).toEqual(new Array(8).fill([64, 64, '']));
    expect(warnings).toEqual([expect.stringMatching(/^8 of 8 images have no caption/)]);
    // textual inversion fills them in from its templates: nothing to warn about
    expect((await scan(path.join(root, 'logo'), { uncaptioned: 'templates' })).warnings).toEqual([]);
  });
});
