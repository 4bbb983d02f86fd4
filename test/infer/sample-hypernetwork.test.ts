// `sdtune sample --hypernetwork FILE[:STRENGTH]` on the bundled tiny model: the image changes with the strength
// (strength 0 is exactly the plain model), A1111's PNG keys, the .pt / several-networks refusals, and the CLI.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHypernetwork, disposeHypernetwork, hypernetworkData, readHypernetwork, writeHypernetworkPt, writeHypernetworkSafetensors } from '../../src/adapters/hypernetwork.js';
import { sampleToFiles } from '../../src/infer/sample.js';
import { legacyModelHash } from '../../src/io/hashes.js';
import { parseInfotext, readImageRgb, readPngText } from '../../src/io/png.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { maxAbsDiff } from '../helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TINY = path.join(ROOT, 'checkpoints/tiny-sd-v1');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-hn-sample-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const BASE = { model: TINY, prompt: 'a red circle', seed: 3, steps: 2, cfg: 2, sampler: 'euler', width: 64, height: 64, quiet: true };

describe('sample with a hypernetwork (bundled tiny model)', () => {
  const file = path.join(tmp, 'my-hn.safetensors');
  beforeAll(async () => {
    // the tiny model's context width is 32 (as are its outer blocks): XavierNormal so that the effect is visible
    const net = createHypernetwork({ widths: [32], activation_func: 'relu', weight_initialization: 'XavierNormal', gen: new TorchGenerator(9) });
    await writeHypernetworkSafetensors(file, await hypernetworkData(net));
    disposeHypernetwork(net);
  });
  const image = async (f: string) => (await readImageRgb(f)).data;

  it('strength 0 = the plain model exactly; 0.5 and 1 change the image; A1111 "Hypernet" keys in the PNG', async () => {
    const [plain, zero, half, one] = ['plain', 'zero', 'half', 'one'].map((n) => path.join(tmp, `${n}.png`));
    await sampleToFiles({ ...BASE, out: plain });
    await sampleToFiles({ ...BASE, hypernetwork: [{ path: file, strength: 0 }], out: zero });
    await sampleToFiles({ ...BASE, hypernetwork: [{ path: file, strength: 0.5 }], out: half });
    await sampleToFiles({ ...BASE, hypernetwork: [{ path: file, strength: 1 }], out: one });
    expect(maxAbsDiff(await image(zero), await image(plain))).toBe(0);
    expect(maxAbsDiff(await image(half), await image(plain))).toBeGreaterThan(2);
    expect(maxAbsDiff(await image(one), await image(half))).toBeGreaterThan(2);
    const hash = await legacyModelHash(file);
    expect(hash).toMatch(/^[0-9a-f]{8}$/);
    const t = (await readPngText(half)).parameters;
    expect(t).toContain(`Model: tiny-sd-v1, Hypernet: my-hn, Hypernet hash: ${hash}, Hypernet strength: 0.5,`);
    expect(parseInfotext(t).hypernet).toEqual({ name: 'my-hn', hash, strength: 0.5 });
    expect((await readPngText(one)).parameters).toContain('Hypernet strength: 1.0');
    expect((await readPngText(plain)).parameters).not.toContain('Hypernet');
  });

  it('an A1111 .pt of the same hypernetwork draws the same image; several hypernetworks are refused', async () => {
    const pt = path.join(tmp, 'my-hn.pt');
    const net = await readHypernetwork(file);
    await writeHypernetworkPt(pt, await hypernetworkData(net));
    disposeHypernetwork(net);
    const [a, b] = [path.join(tmp, 'st.png'), path.join(tmp, 'pt.png')];
    await sampleToFiles({ ...BASE, hypernetwork: [{ path: file, strength: 0.7 }], out: a });
    await sampleToFiles({ ...BASE, hypernetwork: [{ path: pt, strength: 0.7 }], out: b });
    expect(maxAbsDiff(await image(a), await image(b))).toBe(0);
    expect((await readPngText(b)).parameters).toContain('Hypernet: my-hn,');
    await expect(sampleToFiles({ ...BASE, hypernetwork: [{ path: path.join(tmp, 'missing.pt'), strength: 1 }], out: path.join(tmp, 'missing.png') })).rejects.toThrow(/missing\.pt/);
    await expect(sampleToFiles({ ...BASE, hypernetwork: [{ path: file, strength: 1 }, { path: file, strength: 0.5 }], out: path.join(tmp, 'two.png') })).rejects.toThrow(/2 hypernetworks given/);
  });

  it('warns when no attention of the model has the hypernetwork\'s widths', async () => {
    const other = path.join(tmp, 'wide.safetensors');
    const net = createHypernetwork({ widths: [768], gen: new TorchGenerator(1) });
    await writeHypernetworkSafetensors(other, await hypernetworkData(net));
    disposeHypernetwork(net);
    const lines: string[] = [];
    await sampleToFiles({ ...BASE, steps: 1, hypernetwork: [{ path: other, strength: 1 }], out: path.join(tmp, 'wide.png'), log: (l) => lines.push(l) });
    expect(lines).toEqual([expect.stringMatching(/^warning: hypernetwork .*wide\.safetensors has modules for context widths 768, but this model's attentions read widths 32, 64: it changes nothing$/)]);
  });

  it('the command line: --hypernetwork FILE:STRENGTH', () => {
    const out = path.join(tmp, 'cli.png');
    const r = spawnSync(process.execPath, [path.join(ROOT, 'bin/sdtune.js'), 'sample', '--model', TINY, '--prompt', 'a red circle', '--steps', '1', '--seed', '1', '--width', '64', '--height', '64', '--hypernetwork', `${file}:0.8`, '--out', out, '--backend', 'wasm'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(out);
    return readPngText(out).then((t) => expect(t.parameters).toContain('Hypernet: my-hn, Hypernet hash: '));
  });
});
