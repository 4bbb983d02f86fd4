/** `sdtune lora`, `sdtune textual-inversion`, `sdtune finetune` (one command per registered method): flags + YAML -> a resolved config -> the training loop, in a worker
 *  thread so that Ctrl-C is honoured within seconds even in the middle of a long step. */
import { Worker } from 'node:worker_threads';
import type { Argv } from 'yargs';
import { SdtuneError } from '../../errors.js';
import { type Method, type TrainConfig, loadConfigFile } from '../../train/config.js';
import { getMethod, methodNames } from '../../train/registry.js';
import { runCommand } from '../run.js';
import { SHARED_FLAGS, configOverrides, flagOverrides } from '../train-flags.js';
import type { TrainWorkerData, TrainWorkerMessage } from '../train-worker.js';

const DESCRIBE: Record<string, string> = {
  model: 'model folder or .safetensors (model.path)',
  data: 'image folder (data.dir)',
  output: 'output folder (output.dir)',
  'max-steps': 'optimizer steps (train.max_steps)',
  'batch-size': 'images per step (train.batch_size)',
  lr: 'learning rate (train.lr)',
  seed: 'seed (train.seed)',
  resolution: "training size (data.resolution; default: the model's, its UNet sample_size x 8)",
  'gradient-checkpointing': 'recompute the UNet transformers in the backward pass: ~1/4 the activation memory, ~1.3x the time (train.gradient_checkpointing)',
};
const BOOLEAN_FLAGS = new Set(['gradient-checkpointing']);

/** The shared flags and the method's own (its registry entry's). */
function options(a: Argv, method: Method): Argv {
  let y = a
    .option('config', { type: 'string', describe: 'YAML config (see configs/)' })
    .option('resume', { type: 'string', describe: 'continue from a checkpoint folder or an output folder' })
    .option('overwrite', { type: 'boolean', describe: 'replace an earlier run in the output folder (its checkpoints are deleted)' })
    .option('set', { type: 'string', array: true, describe: 'override any key: --set train.lr=2e-4' });
  // no yargs defaults: a default would override the YAML; the config supplies them
  for (const [flag, key] of Object.entries(SHARED_FLAGS)) {
    y = y.option(flag, { type: BOOLEAN_FLAGS.has(flag) ? 'boolean' : flag === 'sample-prompt' ? 'string' : undefined, describe: DESCRIBE[flag] ?? key });
  }
  for (const [flag, d] of Object.entries(getMethod(method).cli.flags ?? {})) {
    y = y.option(flag, { type: d.boolean ? 'boolean' : undefined, describe: d.describe ?? d.key });
  }
  return y;
}

async function run(method: Method, argv: Record<string, unknown>): Promise<void> {
  const { overrides: flags, configPath, resume } = flagOverrides(argv);
  const { overrides, ...named } = configOverrides(method, flags);
  const config = await loadConfigFile(method, configPath, overrides, named);
  const requested = (config.model.backend ?? process.env.SDTUNE_BACKEND ?? '').trim().toLowerCase();
  const run: RunRequest = { method, config, resume, overwrite: Boolean(argv.overwrite) };
  const r = await trainInWorker(run, requested === 'webgpu');
  const { files, stopped } = 'workerBackendError' in r ? await trainHere(run, r.workerBackendError) : r;
  for (const f of files) process.stdout.write(f + '\n');
  // after a graceful stop: 130 for Ctrl-C, 143 for SIGTERM (docker stop, systemd, timeout), as a shell reports them
  if (stopped === 'interrupted') process.exitCode = stopSignal === 'SIGTERM' ? 143 : 130;
}

interface RunRequest {
  method: Method;
  config: TrainConfig;
  resume: string | null;
  overwrite: boolean;
}

let stopSignal: NodeJS.Signals | undefined;

/** SIGINT and SIGTERM: the first asks for a graceful stop (`request`), a second one exits at once. */
function onStopSignals(request: () => void): () => void {
  const handler = (sig: NodeJS.Signals) => {
    if (stopSignal) process.exit(sig === 'SIGTERM' ? 143 : 130);
    stopSignal = sig;
    process.stderr.write(sig === 'SIGTERM' ? FIRST_INTERRUPT.replace('interrupt:', 'SIGTERM:').replace('Ctrl-C again', 'a second signal') : FIRST_INTERRUPT);
    request();
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return () => {
    process.off('SIGINT', handler);
    process.off('SIGTERM', handler);
  };
}

const FIRST_INTERRUPT = '\ninterrupt: stopping the current step and saving the last completed one (Ctrl-C again to quit now)\n';

/** Start the worker: compiled, dist/cli/train-worker.js; from the sources, train-worker-tsx.mjs, which registers
 *  tsx in the worker (a worker does not inherit the main thread's hooks) and imports train-worker.ts. */
function startWorker(data: TrainWorkerData): Worker {
  const compiled = !import.meta.url.endsWith('.ts');
  return new Worker(new URL(compiled ? '../train-worker.js' : '../train-worker-tsx.mjs', import.meta.url), { workerData: data });
}

/**
 * Train in a worker thread (src/cli/train-worker.ts) while this thread owns Ctrl-C: the first sets the shared
 * interrupt flag, which the worker sees at its next kernel, even in the middle of a step; the second exits at
 * once (process.exit ends the worker with the process). With `backendFallback`, a backend that fails to start in
 * the worker is returned as `workerBackendError` (for the caller to try in this thread) instead of thrown.
 */
async function trainInWorker(run: RunRequest, backendFallback: boolean): Promise<{ files: string[]; stopped: 'done' | 'interrupted' } | { workerBackendError: string }> {
  const interrupt = new SharedArrayBuffer(4);
  const flag = new Int32Array(interrupt);
  const worker = startWorker({ ...run, interrupt, tty: { isTTY: Boolean(process.stderr.isTTY), columns: process.stderr.columns }, backendFallback });
  const offSignals = onStopSignals(() => Atomics.store(flag, 0, 1));
  try {
    return await new Promise((resolve, reject) => {
      worker.on('message', (m: TrainWorkerMessage) => {
        if (m.type === 'out') process[m.stream].write(m.text);
        else if (m.type === 'result') resolve({ files: m.files, stopped: m.stopped });
        else if (m.type === 'error') reject(new SdtuneError(m.kind, m.message));
        else if (m.type === 'backend-failed') resolve({ workerBackendError: m.message });
      });
      worker.on('error', reject); // a bug in the worker: its error, with the stack
      worker.on('exit', (code) => reject(new Error(`the training worker exited (code ${code}) without a result`)));
    });
  } finally {
    offSignals();
    await worker.terminate();
  }
}

/** Train in this thread, when the backend could not start in a worker (`workerError`) but starts here: Ctrl-C is
 *  then seen between steps, and within one only where the backend awaits the device. */
async function trainHere(run: RunRequest, workerError: string): Promise<{ files: string[]; stopped: 'done' | 'interrupted' }> {
  const [{ selectBackend }, { train }] = await Promise.all([import('../../runtime/backend.js'), import('../../train/loop.js')]);
  const { method, config, resume, overwrite } = run;
  const b = await selectBackend(config.model.backend ?? undefined); // fails as it would have in the worker: that error
  process.stderr.write(`note: the backend could not start in a worker thread (${workerError}); training in the main thread, where Ctrl-C stops between steps\n`);
  process.stderr.write(b.message + '\n');
  const ac = new AbortController();
  const offSignals = onStopSignals(() => ac.abort());
  try {
    return await train(method, config, { resume, overwrite, signal: ac.signal });
  } finally {
    offSignals();
  }
}

/** The training commands, one per registered method (`sdtune lora`, `sdtune textual-inversion`, ...). */
export const trainCommands = (): string[] => methodNames().map((m) => getMethod(m).cli.command);

export function registerTrain(y: Argv): Argv {
  for (const name of methodNames()) {
    const { command, describe } = getMethod(name).cli;
    y = y.command(command, describe, (a) => options(a, name), (argv) => runCommand(() => run(name, argv)));
  }
  return y;
}
