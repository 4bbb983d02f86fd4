// Ctrl-C during `sdtune textual-inversion` as a user presses it: in the middle of a long step (the CLI trains in a
// worker thread, so its main thread sees the signal at once and the worker stops at its next kernel), and twice.
// Assertions are on behaviour (exit code, files, which step was saved), never on wall-clock times.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin/sdtune.js');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-interrupt-cli-'));
const children: ChildProcess[] = [];
afterAll(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  rmSync(tmp, { recursive: true, force: true });
});
const env = { ...process.env, SDTUNE_BACKEND: 'wasm' };
const ti = (out: string, ...more: string[]) => [
  'textual-inversion', '--token', '<my-logo>', '--init-word', 'logo', '--data', 'datasets/logo', '--model', 'checkpoints/tiny-sd-v1',
  '--output', out, '--batch-size', '1', ...more,
];

/**
 * Run the CLI; `react(stderrSoFar, child)` sees stderr as it arrives. Resolves with the exit code and the output.
 */
function run(args: string[], react: (err: string, child: ChildProcess) => void, nodeArgs: string[] = []) {
  const child = spawn(process.execPath, [...nodeArgs, BIN, ...args], { cwd: ROOT, env });
  children.push(child);
  let err = '';
  let out = '';
  child.stdout!.on('data', (d) => (out += String(d)));
  child.stderr!.on('data', (d) => {
    err += String(d);
    react(err, child);
  });
  return new Promise<{ code: number | null; signal: string | null; err: string; out: string }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal, err, out })),
  );
}

/** Seconds per step from a progress line ("1.75 s/it" or "3.20 it/s"). */
function stepSeconds(line: string): number {
  const m = /([\d.]+) (s\/it|it\/s)/.exec(line)!;
  return m[2] === 's/it' ? Number(m[1]) : 1 / Number(m[1]);
}

describe('Ctrl-C during training', () => {
  it('inside a long step: exits 130 with the last completed step saved, the partial one discarded; --resume continues', async () => {
    // 256 px on the 64 px logo images: several seconds a step (and the warning about it)
    const out = path.join(tmp, 'long-step');
    let sent = false;
    const r = await run(ti(out, '--resolution', '256', '--max-steps', '20'), (err, child) => {
      const line = /textual_inversion \[.*\] 1\/20 .*/.exec(err)?.[0];
      if (line && !sent) {
        sent = true;
        // well inside step 2 (a fifth of a step's duration after step 1 ended), whatever the machine's speed
        setTimeout(() => child.kill('SIGINT'), Math.min(3000, 200 * stepSeconds(line)));
      }
    });
    expect(r.code, r.err).toBe(130);
    expect(r.err).toMatch(/warning: data\.resolution 256x256 is 4\.0x the images' size \(8 images, 64x64\).*--resolution 64/);
    expect(r.err).toMatch(/interrupt: stopping the current step and saving the last completed one \(Ctrl-C again to quit now\)/);
    // step 2 was running: it is discarded and step 1 is what the checkpoint holds
    expect(r.err).toMatch(/interrupted at step 1: checkpoint .*step-000001; continue with --resume .* \(step 2 was stopped part-way and discarded\)/);
    expect(readdirSync(path.join(out, 'checkpoints'))).toEqual(['step-000001']);
    expect(r.out.trim().split('\n')).toEqual([
      path.join(out, 'my-logo-step-000001.safetensors'),
      path.join(out, 'my-logo-step-000001.diffusers.safetensors'),
    ]);
    const again = spawnSync(process.execPath, [BIN, ...ti(out, '--resolution', '256', '--max-steps', '2', '--resume', out)], { cwd: ROOT, env, encoding: 'utf8' });
    expect(again.status, again.stderr).toBe(0);
    expect(again.stderr).toMatch(/resumed from .*step-000001 at step 1/);
    expect(again.stderr).toMatch(/done: 2 steps/);
  });

  it('a second Ctrl-C exits 130 at once, even while the worker cannot stop', async () => {
    // stands in for a worker that cannot leave its step (one kernel that runs for minutes): in the training worker,
    // the first read of the raised interrupt flag (workerData.interrupt) blocks for 5 minutes; were the second
    // Ctrl-C not to exit, the worker would then save and say 'interrupted at step'
    const stall = path.join(tmp, 'stall.mjs');
    writeFileSync(
      stall,
      `import { isMainThread, workerData } from 'node:worker_threads';
if (!isMainThread && workerData?.interrupt instanceof SharedArrayBuffer) {
  const load = Atomics.load;
  const block = new Int32Array(new SharedArrayBuffer(4));
  Atomics.load = (a, i) => {
    const v = load(a, i);
    if (v !== 0 && a.buffer === workerData.interrupt) Atomics.wait(block, 0, 0, 300000);
    return v;
  };
}
`,
    );
    const out = path.join(tmp, 'twice');
    let first = false;
    let second = false;
    const r = await run(
      ti(out, '--resolution', '64', '--max-steps', '20'),
      (err, child) => {
        if (!first && /textual_inversion \[.*\] 1\/20 /.test(err)) {
          first = true;
          child.kill('SIGINT');
        }
        if (first && !second && /Ctrl-C again to quit now/.test(err)) {
          second = true;
          child.kill('SIGINT');
        }
      },
      ['--import', pathToFileURL(stall).href],
    );
    expect(r.code, r.err).toBe(130);
    expect(second).toBe(true);
    // the worker never got to save: the process ended without it
    expect(r.err).not.toMatch(/interrupted at step/);
    expect(existsSync(path.join(out, 'checkpoints'))).toBe(false);
  });

  it('SIGTERM (docker stop, systemd, timeout) stops like Ctrl-C: the last finished step is saved, exit 143', async () => {
    const out = path.join(tmp, 'sigterm');
    let sent = false;
    const r = await run(ti(out, '--resolution', '64', '--max-steps', '20'), (err, child) => {
      if (!sent && /textual_inversion \[.*\] 1\/20 /.test(err)) {
        sent = true;
        child.kill('SIGTERM');
      }
    });
    expect(r.code, r.err).toBe(143);
    expect(r.err).toMatch(/SIGTERM: stopping the current step and saving the last completed one \(a second signal to quit now\)/);
    const saved = readdirSync(path.join(out, 'checkpoints'));
    expect(saved).toHaveLength(1);
    expect(r.err).toContain(`interrupted at step ${Number(saved[0].slice(5))}: checkpoint`);
  });

  it('after kill -9: the stale lock is taken over, a fresh run is refused, --resume removes the orphan temp files and finishes', async () => {
    const out = path.join(tmp, 'killed');
    const ck = path.join(out, 'checkpoints');
    const running = run(ti(out, '--max-steps', '400', '--save-every', '1'), () => {});
    const child = children[children.length - 1];
    const poll = setInterval(() => {
      if (existsSync(path.join(ck, 'step-000002')) && child.exitCode === null) child.kill('SIGKILL');
    }, 50);
    const r = await running.finally(() => clearInterval(poll));
    expect(r.signal).toBe('SIGKILL');
    expect(existsSync(path.join(out, '.sdtune.lock'))).toBe(true); // left behind by the killed process
    const orphan = path.join(ck, '.step-000999.12345.tmp');
    mkdirSync(orphan);
    const last = readdirSync(ck).filter((d) => /^step-\d+$/.test(d)).sort().pop()!;
    const step = Number(last.slice(5));
    // a fresh run without --resume is refused: the folder holds that run
    const fresh = spawnSync(process.execPath, [BIN, ...ti(out, '--max-steps', '2')], { cwd: ROOT, env, encoding: 'utf8' });
    expect(fresh.status).toBe(2);
    expect(fresh.stderr).toMatch(/holds an earlier run .*continue it with --resume/);
    // (the refused run took over the dead process' lock first, and let it go)
    expect(fresh.stderr).toMatch(/note: removing the stale lock of an earlier run that did not finish \(pid \d+/);
    expect(existsSync(path.join(out, '.sdtune.lock'))).toBe(false);
    const again = spawnSync(process.execPath, [BIN, ...ti(out, '--max-steps', String(step + 2), '--resume', out)], { cwd: ROOT, env, encoding: 'utf8' });
    expect(again.status, again.stderr).toBe(0);
    expect(again.stderr).toContain(`resumed from ${path.join(ck, last)} at step ${step}`);
    expect(again.stderr).toMatch(new RegExp(`done: ${step + 2} steps`));
    expect(existsSync(orphan)).toBe(false);
    expect(existsSync(path.join(out, '.sdtune.lock'))).toBe(false);
  });

  it('runs the same from the TypeScript sources through tsx (node --import tsx src/cli/main.ts)', () => {
    const out = path.join(tmp, 'tsx');
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...ti(out, '--max-steps', '1')], { cwd: ROOT, env, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/^backend: wasm/m);
    expect(r.stdout).toContain(path.join(out, 'my-logo.safetensors'));
  });
});
