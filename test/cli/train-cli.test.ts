// `sdtune lora` / `sdtune textual-inversion` as a user runs them, then `sdtune sample` on their outputs.
import { spawn, spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin/sdtune.js');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-train-cli-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const sdtune = (...args: string[]) => {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

describe('training commands', () => {
  it('finetune --config configs/finetune.yaml (shortened) then sample --model on both exports', () => {
    const out = path.join(tmp, 'finetune');
    const r = sdtune('finetune', '--config', 'configs/finetune.yaml', '--max-steps', '2', '--output', out, '--set', 'output.save_every=null', '--set', 'train.lr_warmup_steps=0');
    expect(r.code, r.err).toBe(0);
    expect(r.out.trim().split('\n')).toEqual([path.join(out, 'finetune'), path.join(out, 'finetune.safetensors')]);
    for (const model of [path.join(out, 'finetune'), path.join(out, 'finetune.safetensors')]) {
      const png = path.join(tmp, `${path.basename(model)}.png`);
      const s = sdtune('sample', '--model', model, '--prompt', 'a red circle, outlined style', '--steps', '2', '--seed', '1', '--out', png);
      expect(s.code, s.err).toBe(0);
      expect(existsSync(png)).toBe(true);
    }
    // the run folder now holds that run: a fresh one is refused
    const again = sdtune('finetune', '--config', 'configs/finetune.yaml', '--max-steps', '1', '--output', out, '--set', 'train.lr_warmup_steps=0');
    expect(again.code).toBe(2);
    expect(again.err).toContain(`${out} holds an earlier run (config.resolved.yaml, 1 checkpoint, finetune/, finetune.safetensors)`);
  });

  it('lora --config configs/style.yaml (shortened) then sample --lora', () => {
    const out = path.join(tmp, 'style');
    const r = sdtune('lora', '--config', 'configs/style.yaml', '--max-steps', '3', '--output', out, '--set', 'output.sample_every=null', '--set', 'output.save_every=null', '--set', 'train.lr_warmup_steps=0');
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/backend: wasm/);
    expect(r.err).toMatch(/trainable parameters: [\d,]+/);
    expect(r.err).toMatch(/16 images x repeats = 16 samples \/ batch 2/);
    const lora = path.join(out, 'style.safetensors');
    expect(existsSync(lora)).toBe(true);
    expect(existsSync(path.join(out, 'config.resolved.yaml'))).toBe(true);
    const s = sdtune('sample', '--model', 'checkpoints/toy-sd', '--prompt', 'a red circle, outlined style', '--lora', `${lora}:0.7`, '--steps', '3', '--seed', '1', '--out', path.join(tmp, 'lora.png'));
    expect(s.code, s.err).toBe(0);
    expect(existsSync(path.join(tmp, 'lora.png'))).toBe(true);
  });

  it('textual-inversion with flags only, then sample --embedding', () => {
    const out = path.join(tmp, 'logo');
    const r = sdtune('textual-inversion', '--token', '<my-logo>', '--init-word', 'logo', '--data', 'datasets/logo', '--model', 'checkpoints/tiny-sd-v1', '--resolution', '64', '--max-steps', '2', '--output', out);
    expect(r.code, r.err).toBe(0);
    expect(r.err).not.toMatch(/no caption/); // the uncaptioned logo images train on the templates
    // named after the token, as A1111 loads embeddings by file name; the diffusers form beside it
    expect(readdirSync(out).filter((f) => f.endsWith('.safetensors')).sort()).toEqual(['my-logo.diffusers.safetensors', 'my-logo.safetensors']);
    const emb = path.join(out, 'my-logo.safetensors');
    const s = sdtune('sample', '--model', 'checkpoints/tiny-sd-v1', '--prompt', 'a photo of my-logo', '--embedding', emb, '--steps', '3', '--seed', '1', '--out', path.join(tmp, 'ti.png'));
    expect(s.code, s.err).toBe(0);
    expect(s.err).toMatch(/^embeddings used: my-logo \(1 vector\)$/m);
  });

  it('Ctrl-C saves a checkpoint and the adapter, and --resume continues from it', async () => {
    const out = path.join(tmp, 'sigint');
    // 20 steps log every step off a TTY: Ctrl-C as soon as the first one is done (a fixed delay fails on a busy
    // machine, where the first step can take longer than it)
    const child = spawn(process.execPath, [BIN, 'lora', '--config', 'configs/style.yaml', '--max-steps', '20', '--output', out, '--set', 'output.sample_every=null', '--set', 'train.lr_scheduler=constant', '--set', 'train.lr_warmup_steps=0'], {
      cwd: ROOT,
      env: { ...process.env, SDTUNE_BACKEND: 'wasm' },
    });
    let err = '';
    let scheduled = false;
    const code = await new Promise<number | null>((resolve) => {
      child.stderr.on('data', (d) => {
        err += String(d);
        if (/\] [1-9]\d*\/20 /.test(err) && !scheduled) {
          scheduled = true; // one Ctrl-C: a second one quits at once
          child.kill('SIGINT');
        }
      });
      child.on('exit', (c) => resolve(c));
    });
    expect(code, err).toBe(130);
    expect(err).toMatch(/interrupted at step (\d+): checkpoint .*step-0+\d+/);
    const step = Number(/interrupted at step (\d+)/.exec(err)![1]);
    expect(readdirSync(path.join(out, 'checkpoints'))).toEqual([`step-${String(step).padStart(6, '0')}`]);
    expect(existsSync(path.join(out, `style-step-${String(step).padStart(6, '0')}.safetensors`))).toBe(true);
    const r = sdtune('lora', '--config', 'configs/style.yaml', '--max-steps', String(step + 1), '--output', out, '--resume', out, '--set', 'output.sample_every=null', '--set', 'train.lr_scheduler=constant', '--set', 'train.lr_warmup_steps=0');
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(new RegExp(`resumed from .* at step ${step}`));
  });

  it('config errors are one clear line naming the key', () => {
    const cfg = path.join(tmp, 'bad.yaml');
    writeFileSync(cfg, 'model:\n  path: checkpoints/tiny-sd-v1\ndata:\n  dir: datasets/shapes\ntrain:\n  learning_rate: 1e-4\n');
    const r = sdtune('lora', '--config', cfg);
    expect(r.code).toBe(2);
    expect(r.err).toMatch(/error: .*train\.learning_rate.*did you mean train\.lr\?/);
    const empty = path.join(tmp, 'empty');
    const e = sdtune('lora', '--model', 'checkpoints/tiny-sd-v1', '--data', empty, '--max-steps', '1', '--output', path.join(tmp, 'x'));
    expect(e.code).not.toBe(0);
    expect(e.err.trim().split('\n').at(-1)).toMatch(/^error: .*empty/);
  });
});
