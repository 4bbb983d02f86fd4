/**
 * The training commands' flags (argv stays in src/cli): the short flags -> the dotted config keys they set (the
 * shared ones here, each method's from its registry entry), `--set key=value`, `--config` and `--resume`, and how
 * flags are named in the config's messages ("--lr: train.lr: expected ...", "... or with --model").
 */
import { usageError } from '../errors.js';
import type { ResolveOptions } from '../train/config.js';
import { getMethod, methodNames } from '../train/registry.js';
import { levenshtein } from '../train/schema.js';

/** The short flags every training command accepts -> the dotted key they set. `--config` (the YAML file),
 *  `--resume` (a checkpoint) and `--set key=value` (any key) are not config keys: see flagOverrides. */
export const SHARED_FLAGS: Readonly<Record<string, string>> = {
  model: 'model.path', tokenizer: 'model.tokenizer', 'model-config': 'model.config', backend: 'model.backend',
  'prediction-type': 'model.prediction_type',
  data: 'data.dir', repeats: 'data.repeats', resolution: 'data.resolution',
  'max-steps': 'train.max_steps', epochs: 'train.epochs', 'batch-size': 'train.batch_size',
  'gradient-accumulation': 'train.gradient_accumulation', lr: 'train.lr', 'lr-scheduler': 'train.lr_scheduler',
  'lr-warmup-steps': 'train.lr_warmup_steps', seed: 'train.seed', 'gradient-checkpointing': 'train.gradient_checkpointing',
  output: 'output.dir', name: 'output.name', 'save-every': 'output.save_every', 'save-precision': 'output.save_precision',
  'sample-every': 'output.sample_every', 'sample-prompt': 'output.sample_prompts', logdir: 'output.logging_dir',
};
/** Flags of the training commands that are not config keys. */
export const NON_CONFIG_FLAGS: ReadonlySet<string> = new Set(['config', 'resume', 'set', 'overwrite']);

/** Every flag of every registered method -> its key (a flag that several methods have: the first's). */
export function flagKeys(): Record<string, string> {
  const out: Record<string, string> = { ...SHARED_FLAGS };
  for (const name of methodNames()) for (const [f, d] of Object.entries(getMethod(name).cli.flags ?? {})) out[f] ??= d.key;
  return out;
}
/** The flags of the built-in methods' commands -> the dotted key they set. */
export const FLAG_KEYS: Readonly<Record<string, string>> = flagKeys();

/** The key `flag` sets when `method` trains: its own flag first, then any method's (the config then says whose). */
const flagKey = (method: string, flag: string): string | undefined => getMethod(method).cli.flags?.[flag]?.key ?? flagKeys()[flag];

/** " (did you mean --x?)" for a mistyped flag name. */
export function suggestFlag(name: string): string {
  const flags = Object.keys(flagKeys());
  const best = flags.reduce((a, b) => (levenshtein(name, a) <= levenshtein(name, b) ? a : b));
  if (levenshtein(name, best) <= 2) return ` (did you mean --${best}?)`;
  return ` (valid: ${flags.map((f) => `--${f}`).join(', ')}; any key with --set key=value)`;
}

/** Split a yargs argv into overrides (the config flags by name and --set key=value pairs by key), the --config
 *  file and --resume. */
export function flagOverrides(argv: Record<string, unknown>): { overrides: Record<string, unknown>; configPath: string | null; resume: string | null } {
  const overrides: Record<string, unknown> = {};
  for (const s of [argv.set ?? []].flat()) {
    const i = String(s).indexOf('=');
    if (i < 1) throw usageError(`--set ${s}: expected key=value, e.g. --set train.lr=1e-4`);
    overrides[String(s).slice(0, i).trim()] = String(s).slice(i + 1);
  }
  for (const flag of Object.keys(flagKeys())) if (argv[flag] !== undefined) overrides[flag] = argv[flag];
  const opt = (k: string) => (typeof argv[k] === 'string' ? (argv[k] as string) : null);
  return { overrides, configPath: opt('config'), resume: opt('resume') };
}

/**
 * Flag overrides (flag names, or dotted keys from --set) -> what resolveConfig takes: dotted keys, the flag each came
 * from (for messages), an unknown flag as a problem reported with the config's, and the flag that sets a key.
 */
export function configOverrides(method: string, flags: Record<string, unknown>): ResolveOptions & { overrides: Record<string, unknown> } {
  const overrides: Record<string, unknown> = {};
  const labels: Record<string, string> = {};
  const problems: string[] = [];
  for (const [name, v] of Object.entries(flags)) {
    if (v === undefined || NON_CONFIG_FLAGS.has(name)) continue;
    const key = flagKey(method, name);
    if (key) {
      overrides[key] = v;
      labels[key] = `--${name}`;
    } else if (name.includes('.')) overrides[name] = v; // --set key=value
    else problems.push(`unknown option --${name}${suggestFlag(name)}`);
  }
  const own = getMethod(method).cli.flags ?? {};
  const setWith = (key: string) => {
    const flag = Object.entries(own).find(([, d]) => d.key === key)?.[0] ?? Object.keys(SHARED_FLAGS).find((f) => SHARED_FLAGS[f] === key);
    return flag ? `--${flag}` : undefined;
  };
  return { overrides, labels, problems, setWith };
}
