/** `sdtune inspect MODEL [--json]`: layout, dtype, variant, per-component configs and parameter counts. */
import type { Argv } from 'yargs';
import type { ModelReport } from '../../io/model.js';
import { runCommand } from '../run.js';

export interface InspectOptions {
  model: string;
  json: boolean;
  configDir?: string;
  tokenizerDir?: string;
}

const fmtCount = (n: number) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : String(n));

/** Human-readable report. */
export function formatReport(r: ModelReport): string {
  const lines = [`model:    ${r.path}`, `layout:   ${r.layout}`, `variant:  ${r.variant}`, `dtype:    ${r.dtype}${r.ema ? ' (has EMA weights)' : ''}`];
  for (const [name, c] of Object.entries(r.components)) {
    const cfg = c!.config;
    const pick = (keys: string[]) => keys.filter((k) => cfg[k] !== undefined).map((k) => `${k}=${JSON.stringify(cfg[k])}`).join(' ');
    const summary =
      name === 'unet'
        ? pick(['in_channels', 'block_out_channels', 'layers_per_block', 'attention_head_dim', 'cross_attention_dim', 'use_linear_projection', 'sample_size'])
        : name === 'vae'
          ? pick(['block_out_channels', 'latent_channels', 'scaling_factor'])
          : pick(['hidden_size', 'num_hidden_layers', 'num_attention_heads', 'hidden_act', 'vocab_size']);
    lines.push(`${name.padEnd(13)} ${fmtCount(c!.params).padStart(7)} params  ${summary}`);
  }
  if (r.scheduler._class_name) lines.push(`scheduler:  ${String(r.scheduler._class_name)}`);
  lines.push(`tokenizer:  ${r.tokenizer ?? '(none found; pass --tokenizer DIR)'}`);
  for (const n of r.notes) lines.push(`note: ${n}`);
  return lines.join('\n');
}

export function registerInspect(y: Argv): Argv {
  return y.command(
    'inspect <model>',
    'describe a checkpoint (diffusers folder or single .safetensors file)',
    (a) =>
      a
        .positional('model', { type: 'string', demandOption: true, describe: 'diffusers folder, single-file .safetensors, or .ckpt (read as data)' })
        .option('json', { type: 'boolean', default: false, describe: 'print one JSON object' })
        .option('config', { type: 'string', describe: 'diffusers folder whose configs apply to a single file' })
        .option('tokenizer', { type: 'string', describe: 'folder with vocab.json + merges.txt' }),
    (argv) =>
      runCommand(async () => {
        const opts: InspectOptions = { model: argv.model as string, json: Boolean(argv.json), configDir: argv.config, tokenizerDir: argv.tokenizer };
        const { inspectModel } = await import('../../io/model.js'); // loaded on use: --help stays fast
        const r = await inspectModel(opts.model, { configDir: opts.configDir, tokenizerDir: opts.tokenizerDir });
        process.stdout.write((opts.json ? JSON.stringify(r) : formatReport(r)) + '\n');
      }),
  );
}
