/**
 * `sdtune convert IN OUT [--to diffusers|single-file] [--half]`: write a model in the other layout; a PyTorch pickle
 * (.ckpt/.pt/.bin, read as data) converts to a .safetensors (a model as a single file, an adapter tensor by tensor).
 */
import type { Argv } from 'yargs';
import { progress } from '../../runtime/progress.js';
import { runCommand } from '../run.js';

export interface ConvertOptions {
  input: string;
  output: string;
  to?: 'diffusers' | 'single-file';
  half: boolean;
  configDir?: string;
  tokenizerDir?: string;
}

export function registerConvert(y: Argv): Argv {
  return y.command(
    'convert <input> <output>',
    'convert between a diffusers folder and a single-file LDM .safetensors, or a .ckpt/.pt/.bin to .safetensors',
    (a) =>
      a
        .positional('input', { type: 'string', demandOption: true })
        .positional('output', { type: 'string', demandOption: true })
        .option('to', { choices: ['diffusers', 'single-file'] as const, describe: 'target layout (default: single-file for a .safetensors output, else the other one)' })
        .option('half', { type: 'boolean', default: false, describe: 'write float16 weights' })
        .option('config', { type: 'string', describe: 'diffusers folder whose configs apply to a single-file input' })
        .option('tokenizer', { type: 'string', describe: 'folder with vocab.json + merges.txt to include (default: the model\'s own; a single file written by sdtune carries it)' }),
    (argv) =>
      runCommand(async () => {
        const opts: ConvertOptions = {
          input: argv.input as string,
          output: argv.output as string,
          to: argv.to,
          half: Boolean(argv.half),
          configDir: argv.config,
          tokenizerDir: argv.tokenizer,
        };
        // loaded on use: --help stays fast
        const [{ convertCheckpoint }, { exportTrainingCheckpoint, isTrainingCheckpoint }] = await Promise.all([import('../../io/convert.js'), import('../../train/export-checkpoint.js')]);
        let bar: ReturnType<typeof progress> | undefined;
        const onProgress = (done: number, total: number) => {
          bar ??= progress({ total, label: 'convert' });
          bar.tick(done - bar.count);
        };
        const r = isTrainingCheckpoint(opts.input)
          ? await (async () => {
              // a full fine-tune's training checkpoint: its base model with the trained (EMA when kept) weights
              const { selectBackend } = await import('../../runtime/backend.js');
              process.stderr.write((await selectBackend()).message + '\n');
              return exportTrainingCheckpoint(opts.input, opts.output, { to: opts.to, precision: opts.half ? 'fp16' : 'fp32', onProgress });
            })()
          : await convertCheckpoint(opts.input, opts.output, { to: opts.to, half: opts.half, configDir: opts.configDir, tokenizerDir: opts.tokenizerDir, onProgress });
        bar?.done();
        for (const n of r.notes) process.stderr.write(`note: ${n}\n`);
        process.stdout.write(`wrote ${opts.output} (${r.layout}, ${r.tensors} tensors, ${(r.bytes / 1e6).toFixed(1)} MB)\n`);
      }),
  );
}
