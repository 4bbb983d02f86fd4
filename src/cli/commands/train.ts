/** `sdtune lora` and `sdtune textual-inversion`: flags + YAML -> a resolved config -> the training loop. */
import type { Argv } from 'yargs';
import { selectBackend } from '../../runtime/backend.js';
import { type Method, FLAG_KEYS, flagOverrides, loadConfigFile } from '../../train/config.js';
import { train } from '../../train/loop.js';
import { runCommand } from '../run.js';

const DESCRIBE: Record<string, string> = {
  model: 'model folder or .safetensors (model.path)',
  data: 'image folder (data.dir)',
  output: 'output folder (output.dir)',
  'max-steps': 'optimizer steps (train.max_steps)',
  'batch-size': 'images per step (train.batch_size)',
  lr: 'learning rate (train.lr)',
  seed: 'seed (train.seed)',
  resolution: 'training size (data.resolution)',
  rank: 'LoRA rank (lora.rank)',
  alpha: 'LoRA alpha (lora.alpha)',
  'conv-rank': 'LoCon rank of the 3x3 convs, with lora.targets attn+ff+conv (lora.conv_rank, kohya conv_dim; default: --rank)',
  'conv-alpha': 'LoCon alpha of the 3x3 convs (lora.conv_alpha, kohya conv_alpha; default: --alpha)',
  token: 'the new prompt word, e.g. "<my-logo>" (textual_inversion.token)',
  'init-word': 'word whose embedding starts the token (textual_inversion.init_word)',
  vectors: 'vectors per token (textual_inversion.vectors)',
  'gradient-checkpointing': 'recompute the UNet transformers in the backward pass: ~1/4 the activation memory, ~1.3x the time (train.gradient_checkpointing)',
};
const BOOLEAN_FLAGS = new Set(['train-text-encoder', 'gradient-checkpointing']);

function options(a: Argv, method: Method): Argv {
  let y = a
    .option('config', { type: 'string', describe: 'YAML config (see configs/)' })
    .option('resume', { type: 'string', describe: 'continue from a checkpoint folder or an output folder' })
    .option('set', { type: 'string', array: true, describe: 'override any key: --set train.lr=2e-4' });
  const skip = method === 'lora' ? ['token', 'init-word', 'vectors'] : ['rank', 'alpha', 'conv-rank', 'conv-alpha', 'train-text-encoder'];
  for (const flag of Object.keys(FLAG_KEYS)) {
    if (skip.includes(flag)) continue;
    // no yargs defaults: a default would override the YAML; the config supplies them
    y = y.option(flag, { type: BOOLEAN_FLAGS.has(flag) ? 'boolean' : flag === 'sample-prompt' ? 'string' : undefined, describe: DESCRIBE[flag] ?? FLAG_KEYS[flag] });
  }
  return y;
}

async function run(method: Method, argv: Record<string, unknown>): Promise<void> {
  const { overrides, configPath, resume } = flagOverrides(argv);
  const config = await loadConfigFile(method, configPath, overrides);
  const b = await selectBackend(config.model.backend ?? undefined);
  process.stderr.write(b.message + '\n');
  const ac = new AbortController();
  const onSigint = () => {
    if (ac.signal.aborted) process.exit(130);
    process.stderr.write('\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit now)\n');
    ac.abort();
  };
  process.on('SIGINT', onSigint);
  try {
    const r = await train(method, config, { resume, signal: ac.signal });
    for (const f of r.files) process.stdout.write(f + '\n');
    if (r.stopped === 'interrupted') process.exitCode = 130;
  } finally {
    process.off('SIGINT', onSigint);
  }
}

export function registerTrain(y: Argv): Argv {
  return y
    .command('lora', 'train a LoRA (kohya/A1111 .safetensors output)', (a) => options(a, 'lora'), (argv) => runCommand(() => run('lora', argv)))
    .command(
      'textual-inversion',
      'train a textual-inversion embedding (A1111 + diffusers .safetensors output)',
      (a) => options(a, 'textual_inversion'),
      (argv) => runCommand(() => run('textual_inversion', argv)),
    );
}
