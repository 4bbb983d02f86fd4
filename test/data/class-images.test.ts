import { readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { balanceRegItems, listImages, missingIndices, prepareClassImages } from '../../src/data/class-images.js';
import type { DataItem } from '../../src/data/dataset.js';
import { type LoadedModel, disposeModel, loadModel } from '../../src/io/model.js';
import { MODEL } from '../train/tiny.js';
import { tempDir, writeImage } from './fixtures.js';

const item = (name: string, repeats = 1): DataItem => ({ path: name, caption: '', width: 64, height: 64, repeats, hash: name });

describe('missingIndices', () => {
  it('fills the smallest free indices, counting any image as found', () => {
    expect(missingIndices([], 3)).toEqual([0, 1, 2]);
    expect(missingIndices([`0-${'a'.repeat(40)}.png`, `2-${'b'.repeat(40)}.png`], 4)).toEqual([1, 3]);
    // a user's own image counts as found but claims no index
    expect(missingIndices(['my-dog.jpg', `1-${'c'.repeat(40)}.png`], 4)).toEqual([0, 2]);
    expect(missingIndices(['a.png', 'b.png', 'c.png'], 2)).toEqual([]);
  });
});

describe('balanceRegItems (kohya)', () => {
  it('raises the repeats of fewer reg images round robin until they match the training count', () => {
    const train = [item('t1', 5), item('t2', 5)]; // 10 with repeats
    const reg = balanceRegItems(train, [item('r1'), item('r2'), item('r3')]);
    expect(reg.map((r) => r.repeats)).toEqual([4, 3, 3]);
    expect(reg.reduce((a, r) => a + r.repeats, 0)).toBe(10);
  });
  it('takes only as many of more reg images as the training count needs, repeats included', () => {
    const reg = balanceRegItems([item('t', 3)], [item('r1', 2), item('r2', 2), item('r3', 2)]);
    expect(reg.map((r) => [r.path, r.repeats])).toEqual([['r1', 2], ['r2', 2]]);
  });
  it('no reg images: none', () => expect(balanceRegItems([item('t')], [])).toEqual([]));
});

describe('prepareClassImages on the bundled tiny model', () => {
  let model: LoadedModel;
  let tmp: Awaited<ReturnType<typeof tempDir>>;
  const lines: string[] = [];
  const opts = (dir: string, extra: Partial<Parameters<typeof prepareClassImages>[1]> = {}) => ({
    dir, prompt: 'a photo of dog', count: 3, batchSize: 2, steps: 2, cfg: 3, seed: 11, width: 64, height: 64, quiet: true,
    log: (l: string) => lines.push(l), ...extra,
  });
  beforeAll(async () => {
    model = await loadModel(MODEL);
    tmp = await tempDir();
  });
  afterAll(async () => {
    disposeModel(model);
    await tmp.cleanup();
  });

  it('generates the missing images once, names them <index>-<sha1>.png, reuses them and says the counts', async () => {
    const dir = path.join(tmp.dir, 'class');
    const r = await prepareClassImages(model, opts(dir));
    expect(r).toMatchObject({ found: 0, generated: 3, complete: true });
    expect(r.files.map((f) => path.basename(f))).toEqual([expect.stringMatching(/^0-[0-9a-f]{40}\.png$/), expect.stringMatching(/^1-/), expect.stringMatching(/^2-/)]);
    expect(lines.at(-1)).toBe(`class images: 0 found in ${dir}, generating 3 (prompt "a photo of dog"), using 3`);
    const again = await prepareClassImages(model, opts(dir));
    expect(again).toMatchObject({ found: 3, generated: 0, files: r.files });
    expect(lines.at(-1)).toBe(`class images: 3 found in ${dir}, none to generate (prompt "a photo of dog"), using 3`);
    // images differ from each other (seed + index), and the PNG records the prompt and seed
    const bytes = await Promise.all(r.files.map((f) => readFile(f)));
    expect(new Set(bytes.map((b) => b.toString('base64'))).size).toBe(3);
    expect(bytes[1].includes(Buffer.from('Seed: 12'))).toBe(true);

    // a deleted image is regenerated identically (same index, same seed): a killed run resumes without duplicates
    await rm(r.files[1]);
    const fixed = await prepareClassImages(model, opts(dir));
    expect(fixed).toMatchObject({ found: 2, generated: 1, files: r.files });
    expect((await readFile(r.files[1])).equals(bytes[1])).toBe(true);
    // more images than asked for: the first `count` by name
    const fewer = await prepareClassImages(model, opts(dir, { count: 2 }));
    expect(fewer.files).toEqual(r.files.slice(0, 2));
    expect(lines.at(-1)).toMatch(/3 found .* using 2 \(the first 2 by name\)$/);
  });

  it('a stop request between batches leaves whole images; the next call completes the same set', async () => {
    const dir = path.join(tmp.dir, 'stopped');
    let calls = 0;
    const part = await prepareClassImages(model, opts(dir, { stopRequested: () => calls++ > 0 }));
    // a write cut short by a kill leaves only its temp file: not an image, and removed by the next call
    const orphan = path.join(dir, `.2-${'e'.repeat(40)}.png.99999999.0123456789ab.tmp`);
    await writeFile(orphan, 'partial');
    expect(part).toMatchObject({ generated: 2, complete: false });
    expect(await listImages(dir)).toHaveLength(2);
    const rest = await prepareClassImages(model, opts(dir));
    expect(rest).toMatchObject({ found: 2, generated: 1, complete: true });
    await expect(readFile(orphan)).rejects.toThrow(/ENOENT/);
    const uninterrupted = await listImages(path.join(tmp.dir, 'class'));
    expect(rest.files.map((f) => path.basename(f))).toEqual(uninterrupted.map((f) => path.basename(f)));
  });

  it('refuses class images smaller than the training size, and a folder that cannot be created, before generating', async () => {
    const dir = path.join(tmp.dir, 'small');
    await writeImage(path.join(dir, 'tiny.png'), 32, 32);
    await expect(prepareClassImages(model, opts(dir))).rejects.toThrow(`class image ${path.join(dir, 'tiny.png')} is 32x32, smaller than the training size 64x64`);
    const file = path.join(tmp.dir, 'a-file');
    await writeFile(file, 'x');
    await expect(prepareClassImages(model, opts(path.join(file, 'class')))).rejects.toThrow(/cannot (create|read) the class image folder .*a-file\/class: (ENOTDIR|EEXIST)/);
    await expect(prepareClassImages(model, opts(dir, { prompt: ' ' }))).rejects.toThrow('class images need a class prompt');
  });
});
