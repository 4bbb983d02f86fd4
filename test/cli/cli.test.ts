// End-to-end: the sdtune command as a user runs it (a child process), on the golden tiny model.
import * as tf from '@tensorflow/tfjs';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { clipText } from '../../src/models/clip-text.js';
import { unet } from '../../src/models/unet.js';
import { vaeDecode } from '../../src/models/vae.js';
import { describeGolden, golden } from '../golden.js';
import { callPickle } from '../io/pickle-bytes.js';

const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/sdtune.js');
const TINY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../checkpoints/tiny-sd-v1');
const sdtune = (...args: string[]) => {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
  return { code: r.status, out: r.stdout, err: r.stderr };
};
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-cli-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('sdtune command line (no reference data needed)', () => {
  it('prints help and rejects an unknown command with exit code 2', () => {
    const h = sdtune('--help');
    expect(h.code).toBe(0);
    expect(h.out).toMatch(/inspect/);
    expect(h.out).toMatch(/convert/);
    const bad = sdtune('frobnicate');
    expect(bad.code).toBe(2);
  });

  it('declaring the commands (what --help needs) loads no tfjs: the library is imported when a command runs', () => {
    const script = [
      ...['train', 'sample', 'convert', 'inspect', 'toy-world', 'eval'].map((c) => `await import('./src/cli/commands/${c}.ts');`),
      "const { createRequire } = await import('node:module');",
      'const cache = Object.keys(createRequire(import.meta.url).cache);',
      "process.stdout.write(JSON.stringify(cache.filter((k) => k.includes('@tensorflow'))));",
    ].join('\n');
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: path.resolve(path.dirname(BIN), '..'), encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual([]);
  });

  it('a missing required flag is one line naming the command help', () => {
    const r = sdtune('sample', '--prompt', 'x');
    expect(r.code).toBe(2);
    expect(r.err).toBe('error: Missing required argument: model (see "sdtune sample --help")\n');
  });

  it('a missing model is one clear line, no stack trace', () => {
    const r = sdtune('inspect', path.join(tmp, 'nope'));
    expect(r.code).not.toBe(0);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toMatch(/^error: .*nope/);
    expect(r.err).not.toMatch(/at .*\.ts:\d+/);
  });

  it('a pickle checkpoint that calls code is refused in one line naming the call', () => {
    const ckpt = path.join(tmp, 'model.ckpt');
    writeFileSync(ckpt, callPickle('posix', 'system', 'echo hi'));
    const r = sdtune('inspect', ckpt);
    expect(r.code).toBe(6);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toMatch(/^error: refusing to load .*model\.ckpt: it calls posix\.system \(not a tensor\); .*\.safetensors/);
  });

  it('convert the bundled model to a single file; the file alone samples (its tokenizer travels in the metadata)', () => {
    const alone = mkdtempSync(path.join(tmp, 'alone-'));
    const single = path.join(alone, 'tiny.safetensors');
    const c = sdtune('convert', TINY, single);
    expect(c.code, c.err).toBe(0);
    expect(c.err).not.toMatch(/no tokenizer/);
    const s = sdtune('sample', '--model', single, '--prompt', 'a star', '--steps', '1', '--width', '64', '--height', '64', '--seed', '1', '--out', path.join(alone, 'x.png'));
    expect(s.code, s.err).toBe(0);
    expect(s.out.trim()).toBe(path.join(alone, 'x.png'));
  });
});

describeGolden('sdtune inspect / convert on the golden model', () => {
  it('inspect --json describes the diffusers folder', () => {
    const r = sdtune('inspect', golden('tiny-sd'), '--json');
    expect(r.code).toBe(0);
    const j = JSON.parse(r.out);
    expect(j.layout).toBe('diffusers');
    expect(j.variant).toBe('v1');
    expect(j.components.unet.config.block_out_channels).toEqual([32, 64, 64, 64]);
    expect(j.components.text_encoder.config.hidden_size).toBe(32);
    // parameter counts are the sums of the tensor sizes
    expect(j.components.vae.params).toBeGreaterThan(1e6);
    expect(Number.isInteger(j.components.unet.params)).toBe(true);
  });

  it('inspect of the single files: layout, dtype, inpaint variant; a single file without --config explains the heads problem', () => {
    const fp16 = JSON.parse(sdtune('inspect', golden('tiny-sd-fp16.safetensors'), '--json', '--config', golden('tiny-sd')).out);
    expect(fp16.layout).toBe('single-file');
    expect(fp16.dtype).toBe('float16');
    const inp = JSON.parse(sdtune('inspect', golden('tiny-sd-inpaint', 'unet'), '--json').out);
    expect(inp.variant).toBe('inpaint');
    expect(inp.components.unet.config.in_channels).toBe(9);
    const bare = sdtune('inspect', golden('tiny-sd.safetensors'));
    expect(bare.code).not.toBe(0);
    expect(bare.err).toMatch(/--config/);
    const text = sdtune('inspect', golden('tiny-sd'));
    expect(text.out).toMatch(/layout:\s+diffusers/);
  });

  it('convert diffusers -> single file -> diffusers gives bit-identical outputs in fp32', async () => {
    const single = path.join(tmp, 'tiny.safetensors');
    const back = path.join(tmp, 'tiny-back');
    expect(sdtune('convert', golden('tiny-sd'), single).code).toBe(0);
    expect(sdtune('convert', single, back, '--to', 'diffusers').code).toBe(0);
    const again = sdtune('convert', golden('tiny-sd'), single);
    expect(again.code).not.toBe(0); // never overwrites
    const outputs = async (p: string) => {
      const m = await loadModel(p, { tokenizerDir: golden('tiny-sd', 'tokenizer') });
      try {
        return tf.tidy(() => {
          const ids = tf.tensor2d([[49406, 320, 1125, 539, 49407, ...new Array(72).fill(49407)]], [1, 77], 'int32');
          const te = clipText(m.textEncoder!.params, m.textEncoder!.config, ids).hidden;
          const x = tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 5) as tf.Tensor4D;
          const eps = unet(m.unet!.params, m.unet!.config, x, 321, te);
          const img = vaeDecode(m.vae!.params, m.vae!.config, x);
          return [te.dataSync(), eps.dataSync(), img.dataSync()].map((a) => Array.from(a));
        });
      } finally {
        disposeModel(m);
      }
    };
    const ref = await outputs(golden('tiny-sd'));
    expect(await outputs(single)).toEqual(ref); // our single file embeds its configs: no --config needed
    expect(await outputs(back)).toEqual(ref);
    const half = path.join(tmp, 'tiny-half.safetensors');
    expect(sdtune('convert', golden('tiny-sd'), half, '--half').code).toBe(0);
    expect(JSON.parse(sdtune('inspect', half, '--json').out).dtype).toBe('float16');
  });
});
