/**
 * What keeps a training run from destroying work: a lock so two runs never share an output folder, a refusal to
 * start a fresh run over an earlier one, and a health check of the trainables before anything is saved (a finite
 * loss does not mean finite weights: one step with a huge learning rate sends them to 1e29 while the loss of that
 * step, computed before the update, is still fine).
 */
import * as tf from '@tensorflow/tfjs';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { open, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { SdtuneError, usageError } from '../errors.js';

const LOCK = '.sdtune.lock';

/** A held output-folder lock. */
export interface RunLock {
  readonly file: string;
  release(): void;
}

interface LockBody {
  pid: number;
  host: string;
  started: string;
  command: string;
}

/** Whether process `pid` is alive on this machine (EPERM: alive, owned by someone else). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Take `<dir>/.sdtune.lock` (created exclusively). A second run into the same folder fails at once, naming the
 * holder; a lock left by a killed process (its pid gone, same host) is taken over with a note. The lock is removed
 * by `release()` and, as a last resort, when the process exits.
 */
export async function acquireRunLock(dir: string, log: (line: string) => void = () => {}): Promise<RunLock> {
  const file = path.join(dir, LOCK);
  const body: LockBody = { pid: process.pid, host: os.hostname(), started: new Date().toISOString(), command: process.argv.slice(2).join(' ') };
  for (let attempt = 0; ; attempt++) {
    try {
      const fh = await open(file, 'wx');
      await fh.writeFile(JSON.stringify(body));
      await fh.close();
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) throw e;
    }
    let held: Partial<LockBody> = {};
    try {
      held = JSON.parse(await readFile(file, 'utf8')) as LockBody;
    } catch {
      /* unreadable or half-written: judged by its pid below, which is then missing */
    }
    const sameHost = held.host === undefined || held.host === os.hostname();
    if (typeof held.pid === 'number' && (alive(held.pid) || !sameHost)) {
      throw usageError(
        `${dir} is in use by another sdtune run (pid ${held.pid}${sameHost ? '' : ` on ${held.host}`}, started ${held.started ?? '?'}: ` +
          `${held.command ?? ''}); wait for it to finish or choose another output folder (if that run is gone, delete ${file})`,
      );
    }
    log(`note: removing the stale lock of an earlier run that did not finish (pid ${held.pid ?? '?'}, started ${held.started ?? '?'})`);
    await rm(file, { force: true });
  }
  const onExit = () => release();
  let released = false;
  const release = () => {
    if (released) return;
    released = true;
    process.off('exit', onExit);
    try {
      const now = JSON.parse(readFileSync(file, 'utf8')) as LockBody;
      if (now.pid === process.pid) rmSync(file, { force: true });
    } catch {
      /* already gone */
    }
  };
  process.on('exit', onExit);
  return { file, release };
}

/** What an output folder holds of an earlier run (empty when nothing). */
export function earlierRun(dir: string, name: string): string[] {
  if (!existsSync(dir)) return [];
  const found: string[] = [];
  const entries = readdirSync(dir);
  if (entries.includes('config.resolved.yaml')) found.push('config.resolved.yaml');
  const ck = path.join(dir, 'checkpoints');
  if (existsSync(ck) && statSync(ck).isDirectory()) {
    const n = readdirSync(ck).filter((d) => /^step-\d+$/.test(d)).length;
    if (n) found.push(`${n} checkpoint${n > 1 ? 's' : ''}`);
  }
  if (entries.includes(name) && existsSync(path.join(dir, name, 'model_index.json'))) found.push(`${name}/`); // a full fine-tune's diffusers export
  const exports = entries.filter((f) => f.startsWith(name) && f.endsWith('.safetensors'));
  if (exports.length) found.push(exports.length > 2 ? `${exports.length} ${name}*.safetensors files` : exports.join(', '));
  return found;
}

/**
 * A fresh run (no --resume) into a folder that holds an earlier run is refused unless `overwrite`; with it, the
 * earlier run's checkpoints and state are removed first so nothing of the two runs mixes (its exports are
 * replaced as the new run writes them).
 */
export function prepareRunFolder(dir: string, name: string, o: { overwrite?: boolean; resume?: boolean }, log: (line: string) => void = () => {}): void {
  if (o.resume) return;
  const found = earlierRun(dir, name);
  if (!found.length) return;
  if (!o.overwrite) {
    throw usageError(
      `${dir} holds an earlier run (${found.join(', ')}); continue it with --resume ${dir}, replace it with --overwrite, or choose another --output`,
    );
  }
  log(`overwrite: removing the earlier run's checkpoints and state in ${dir}`);
  rmSync(path.join(dir, 'checkpoints'), { recursive: true, force: true });
  rmSync(path.join(dir, 'config.resolved.yaml'), { force: true });
}

/** A new run id: kept in every checkpoint so pruning and --resume never mix two runs. */
export const newRunId = () => randomBytes(8).toString('hex');

/** Largest magnitude a trained value may reach before a run is called diverged (float16's max, where exports overflow to Inf). */
export const ABSURD_MAGNITUDE = 65504;

/**
 * The first trainable that is not fit to save: a NaN/Inf or a magnitude above ABSURD_MAGNITUDE (a float16 export
 * would hold Inf). Undefined when all are healthy.
 */
export async function unhealthyTrainable(vars: Map<string, tf.Variable>): Promise<{ name: string; what: string } | undefined> {
  for (const [name, v] of vars) {
    const [bad, maxAbs] = tf.tidy(() => [tf.logicalNot(tf.isFinite(v)).any().cast('float32'), tf.max(tf.abs(v))]);
    const [b, m] = [(await bad.data())[0], (await maxAbs.data())[0]];
    tf.dispose([bad, maxAbs]);
    if (b) return { name, what: 'non-finite values (NaN or Inf)' };
    if (m > ABSURD_MAGNITUDE) return { name, what: `values up to ${m.toExponential(2)} (over ${ABSURD_MAGNITUDE}, float16's largest)` };
  }
  return undefined;
}

/** The error of a diverged run (its own exit code: not a usage mistake). */
export function divergedError(step: number, why: string, lastGood: string | undefined, outDir: string): SdtuneError {
  const resume = lastGood ? `the last good checkpoint is ${lastGood} (--resume ${outDir} continues from it)` : 'no checkpoint was saved before it';
  return new SdtuneError('diverged', `training diverged at step ${step}: ${why}; nothing from this step was saved, ${resume}. Try a lower learning rate.`);
}
