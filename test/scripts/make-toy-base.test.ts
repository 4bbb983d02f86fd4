// scripts/make-toy-base.ts end to end at tiny step counts: from nothing to a loadable toy-world model folder with a
// model card, eval.json and a contact sheet. The accuracy of such a short run is ~0, so this checks structure,
// counts and what the parts wrote (the held-out concepts, the scaling factor), not accuracy.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { disposeModel, loadModel } from '../../src/io/model.js';
import { assertToyModel } from '../../src/eval/evaluate.js';
import { TOY_BASE_MAX_BYTES, makeToyBase } from '../../scripts/make-toy-base.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-toy-base-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const labels = (dir: string) => readFileSync(path.join(dir, 'labels.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { caption: string; colour: string; shape: string });

describe('make-toy-base', () => {
  it('builds a loadable toy-world model folder with a model card and the eval table by CFG', async () => {
    const out = path.join(tmp, 'toy-sd');
    const work = path.join(tmp, 'work');
    const lines: string[] = [];
    const r = await makeToyBase({
      out, work, vaeSteps: 2, unetSteps: 3, vaeBatch: 4, unetBatch: 4, vaeImages: 40, unetImages: 24, scalingImages: 8, warmup: 100,
      evalSeeds: 1, evalSteps: 2, cfgs: [1, 3], quiet: true, log: (l) => lines.push(l),
    });
    expect(r.out).toBe(out);
    expect(r.steps).toEqual({ vae: 2, unet: 3 });
    expect(r.losses.vae).toHaveLength(2);
    expect(r.losses.unet).toHaveLength(3);
    expect([...r.losses.vae, ...r.losses.unet].every(Number.isFinite)).toBe(true);
    expect(r.params).toEqual({ vae: 954_567, text_encoder: 104_768, unet: 1_489_028 });
    // each part is timed and reported
    for (const k of ['world', 'vae', 'unet', 'eval', 'total'] as const) expect(r.seconds[k]).toBeGreaterThan(0);
    expect(lines.filter((l) => l.startsWith('[make-toy-base]')).map((l) => l.split(':')[0])).toEqual([
      '[make-toy-base] random model (vae 954,567, text_encoder 104,768, unet 1,489,028 params) and worlds (40 superset images for the VAE, 24 base images for the UNet)',
      '[make-toy-base] VAE',
      '[make-toy-base] UNet',
      '[make-toy-base] eval cfg 1',
      '[make-toy-base] eval cfg 3',
      `[make-toy-base] wrote ${out} (${(r.bytes / 1024 ** 2).toFixed(2)} MB)`,
    ]);

    // the worlds: the VAE's has the held-out concepts, the UNet's none of them (nor "sks")
    const vaeWorld = labels(path.join(work, 'world-vae'));
    const base = labels(path.join(work, 'world-base'));
    expect(vaeWorld).toHaveLength(40);
    expect(base).toHaveLength(24);
    expect(vaeWorld.some((l) => l.colour === 'purple') && vaeWorld.some((l) => l.shape === 'heart')).toBe(true);
    expect(base.some((l) => l.colour === 'purple' || l.shape === 'heart' || /purple|heart|sks/.test(l.caption))).toBe(false);
    // the UNet run: the settings of toyworld.md
    const resolved = readFileSync(path.join(work, 'unet-run', 'config.resolved.yaml'), 'utf8');
    // (warmup capped at the 3 steps, so no steps are left for the decay)
    for (const s of ['caption_dropout: 0.1', 'lr: 0.001', 'lr_scheduler: warmup_stable_decay', 'lr_warmup_steps: 3', 'lr_decay_steps: 0', 'max_grad_norm: 1', 'batch_size: 4']) expect(resolved).toContain(s);

    // the folder: a fp16 diffusers model the judges accept, with the measured scaling factor
    for (const f of ['model_index.json', 'unet/config.json', 'vae/config.json', 'text_encoder/config.json', 'tokenizer/vocab.json', 'scheduler/scheduler_config.json', 'README.md', 'eval.json', 'contact-sheet.png']) {
      expect(existsSync(path.join(out, f)), f).toBe(true);
    }
    expect(r.bytes).toBeLessThanOrEqual(TOY_BASE_MAX_BYTES);
    expect(r.bytes).toBeGreaterThan(2 * 2_548_363); // fp16 weights
    const m = await loadModel(out);
    try {
      assertToyModel(m);
      expect(m.vae!.config.scaling_factor).toBe(r.scalingFactor);
      expect(r.scalingFactor).not.toBe(1); // measured, not the random model's
      expect(m.tokenizer!.maxLength).toBe(12);
    } finally {
      disposeModel(m);
    }
    expect(existsSync(`${out}.tmp-${process.pid}`)).toBe(false);

    // the eval table: 16 prompts x 1 seed at each CFG
    expect(r.evals.map((e) => [e.cfg, e.total])).toEqual([[1, 16], [3, 16]]);
    const ev = JSON.parse(readFileSync(path.join(out, 'eval.json'), 'utf8'));
    expect(ev.cfgs).toEqual(r.evals);
    const card = readFileSync(path.join(out, 'README.md'), 'utf8');
    for (const e of r.evals) expect(card).toContain(`| ${e.cfg} | ${e.correct}/16 | **${(100 * e.accuracy).toFixed(1)}%** |`);
    expect(card).toContain('| VAE (`method: vae`) |');
    expect(card).toMatch(/\| UNet \(`method: finetune`, from random init\) \| .* \| 3 \| /);
    expect(card).toContain('purple');
    expect(card).toContain('npm run make-toy-base -- --vae-steps 2 --unet-steps 3 --unet-decay-steps 400 --vae-batch 4 --unet-batch 4 --vae-images 40 --unet-images 24');
    expect(card.match(/^a (red|green|blue|yellow) (circle|square|triangle|star) /gm)).toHaveLength(16); // the per-prompt table

    // a second run refuses the non-empty folder without --overwrite
    await expect(makeToyBase({ out, work, vaeSteps: 1, unetSteps: 1, quiet: true, log: () => {} })).rejects.toThrow(`make-toy-base: ${out} is not empty; pass --overwrite to replace it`);

    // the same --work folder continues a build: the worlds and the finished VAE are reused (with their time), the UNet
    // resumes from its last checkpoint (here: done), so the same weights come out
    const again: string[] = [];
    const r2 = await makeToyBase({
      out, work, overwrite: true, vaeSteps: 2, unetSteps: 3, vaeBatch: 4, unetBatch: 4, vaeImages: 40, unetImages: 24, scalingImages: 8, warmup: 100,
      evalSeeds: 1, evalSteps: 2, cfgs: [1], quiet: true, log: (l) => again.push(l),
    });
    expect(again).toContain(`[make-toy-base] reusing the worlds in ${work}`);
    expect(again).toContain(`[make-toy-base] reusing the trained VAE in ${path.join(work, 'vae-run', 'model')}`);
    expect(again.some((l) => /^resumed from .*step-000003 at step 3$/.test(l))).toBe(true);
    expect(r2.seconds.vae).toBe(r.seconds.vae);
    expect(r2.seconds.world).toBeCloseTo(r.seconds.world, 6);
    expect(r2.scalingFactor).toBe(r.scalingFactor);
    expect(r2.evals[0]).toEqual(r.evals[0]);
  });

  it('the command line: --help lists the options and defaults; a bad value is one error line', () => {
    const run = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', path.join(ROOT, 'scripts/make-toy-base.ts'), ...args], { encoding: 'utf8', cwd: ROOT });
    const help = run('--help');
    expect(help.status).toBe(0);
    expect(help.stdout).toContain('--vae-steps N');
    expect(help.stdout).toContain('--unet-decay-steps N');
    expect(help.stdout).toContain('"vaeSteps":400,"unetSteps":1800,"unetDecaySteps":400');
    const bad = run('--vae-steps', 'many', '--out', path.join(tmp, 'never'));
    expect(bad.status).toBe(1);
    expect(bad.stderr.trim()).toBe('error: --vae-steps: expected a non-negative integer, got "many"');
    expect(existsSync(path.join(tmp, 'never'))).toBe(false);
  });
});
