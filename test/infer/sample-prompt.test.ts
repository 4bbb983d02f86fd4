// `sdtune sample` with A1111 prompt syntax: <lora:...> tags from --lora-dir (= --lora), <hypernet:...> refused until
// hypernetworks are wired, and the PNG parameters as A1111 writes them (the prompt as typed, Schedule type).
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { createHypernetwork, disposeHypernetwork, hypernetworkData, writeHypernetworkPt } from '../../src/adapters/hypernetwork.js';
import { mergeLora, readLora } from '../../src/adapters/lora.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { generate, toUint8 } from '../../src/infer/pipeline.js';
import { resolvePromptNetworks } from '../../src/infer/prompt-networks.js';
import { writeSafetensors } from '../../src/io/safetensors.js';
import { sampleToFiles } from '../../src/infer/sample.js';
import { parseInfotext, readImageRgb, readPngText } from '../../src/io/png.js';
import { samplerFromInfotext } from '../../src/schedulers/index.js';
import { describeGolden, golden } from '../golden.js';
import { maxAbsDiff } from '../helpers.js';

const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/sdtune.js');
const TINY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../checkpoints/tiny-sd-v1');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-sample-prompt-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const BASE = { seed: 4, steps: 2, cfg: 3, sampler: 'euler', width: 64, height: 64, quiet: true, negativePrompt: 'blurry' };

describe('resolvePromptNetworks', () => {
  const dir = path.join(tmp, 'nets');
  mkdirSync(path.join(dir, 'sub'), { recursive: true });
  for (const f of ['a.safetensors', 'a.pt', 'sub/b.ckpt', 'sub/c.safetensors', 'c.pt', 'h.pt', 'notes.txt']) writeFileSync(path.join(dir, f), '');

  it('finds files by stem in the folder and subfolders, safetensors first; clear errors otherwise', async () => {
    const r = await resolvePromptNetworks('x <lora:a:0.5> <lyco:b> <hypernet:h:0.3> <foo:bar> y', { loraDir: dir, hypernetworkDir: dir });
    expect(r.prompt).toBe('x     y');
    expect(r.loras.map((l) => [path.relative(dir, l.path), l.te, l.unet])).toEqual([['a.safetensors', 0.5, 0.5], [path.join('sub', 'b.ckpt'), 1, 1]]);
    expect(r.hypernetworks.map((h) => [path.relative(dir, h.path), h.strength])).toEqual([['h.pt', 0.3]]);
    expect(r.unknown).toEqual(['<foo:bar>']);
    // a name that is no stem: the ss_output_name alias in a safetensors file's metadata (A1111 "Alias from file")
    await writeSafetensors(path.join(dir, 'sub', 'file-v2.safetensors'), { x: { data: new Float32Array(1), shape: [1] } }, { metadata: { ss_output_name: 'MyStyle' } });
    const al = await resolvePromptNetworks('<lora:MyStyle:0.8>', { loraDir: dir });
    expect(al.loras.map((l) => [path.relative(dir, l.path), l.te])).toEqual([[path.join('sub', 'file-v2.safetensors'), 0.8]]);
    await expect(resolvePromptNetworks('<lora:zz:1>', { loraDir: dir })).rejects.toThrow(/<lora:zz:1>: no zz\.safetensors \/ zz\.pt \/ zz\.ckpt under loraDir .*, and no LoRA there has the alias/);
    await expect(resolvePromptNetworks('<lora:a:1>')).rejects.toThrow(/needs a LoRA folder \(loraDir, --lora-dir/);
    await expect(resolvePromptNetworks('<lora:c:1>', { loraDir: dir })).rejects.toThrow(/"c" names several files/);
    await expect(resolvePromptNetworks('<hypernet:h>')).rejects.toThrow(/--hypernetwork-dir/);
    expect(await resolvePromptNetworks('no tags [a:b:0.5]')).toEqual({ prompt: 'no tags [a:b:0.5]', loras: [], hypernetworks: [], unknown: [] });
  });
});

describe('sample: hypernetworks and the PNG text (bundled tiny model)', () => {
  it('<hypernet:NAME:M> from hypernetworkDir draws what --hypernetwork FILE:M draws, and the PNG names it', async () => {
    const dir = path.join(tmp, 'hn');
    mkdirSync(dir, { recursive: true });
    const file = path.join(dir, 'anime.pt');
    const net = createHypernetwork({ widths: [32], activation_func: 'relu', weight_initialization: 'XavierNormal', gen: new TorchGenerator(5) });
    await writeHypernetworkPt(file, await hypernetworkData(net));
    disposeHypernetwork(net);
    const [tag, flag, plain] = ['tag', 'flag', 'plain'].map((n) => path.join(tmp, `hn-${n}.png`));
    await sampleToFiles({ ...BASE, model: TINY, prompt: 'a cat <hypernet:anime:0.6>', hypernetworkDir: dir, out: tag });
    await sampleToFiles({ ...BASE, model: TINY, prompt: 'a cat', hypernetwork: [{ path: file, strength: 0.6 }], out: flag });
    await sampleToFiles({ ...BASE, model: TINY, prompt: 'a cat', out: plain });
    const px = async (f: string) => (await readImageRgb(f)).data;
    expect(maxAbsDiff(await px(tag), await px(flag))).toBe(0);
    expect(maxAbsDiff(await px(tag), await px(plain))).toBeGreaterThan(0);
    const t = (await readPngText(tag)).parameters;
    expect(t.split('\n')[0]).toBe('a cat <hypernet:anime:0.6>');
    expect(t).toContain('Hypernet: anime,');
    await expect(sampleToFiles({ ...BASE, model: TINY, prompt: 'a cat <hypernet:nothere:1>', hypernetworkDir: dir, out: path.join(tmp, 'hn-missing.png') })).rejects.toThrow(/nothere/);
  });

  it('writes the prompt as typed, "Schedule type" as A1111 >= 1.9, and parses back to the same sampler', async () => {
    const prompt = '[a cat:a dog:0.5], (red:1.2) [x|y] AND a tree :0.7';
    for (const [sampler, label, schedule] of [['dpmpp_2m_karras', 'DPM++ 2M', 'Karras'], ['euler_a', 'Euler a', 'Automatic']] as const) {
      const out = path.join(tmp, `png-${sampler}.png`);
      await sampleToFiles({ ...BASE, model: TINY, prompt, sampler, steps: 3, out });
      const text = (await readPngText(out)).parameters!;
      expect(text).toContain(`\nSteps: 3, Sampler: ${label}, Schedule type: ${schedule}, CFG scale: 3, Seed: 4, Size: 64x64, `);
      const p = parseInfotext(text);
      expect(p.prompt).toBe(prompt);
      expect([p.sampler, p.scheduleType]).toEqual([label, schedule]);
      expect(samplerFromInfotext(p.sampler, p.scheduleType)).toBe(sampler);
    }
    expect(samplerFromInfotext('DPM++ 2M Karras')).toBe('dpmpp_2m_karras'); // A1111 < 1.9: the schedule in the name
  });
});

describeGolden('sample: <lora:...> tags from --lora-dir (golden tiny-sd and its kohya LoRA)', () => {
  const loraDir = path.join(tmp, 'loras');
  mkdirSync(loraDir, { recursive: true });
  symlinkSync(golden('lora', 'tiny_lora_kohya.safetensors'), path.join(loraDir, 'tiny_lora_kohya.safetensors'));
  const model = golden('tiny-sd');

  it('<lora:name:0.5> is --lora file:0.5 (image bit for bit, Lora hashes by the tag name), also from the command line', async () => {
    const viaFlag = path.join(tmp, 'flag.png');
    await sampleToFiles({ ...BASE, model, prompt: 'a photo of a cat ', lora: [{ path: golden('lora', 'tiny_lora_kohya.safetensors'), weight: 0.5 }], out: viaFlag });
    const viaTag = path.join(tmp, 'tag.png');
    const prompt = 'a photo of a cat <lora:tiny_lora_kohya:0.5>';
    const r = spawnSync(process.execPath, [BIN, 'sample', '--model', model, '--prompt', prompt, '--negative-prompt', 'blurry', '--lora-dir', loraDir, '--seed', '4', '--steps', '2', '--cfg', '3', '--sampler', 'euler', '--width', '64', '--height', '64', '--out', viaTag], { encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
    expect(r.status, r.stderr).toBe(0);
    const [a, b] = await Promise.all([readImageRgb(viaFlag), readImageRgb(viaTag)]);
    expect(maxAbsDiff(a.data, b.data)).toBe(0);
    const none = await readImageRgb((await sampleToFiles({ ...BASE, model, prompt: 'a photo of a cat ', out: path.join(tmp, 'none.png') })).files[0]!);
    expect(maxAbsDiff(a.data, none.data)).toBeGreaterThan(0); // the LoRA does something at this size
    const flagText = parseInfotext((await readPngText(viaFlag)).parameters!);
    const tagText = parseInfotext((await readPngText(viaTag)).parameters!);
    expect(tagText.prompt).toBe(prompt);
    expect(tagText.loraHashes).toEqual({ tiny_lora_kohya: expect.stringMatching(/^[0-9a-f]{12}$/) });
    expect(Object.values(tagText.loraHashes!)).toEqual(Object.values(flagText.loraHashes!));
  });

  it('<lora:name:TE:UNET> merges the text-encoder and UNet parts with their own multipliers', async () => {
    const out = path.join(tmp, 'te-unet.png');
    await sampleToFiles({ ...BASE, model, prompt: 'a photo of a cat <lora:tiny_lora_kohya:1:0.25>', loraDir, out });
    // by hand: the same LoRA merged at te 1, unet 0.25, then generate() with the tag-free prompt
    const m = await loadModel(model);
    try {
      const lora = await readLora(golden('lora', 'tiny_lora_kohya.safetensors'), { unet: m.unet!.params, textEncoder: m.textEncoder!.params });
      const restore = mergeLora({ unet: m.unet!.params, textEncoder: m.textEncoder!.params }, lora, { textEncoder: 1, unet: 0.25 });
      const g = await generate(m, { ...BASE, sampler: 'euler', prompt: 'a photo of a cat ' });
      restore();
      const ours = await readImageRgb(out);
      expect(maxAbsDiff(ours.data, toUint8(g.images[0]!))).toBe(0);
      const same = await readImageRgb((await sampleToFiles({ ...BASE, model, prompt: 'a photo of a cat <lora:tiny_lora_kohya:1>', loraDir, out: path.join(tmp, 'te-unet-1.png') })).files[0]!);
      expect(maxAbsDiff(ours.data, same.data)).toBeGreaterThan(0);
    } finally {
      disposeModel(m);
    }
  });
});
