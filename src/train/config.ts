/**
 * The training configuration (design principle 11): a YAML file, overridden by dotted keys (what the CLI's flags
 * become, src/cli/train-flags.ts), filled with the defaults that kohya sd-scripts / diffusers' training scripts users
 * expect, validated into one typed, fully resolved object, and saved with the outputs as config.resolved.yaml (dumpConfig), which resolves back to the same object.
 * Every mistake is a one-line SdtuneError naming the key (and its file line or flag), expected vs found.
 * Each key is declared once, in its section's zod schema (type, default, range; src/train/schema.ts); the method
 * sections and their rules come from the method registry (src/train/registry.ts).
 */
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';
import { SdtuneError, fileError, usageError } from '../errors.js';
import { BACKENDS } from '../runtime/backend-names.js';
import { resolveSampler } from '../schedulers/names.js';
import { LR_SCHEDULERS } from './lr.js';
import { type MethodEntry, getMethod, isMethod, methodNames } from './registry.js';
import { bool, expected, int, isMap, leafKind, levenshtein, num, oneOf, orNull, parseLeaf, sectionKeys, show, size, str, strs } from './schema.js';

export { TI_TEMPLATES } from './methods/textual-inversion.js';
export { FINETUNE_FILTERS } from './methods/finetune.js';
export { LORA_TARGETS } from './methods/lora.js';
export { DREAMBOOTH_BATCHING, DREAMBOOTH_TRAINS } from './methods/dreambooth.js';

/** A registered training method's name ('lora', 'textual_inversion', 'finetune', or one added with registerMethod). */
export type Method = string;
/** Which UNet parameters a full fine-tune trains: all, or only the transformer blocks' attention layers. */
export type FinetuneFilter = (typeof import('./methods/finetune.js').FINETUNE_FILTERS)[number];
/** Which modules get LoRA (adapters/lora-inject.ts). */
export type LoraTargets = (typeof import('./methods/lora.js').LORA_TARGETS)[number];

// ---- the shared sections: one declaration per key (type, default, range) ----

const MODEL = z.object({
  path: str(), // diffusers folder or single-file .safetensors (required)
  tokenizer: orNull(str()), // folder with vocab.json + merges.txt; null = the model's own
  config: orNull(str()), // diffusers folder whose configs apply to a single-file model
  backend: orNull(oneOf(BACKENDS)), // tfjs backend; null = best available (SDTUNE_BACKEND, tensorflow, cpu)
  prediction_type: orNull(oneOf(['epsilon', 'v_prediction'] as const)), // null = the model's scheduler config
});

const DATA = z.object({
  dir: str(), // image folder (required)
  caption_extension: str().default('.txt'), // caption file next to each image (kohya); diffusers' metadata.jsonl wins when present
  metadata: orNull(str()), // metadata file name in dir (file_name/text columns); null = metadata.jsonl if present
  repeats: int(1).default(1), // each image counts this many times per epoch (kohya's "10_name" folder prefix)
  resolution: orNull(size()), // [width, height] in pixels (multiples of 8); YAML accepts 512 or [w, h]; null = the UNet's sample_size x 8 (filled in by the loop once the model is loaded, see withModelDefaults)
  center_crop: bool().default(false), // false = random crop (diffusers --center_crop off)
  flip: bool().default(false), // random horizontal flip (kohya flip_aug, diffusers --random_flip)
  buckets: z.object({
    enabled: bool().default(false), // kohya aspect-ratio bucketing (enable_bucket)
    min_side: int(8, { mult: 8 }).default(256), // min_bucket_reso
    max_side: int(8, { mult: 8 }).default(1024), // max_bucket_reso
    step: int(8, { mult: 8 }).default(64), // bucket_reso_steps
  }),
  caption_dropout: num(0, { max: 1 }).default(0), // probability of training on an empty caption (kohya caption_dropout_rate)
  shuffle_captions: bool().default(false), // shuffle comma-separated tags (kohya shuffle_caption)
  keep_tokens: int(0).default(0), // first N comma-separated tags stay in place when shuffling (kohya keep_tokens)
  cache_latents: bool().default(true), // encode every image with the VAE once, before training
  cache_dir: orNull(str()), // where latent caches go; null = output.dir
  templates: orNull(strs()), // prompts with {} for the token when images have no captions; null = TI_TEMPLATES
});

const TRAIN = z.object({
  max_steps: orNull(int(1)), // optimizer steps; when set it decides over epochs (diffusers max_train_steps)
  epochs: int(1).default(1), // passes over images x repeats when max_steps is null
  batch_size: int(1).default(1), // images per forward pass
  gradient_accumulation: int(1).default(1), // forward passes per optimizer step
  lr: num(0, { minOpen: true }).default(1e-4), // base learning rate (each method sets its own default: LoRA 1e-4 as kohya/diffusers; TI 5e-3 as A1111)
  lr_scheduler: oneOf(LR_SCHEDULERS).default('constant'), // diffusers get_scheduler names
  lr_warmup_steps: int(0).default(0), // linear warmup in optimizer steps (not with 'constant')
  lr_num_cycles: int(1).default(1), // hard restarts of cosine_with_restarts
  lr_decay_steps: int(0).default(0), // warmup_stable_decay: the last steps, over which the lr falls to 0 (half cosine)
  adam_beta1: num(0, { max: 1, maxOpen: true }).default(0.9),
  adam_beta2: num(0, { max: 1, maxOpen: true }).default(0.999),
  adam_epsilon: num(0).default(1e-8),
  weight_decay: num(0).default(1e-2), // AdamW decoupled decay (torch/diffusers/kohya default; methods may differ: TI 0 as A1111)
  max_grad_norm: num(0).default(1), // clip_grad_norm_ threshold; 0 disables clipping
  seed: int(0, { max: Number.MAX_SAFE_INTEGER }).default(42), // torch-compatible seed for noise, timesteps, crops, flips, dropout
  noise_offset: num(0).default(0), // Crosslabs noise offset (diffusers --noise_offset); 0 = off
  min_snr_gamma: orNull(num(0, { minOpen: true })), // Min-SNR loss weighting gamma (Hang et al. 2023; 5 is usual); null = off
  mixed_precision: str().default('no'), // fp16/bf16 training is not supported on tfjs: only "no" passes the checks
  gradient_checkpointing: bool().default(false), // recompute the UNet's transformers in the backward pass: ~1/4 the activation memory, ~1.3x the time
  ema: z.object({
    enabled: bool().default(false), // keep an exponential moving average of the trainables (diffusers --use_ema, EMAModel)
    decay: num(0, { max: 1 }).default(0.9999), // the largest decay
    min_decay: num(0, { max: 1 }).default(0),
    update_after_step: int(0).default(0), // the average copies the weights for this many steps first
    use_warmup: bool().default(false), // 1 - (1 + step/inv_gamma)^-power instead of (1 + step)/(10 + step)
    inv_gamma: num(0, { minOpen: true }).default(1),
    power: num(0, { minOpen: true }).default(2 / 3),
  }),
});

const OUTPUT = z.object({
  dir: orNull(str()), // default output/<name>
  name: orNull(str()), // file name stem of the results; default: the method's (TI: the token, <my-logo> -> my-logo), else the config file name, else the method
  save_every: orNull(int(1)), // checkpoint every N steps; null = only at the end
  keep_last: int(1).nullable().default(3), // intermediate checkpoints kept (diffusers checkpoints_total_limit); null = all
  save_precision: oneOf(['fp16', 'fp32', 'bf16'] as const).default('fp32'), // dtype of the saved result (methods set their own: fp16 for LoRA as kohya; fp32 for embeddings and full fine-tunes; bf16 for full fine-tunes only)
  save_as: oneOf(['diffusers', 'single_file', 'both'] as const).default('diffusers'), // full fine-tune: a diffusers folder and/or an LDM single file (A1111, ComfyUI)
  sample_every: orNull(int(1)), // sample images every N steps; null = never
  sample_prompts: strs().default([]), // prompts for those samples
  sample_seed: int(0, { max: Number.MAX_SAFE_INTEGER }).default(42),
  sample_steps: int(1).default(20),
  sample_sampler: orNull(str()), // canonical sampler name; null = the model's scheduler
  eval_prompts: strs().default([]), // toy-world models: prompts the judges score ("a red heart", or "a sks => purple heart") before the first step, every eval_every steps and after the last
  eval_grid: orNull(str()), // ... or a grid of them: "colours x shapes", "red,blue x heart" (sdtune eval --grid)
  eval_every: orNull(int(1)), // judge every N steps too (TensorBoard eval/accuracy); null = before and after only
  eval_seeds: int(1, { max: 1024 }).default(4), // seeds per prompt
  eval_cfg: num(1).default(3),
  eval_steps: int(1).default(20), // DDIM steps
  log_dir: orNull(str()), // the TensorBoard events folder of this run; default <logging_dir>/<name>, else <dir>/logs
  logging_dir: orNull(str()), // kohya logging_dir: a folder of TensorBoard runs, each in <logging_dir>/<name>
  also_diffusers_format: bool().default(false), // additionally write PEFT / diffusers-format files
  export_ema: bool().default(true), // with train.ema: export (and sample with) the averaged weights, as diffusers does
  ema_only: bool().default(false), // with train.ema: the single file holds the EMA average ("pruned-emaonly", as A1111 users expect) even when export_ema is false; the diffusers folder keeps export_ema's weights (it holds one set of weights, never an EMA copy)
});

/** The shared sections, in the order configs list them (the method's section goes between train and output). */
const SHARED = { model: MODEL, data: DATA, train: TRAIN, output: OUTPUT } as const;

/** Each method's config section, by method name: each entry in src/train/methods/ adds its own
 *  (`declare module '../config.js' { interface MethodSections { lora: ... } }`). */
// eslint-disable-next-line @typescript-eslint/no-empty-object-type
export interface MethodSections {}

type Out<K extends keyof typeof SHARED> = z.output<(typeof SHARED)[K]>;
/** Fully resolved training configuration; `null` always has the documented meaning, nothing is undefined (only the
 *  sections of the methods not trained are absent). */
export type TrainConfig = {
  model: Out<'model'>;
  data: Omit<Out<'data'>, 'cache_dir'> & { cache_dir: string };
  train: Out<'train'>;
  output: Omit<Out<'output'>, 'dir' | 'name' | 'log_dir'> & { dir: string; name: string; log_dir: string };
} & Partial<MethodSections>;

/** How resolveConfig names its inputs in messages (a caller such as the CLI says how the user gave them). */
export interface ResolveOptions {
  /** names the YAML text in messages (its file: "my.yaml:12: ..."); also the default output.name */
  source?: string;
  /** how each override was given, by dotted key (the CLI: "--lr"); default "override <key>" */
  labels?: Readonly<Record<string, string>>;
  /** how a required key can be given besides the config (the CLI: "--model"), for its message */
  setWith?: (key: string) => string | undefined;
  /** problems the caller found in its own input (the CLI: unknown flags), reported at once with the config's */
  problems?: readonly string[];
}

// ---- the keys: shared sections + every registered method's ----

interface KeyIndex {
  leaves: Map<string, z.ZodType>;
  groups: Set<string>;
  sections: string[];
}
/** Every dotted key and group (model, data.buckets, lora, ...), shared sections first, methods before output. */
function keyIndex(): KeyIndex {
  const sections: [string, z.ZodObject][] = [['model', MODEL], ['data', DATA], ['train', TRAIN], ...methodNames().map((m) => [m, getMethod(m).section] as [string, z.ZodObject]), ['output', OUTPUT]];
  const idx: KeyIndex = { leaves: new Map(), groups: new Set(), sections: sections.map(([n]) => n) };
  for (const [name, obj] of sections) {
    const k = sectionKeys(name, obj);
    for (const [key, s] of k.leaves) idx.leaves.set(key, s);
    for (const g of k.groups) idx.groups.add(g);
  }
  return idx;
}

// ---- unknown keys: kohya / diffusers spellings first, then the closest valid key ----

const ALIASES: Record<string, string> = {
  learning_rate: 'train.lr', unet_lr: 'train.lr', max_train_steps: 'train.max_steps', num_train_epochs: 'train.epochs',
  max_train_epochs: 'train.epochs', train_batch_size: 'train.batch_size', gradient_accumulation_steps: 'train.gradient_accumulation',
  lr_scheduler_num_cycles: 'train.lr_num_cycles', gradient_checkpointing: 'train.gradient_checkpointing', adam_weight_decay: 'train.weight_decay', snr_gamma: 'train.min_snr_gamma',
  network_dim: 'lora.rank', r: 'lora.rank', network_alpha: 'lora.alpha', lora_alpha: 'lora.alpha', network_dropout: 'lora.dropout',
  lora_dropout: 'lora.dropout', train_text_encoder: 'lora.text_encoder', target_modules: 'lora.targets',
  conv_dim: 'lora.conv_rank', conv_lora_dim: 'lora.conv_rank', conv_alpha: 'lora.conv_alpha',
  placeholder_token: 'textual_inversion.token', token_string: 'textual_inversion.token', initializer_token: 'textual_inversion.init_word',
  num_vectors: 'textual_inversion.vectors', num_vectors_per_token: 'textual_inversion.vectors',
  pretrained_model_name_or_path: 'model.path', tokenizer_name: 'model.tokenizer', v_parameterization: 'model.prediction_type',
  train_data_dir: 'data.dir', num_repeats: 'data.repeats', dataset_repeats: 'data.repeats', random_flip: 'data.flip',
  use_ema: 'train.ema.enabled', ema_decay: 'train.ema.decay', ema_min_decay: 'train.ema.min_decay',
  flip_aug: 'data.flip', enable_bucket: 'data.buckets.enabled', min_bucket_reso: 'data.buckets.min_side',
  max_bucket_reso: 'data.buckets.max_side', bucket_reso_steps: 'data.buckets.step', caption_dropout_rate: 'data.caption_dropout',
  output_dir: 'output.dir', output_name: 'output.name', logging_dir: 'output.logging_dir', save_every_n_steps: 'output.save_every',
  checkpointing_steps: 'output.save_every', checkpoints_total_limit: 'output.keep_last', sample_every_n_steps: 'output.sample_every',
  validation_steps: 'output.sample_every', validation_prompt: 'output.sample_prompts',
  sample_batch_size: 'dreambooth.class_images.batch_size', learning_rate_te: 'dreambooth.text_encoder_lr',
};
const NOTES: Record<string, string> = {
  optimizer_type: 'sdtune always uses AdamW (train.adam_*, train.weight_decay)',
  optimizer: 'sdtune always uses AdamW (train.adam_*, train.weight_decay)',
  use_8bit_adam: 'sdtune always uses AdamW (train.adam_*, train.weight_decay)',
  network_args: 'kohya conv_dim / conv_alpha are lora.conv_rank / lora.conv_alpha, with lora.targets: attn+ff+conv',
  network_module: 'sdtune trains kohya networks.lora (LoRA, and LoCon with lora.targets: attn+ff+conv)',
};

const sectionOf = (key: string) => key.split('.')[0];
/** The keys and groups `method` may use: the shared sections' and its own section's, leaves first. */
const validKeys = (idx: KeyIndex, method: Method) => [...idx.leaves.keys(), ...idx.groups].filter((k) => !isMethod(sectionOf(k)) || sectionOf(k) === method);

/** The valid key a user most likely meant by `key`, if any. */
function suggest(idx: KeyIndex, key: string, method: Method): string | undefined {
  if (key.length > 100) return undefined; // no valid key is that long (and edit distance costs length x length)
  const leaf = key.slice(key.lastIndexOf('.') + 1);
  const valid = validKeys(idx, method);
  const alias = ALIASES[leaf];
  if (alias && valid.includes(alias)) return alias;
  const sameLeaf = valid.find((k) => k.endsWith(`.${leaf}`));
  if (sameLeaf) return sameLeaf;
  let best: string | undefined;
  let bestD = Infinity;
  for (const k of valid) {
    const d = levenshtein(key, k);
    if (d < bestD) [best, bestD] = [k, d];
  }
  if (bestD <= Math.max(2, Math.floor(leaf.length / 3))) return best;
  const depth = (k: string) => k.split('.').length;
  return valid.find((k) => depth(k) === depth(key) && (k.startsWith(key) || key.startsWith(k)));
}

// ---- values ----

/** Command-line values arrive as strings: read them as YAML scalars (1e-4, true, null, [512, 768]) where the key
 *  is not a string; "768x512" / "768,512" are sizes; "1, 2, 1" is a list of numbers; a single prompt is a list of one,
 *  "[]" an empty list and "[a, b]" a list. */
function coerceFlag(s: z.ZodType, v: unknown): unknown {
  if (typeof v !== 'string') return v;
  const t = leafKind(s);
  if (t === 'strs') {
    // a YAML flow list ("[]" clears the list, "[a red star, a blue circle]"), else one item
    if (/^\s*\[[\s\S]*\]\s*$/.test(v)) {
      try {
        const l = YAML.parse(v) as unknown;
        if (Array.isArray(l) && l.every((x) => typeof x === 'string')) return l;
      } catch {
        // not a list: one item
      }
    }
    return [v];
  }
  if (t === 'nums' && /^[\d.eE+\-\s]+(,[\d.eE+\-\s]+)*$/.test(v)) return v.split(',').map((p) => Number(p.trim())); // "1, 2, 1" as A1111's field
  if (t === 'size' && /^\d+\s*[x,]\s*\d+$/.test(v.trim())) return v.split(/[x,]/).map((p) => Number(p.trim()));
  if (t === 'str') return v === 'null' && s.safeParse(null).success ? null : v; // a nullable string: null clears it
  try {
    return YAML.parse(v) ?? null;
  } catch {
    return v;
  }
}

// ---- resolve ----

type Origin = Map<string, string>; // dotted key -> "file.yaml:12" or "--lr"

/** "file.yaml:12 " / "--lr " / "" before a key in messages. */
const at = (origin: Origin, key: string) => (origin.has(key) ? `${origin.get(key)}: ` : '');

/** Line of every key in a YAML mapping tree, for messages. */
function keyLines(doc: YAML.Document, lc: YAML.LineCounter, source: string): Origin {
  const out: Origin = new Map();
  const walk = (node: unknown, prefix: string) => {
    if (!YAML.isMap(node)) return;
    for (const it of node.items) {
      const k = YAML.isScalar(it.key) ? String(it.key.value) : String(it.key);
      const key = prefix ? `${prefix}.${k}` : k;
      const range = YAML.isNode(it.key) ? it.key.range : undefined;
      if (range) out.set(key, `${source}:${lc.linePos(range[0]).line}`);
      walk(it.value, key);
    }
  };
  walk(doc.contents, '');
  return out;
}

/** "unknown key x (did you mean y?)", with a note for options sdtune does not have. */
function unknownKey(idx: KeyIndex, key: string, method: Method, origin: Origin): SdtuneError {
  const leaf = key.slice(key.lastIndexOf('.') + 1);
  const sec = sectionOf(key);
  const guess = suggest(idx, key, method);
  // the section's own keys, a nested group once by its name (train.ema, not each of its keys)
  const inSection = idx.groups.has(sec) ? [...new Set(validKeys(idx, method).filter((k) => sectionOf(k) === sec && k !== sec).map((k) => k.split('.').slice(0, 2).join('.')))] : [];
  const hint =
    NOTES[leaf] ??
    (guess ? `did you mean ${guess}?`
      : inSection.length ? `valid keys in ${sec}: ${inSection.map((k) => k.slice(sec.length + 1)).join(', ')}`
      : `valid sections: ${idx.sections.filter((s) => !isMethod(s) || s === method).join(', ')}`);
  return usageError(`${at(origin, key)}unknown key ${clip(JSON.stringify(key).slice(1, -1))} (${hint})`);
}

/**
 * Put a leaf or a whole group (mapping) under `key` into the flat map; keys the schema does not know are added to
 * `problems` (every one is reported, not just the first).
 */
function addFlat(idx: KeyIndex, flat: Map<string, unknown>, key: string, v: unknown, method: Method, origin: Origin, problems: string[]): void {
  if (!idx.groups.has(key)) {
    if (!idx.leaves.has(key)) problems.push(unknownKey(idx, key, method, origin).message);
    else flat.set(key, v);
    return;
  }
  if (v === null) return; // an empty section ("lora:" with nothing under it)
  if (!isMap(v)) {
    const inner = validKeys(idx, method).filter((k) => k.startsWith(`${key}.`) && !k.slice(key.length + 1).includes('.'));
    problems.push(`${at(origin, key)}${key}: expected a mapping with keys ${inner.map((k) => k.slice(key.length + 1)).join(', ')}, found ${show(v)}`);
    return;
  }
  for (const [k, x] of Object.entries(v)) {
    if (origin.has(key) && !origin.has(`${key}.${k}`)) origin.set(`${key}.${k}`, origin.get(key)!);
    addFlat(idx, flat, `${key}.${k}`, x, method, origin, problems);
  }
}

/** Set a dotted key in a nested object. */
function setPath(obj: Record<string, unknown>, key: string, v: unknown): void {
  const parts = key.split('.');
  let o = obj;
  for (const p of parts.slice(0, -1)) o = (o[p] ??= {}) as Record<string, unknown>;
  o[parts[parts.length - 1]] = v;
}

// ---- bounded YAML: a config from a stranger costs little time and memory, and every failure is one line ----

/** A training config is a few KB with under 100 keys, so these only stop hostile files. */
export const MAX_CONFIG_BYTES = 1 << 20;
export const MAX_CONFIG_KEYS = 1000;
const MAX_YAML_TOKENS = 50_000; // a config of 1000 keys and 1000 list items has ~15,000; bounds the work of error-heavy input
const MAX_YAML_DEPTH = 64;
const MAX_YAML_ALIASES = 100; // the yaml library's maxAliasCount: aliases resolved in all (billion-laughs guard)

/** `s` cut to `n` characters for a one-line message. */
const clip = (s: string, n = 80) => (s.length > n ? `${s.slice(0, n - 3)}...` : s);
/** 1-based line of character `offset`. */
const lineAt = (text: string, offset: number) => {
  let line = 1;
  for (let i = text.indexOf('\n'); i >= 0 && i < offset; i = text.indexOf('\n', i + 1)) line++;
  return line;
};

/**
 * Parse YAML text with its cost bounded before the yaml library builds anything: size, the number of mapping keys
 * (its duplicate-key check is quadratic per mapping) and the nesting depth (its composer recurses, and deep input
 * can exhaust the stack or the heap) are checked on the lexer's token stream, then exactly on the CST.
 */
function parseYamlBounded(text: string, src: string): { doc: YAML.Document.Parsed; lc: YAML.LineCounter } {
  if (text.length > MAX_CONFIG_BYTES) throw fileError(`${src}: the config is ${text.length.toLocaleString('en-US')} characters, more than the ${MAX_CONFIG_BYTES.toLocaleString('en-US')} a config may have`);
  const tooDeep = (offset: number) => fileError(`${src}:${lineAt(text, offset)}: invalid YAML: nested more than ${MAX_YAML_DEPTH} levels deep`);
  // 1. tokens: keys (":" and "?" indicators), flow depth, block indicators on one line ("- - - x" nests without indent)
  let offset = 0;
  let keys = 0;
  let flow = 0;
  let onLine = 0;
  let count = 0;
  for (const tok of new YAML.Lexer().lex(text)) {
    if (++count > MAX_YAML_TOKENS) throw fileError(`${src}:${lineAt(text, offset)}: the config has more than ${MAX_YAML_TOKENS.toLocaleString('en-US')} YAML tokens (not a training config?)`);
    if (tok === '[' || tok === '{') {
      if (++flow > MAX_YAML_DEPTH) throw tooDeep(offset);
    } else if (tok === ']' || tok === '}') flow = Math.max(0, flow - 1);
    else if (tok === ':' || tok === '?') {
      if (++keys > MAX_CONFIG_KEYS) throw fileError(`${src}:${lineAt(text, offset)}: the config has more than ${MAX_CONFIG_KEYS} keys (a training config has under 100)`);
    } else if (tok === '\n' || tok === '\r\n') onLine = 0;
    if (flow === 0 && (tok === '-' || tok === '?' || tok === ':') && ++onLine > MAX_YAML_DEPTH) throw tooDeep(offset);
    if (tok !== YAML.CST.DOCUMENT && tok !== YAML.CST.FLOW_END && tok !== YAML.CST.SCALAR) offset += tok.length;
  }
  // 2. the CST, depth exactly (iteratively: the depth is what is being bounded)
  const lc = new YAML.LineCounter();
  const tokens = [...new YAML.Parser(lc.addNewLine).parse(text)];
  const stack: [YAML.CST.Token | null | undefined, number][] = tokens.map((t) => [t, 0]);
  while (stack.length) {
    const [t, depth] = stack.pop()!;
    if (!t) continue;
    if (depth > MAX_YAML_DEPTH) throw tooDeep(t.offset);
    if (t.type === 'document') stack.push([t.value, depth]);
    else if (t.type === 'block-map' || t.type === 'block-seq' || t.type === 'flow-collection') {
      for (const it of t.items) stack.push([it.value, depth + 1], [it.key, depth + 1]); // the key first: it names the line
    }
  }
  // 3. compose (as YAML.parseDocument does)
  const composer = new YAML.Composer({ prettyErrors: false });
  const docs: YAML.Document.Parsed[] = [];
  for (const d of composer.compose(tokens, true, text.length)) if (docs.push(d) > 1) break;
  const doc = docs[0]!;
  if (docs.length > 1) throw fileError(`${src}:${lc.linePos(docs[1]!.range[0]).line}: invalid YAML: a config holds one document (found a second "---")`);
  if (doc.errors.length) {
    const e = doc.errors[0]!;
    throw fileError(`${src}:${lc.linePos(e.pos[0]).line}: invalid YAML: ${clip(e.message.split('\n')[0]!, 200)}`);
  }
  return { doc, lc };
}

/** doc.toJS with aliases bounded; its errors (an alias to a missing anchor, too many aliases) name the alias's line. */
function yamlToJs(doc: YAML.Document.Parsed, lc: YAML.LineCounter, src: string): unknown {
  try {
    return doc.toJS({ maxAliasCount: MAX_YAML_ALIASES });
  } catch (e) {
    // the first alias whose anchor is not defined before it (as the library resolves them), else the first alias
    let at: YAML.Alias | undefined;
    const anchors = new Set<string>();
    YAML.visit(doc, (_, n) => {
      if (YAML.isAlias(n)) {
        at ??= n;
        if (!anchors.has(n.source)) return ((at = n), YAML.visit.BREAK);
      } else if (YAML.isNode(n) && n.anchor) anchors.add(n.anchor);
    });
    const line = at?.range ? `:${lc.linePos(at.range[0]).line}` : '';
    throw fileError(`${src}${line}: invalid YAML: ${clip((e as Error).message.split('\n')[0]!, 200)}`);
  }
}

/**
 * Parse YAML text, merge overrides (dotted keys like 'train.lr', or a group like 'data.buckets' with a mapping;
 * undefined values ignored; a string given for a key that is not a string is read as a YAML scalar, as a command
 * line or an environment variable gives it: '1e-4', 'true', 'null', '[512, 768]', sizes as '768x512'), fill the
 * method's defaults and validate types, ranges and cross-field rules. Every problem is an SdtuneError('usage')
 * naming the key (with its file line, or how it was given: `options.labels`), expected vs found.
 */
export function resolveConfig(method: Method, yamlText: string | null, overrides: Record<string, unknown>, options: string | ResolveOptions = {}): TrainConfig {
  const o: ResolveOptions = typeof options === 'string' ? { source: options } : options;
  const source = o.source;
  const m = getMethod(method); // an unknown method lists the registered ones
  const idx = keyIndex();
  const src = source ?? '<config>';
  const origin: Origin = new Map();
  const flat = new Map<string, unknown>();
  const problems: string[] = [...(o.problems ?? [])]; // everything wrong with the file and the overrides, reported together

  // 1. the file
  if (yamlText !== null && yamlText.trim() !== '') {
    const { doc, lc } = parseYamlBounded(yamlText, src);
    for (const [k, v] of keyLines(doc, lc, src)) origin.set(k, v);
    const root = yamlToJs(doc, lc, src);
    if (root !== null && !isMap(root)) throw usageError(`${src}: expected a mapping with sections ${idx.sections.join(', ')}, found ${show(root)}`);
    for (const [k, v] of Object.entries(root ?? {})) {
      if (isMethod(k) && k !== method) {
        throw usageError(`${at(origin, k)}the config has a ${k} section, but this command trains ${method}: a config holds exactly one method section, the command's`);
      }
      addFlat(idx, flat, k, v, method, origin, problems);
    }
  }

  // 2. the overrides
  for (const [key, raw] of Object.entries(overrides)) {
    if (raw === undefined) continue;
    const label = o.labels?.[key] ?? `override ${key}`;
    if (!idx.leaves.has(key) && !idx.groups.has(key)) {
      problems.push(unknownKey(idx, key, method, new Map([[key, label]])).message);
      continue;
    }
    if (isMethod(sectionOf(key)) && sectionOf(key) !== method) {
      problems.push(`${label}: ${key} is a ${sectionOf(key)} setting, but this command trains ${method}`);
      continue;
    }
    origin.set(key, label);
    if (idx.groups.has(key)) addFlat(idx, flat, key, raw, method, origin, problems);
    else flat.set(key, coerceFlag(idx.leaves.get(key)!, raw));
  }

  // 3. defaults (the schema's, or the method's own for shared keys), required keys, types and ranges
  const cfg: Record<string, unknown> = {};
  const defaults = typeof m.defaults === 'function' ? m.defaults((key) => flat.get(key)) : m.defaults;
  for (const [key, schema] of idx.leaves) {
    if (isMethod(sectionOf(key)) && sectionOf(key) !== method) continue;
    const v = flat.has(key) ? flat.get(key) : defaults?.[key];
    const r = parseLeaf(schema, v);
    if (r.ok) {
      setPath(cfg, key, r.value);
    } else if (v === undefined) {
      const other = o.setWith?.(key);
      problems.push(`${key} is required (set it in the config${other ? ` or with ${other}` : ''})`);
    } else {
      const hint = leafKind(schema) === 'strs' && typeof v === 'string' ? ' (write a YAML list, one "- item" per line)' : '';
      problems.push(`${at(origin, key)}${key}: expected ${expected(schema)}, found ${show(v)}${hint}`);
    }
  }
  // one line per problem; the CLI prints each as its own "error: ..." line
  if (problems.length) throw usageError(problems.join('\nerror: '));
  const c = cfg as unknown as TrainConfig;

  // 4. rules between keys and beyond types: the shared ones, then the method's
  crossCheck(c, m, origin);

  // 5. derived values
  c.output.name ??= m.defaultName?.(c) ?? (source ? path.basename(source).replace(/\.(ya?ml)$/i, '') : method);
  c.output.dir ??= `output/${c.output.name}`;
  // `tensorboard --logdir <logging_dir>` lists the runs by name
  c.output.log_dir ??= c.output.logging_dir ? path.posix.join(c.output.logging_dir.replace(/\\/g, '/'), c.output.name) : path.posix.join(c.output.dir.replace(/\\/g, '/'), 'logs');
  c.data.cache_dir ??= c.output.dir;
  return c;
}

/** Checks that involve several keys or more than a type. */
function crossCheck(c: TrainConfig, m: MethodEntry, origin: Origin): void {
  const fail = (key: string, msg: string): never => {
    throw usageError(`${at(origin, key)}${msg}`);
  };
  const nonEmpty = (key: string, v: string) => {
    if (v.trim() === '') fail(key, `${key}: expected a non-empty string, found ${show(v)}`);
  };
  nonEmpty('model.path', c.model.path);
  nonEmpty('data.dir', c.data.dir);
  const { train: t, data: d, output: o } = c;

  if (t.mixed_precision !== 'no') {
    const msg = `train.mixed_precision: ${show(t.mixed_precision)} is not supported: TensorFlow.js trains in float32; use "no" (output.save_precision still writes fp16 files)`;
    if (['fp16', 'bf16', 'fp8'].includes(t.mixed_precision)) throw new SdtuneError('unsupported', `${at(origin, 'train.mixed_precision')}${msg}`);
    fail('train.mixed_precision', `train.mixed_precision: expected "no", found ${show(t.mixed_precision)}`);
  }
  if (t.lr_scheduler === 'warmup_stable_decay' && t.max_steps !== null && t.lr_warmup_steps + t.lr_decay_steps > t.max_steps) {
    fail('train.lr_decay_steps', `train.lr_warmup_steps (${t.lr_warmup_steps}) + train.lr_decay_steps (${t.lr_decay_steps}) exceed train.max_steps (${t.max_steps})`);
  }
  if (t.lr_decay_steps > 0 && t.lr_scheduler !== 'warmup_stable_decay') {
    fail('train.lr_decay_steps', `train.lr_decay_steps is set but train.lr_scheduler is "${t.lr_scheduler}" (lr_decay_steps is for "warmup_stable_decay")`);
  }
  if (t.lr_scheduler === 'constant' && t.lr_warmup_steps > 0) {
    fail('train.lr_warmup_steps', `train.lr_warmup_steps is ${t.lr_warmup_steps} but train.lr_scheduler "constant" has no warmup (use "constant_with_warmup")`);
  }
  if (t.max_steps !== null && t.lr_warmup_steps > t.max_steps) {
    fail('train.lr_warmup_steps', `train.lr_warmup_steps (${t.lr_warmup_steps}) exceeds train.max_steps (${t.max_steps})`);
  }
  if (!d.caption_extension.startsWith('.') || d.caption_extension.length < 2) {
    fail('data.caption_extension', `data.caption_extension: expected an extension starting with "." (e.g. ".txt"), found ${show(d.caption_extension)}`);
  }
  const bad = d.templates?.find((s) => !s.includes('{}'));
  if (bad !== undefined) fail('data.templates', `data.templates: every template needs {} where the token goes, found ${show(bad)}`);
  const b = d.buckets;
  if (b.min_side > b.max_side) fail('data.buckets.min_side', `data.buckets.min_side (${b.min_side}) exceeds data.buckets.max_side (${b.max_side})`);
  if (d.resolution) checkBucketRange(d.resolution, b, at(origin, 'data.resolution'));
  if (o.sample_every !== null && o.sample_prompts.length === 0) {
    fail('output.sample_every', 'output.sample_every is set but output.sample_prompts is empty (list the prompts to sample)');
  }
  if (o.eval_every !== null && o.eval_prompts.length === 0 && o.eval_grid === null) {
    fail('output.eval_every', 'output.eval_every is set but there is nothing to judge (set output.eval_prompts or output.eval_grid)');
  }
  if (o.sample_sampler !== null) {
    try {
      o.sample_sampler = resolveSampler(o.sample_sampler);
    } catch (e) {
      fail('output.sample_sampler', `output.sample_sampler: ${(e as Error).message}`);
    }
  }
  for (const key of ['output.name', 'output.dir', 'output.log_dir', 'output.logging_dir', 'data.cache_dir'] as const) {
    const [sec, k] = key.split('.') as ['output' | 'data', string];
    const v = (c[sec] as Record<string, unknown>)[k];
    if (v === '' || (key === 'output.name' && typeof v === 'string' && (/[/\\]/.test(v) || v === '.' || v === '..'))) {
      fail(key, `${key}: expected ${key === 'output.name' ? 'a file name without / or \\' : 'a non-empty path'}, found ${show(v)}`);
    }
  }
  m.check?.(c, fail);
}

/** With buckets on, the resolution must lie within their side range. */
function checkBucketRange([w, h]: [number, number], b: TrainConfig['data']['buckets'], where: string): void {
  if (b.enabled && (Math.min(w, h) < b.min_side || Math.max(w, h) > b.max_side)) {
    throw usageError(`${where}data.resolution ${w}x${h} must lie within data.buckets.min_side..max_side (${b.min_side}..${b.max_side}) when buckets are enabled`);
  }
}

/** A config whose model-dependent defaults are filled in (what the loop trains with and saves). */
export type ModelResolvedConfig = TrainConfig & { data: TrainConfig['data'] & { resolution: [number, number] } };

/**
 * Fill the defaults that follow the model, once it is loaded: data.resolution null -> the UNet's sample_size x 8
 * (the size the model was trained at, as diffusers' pipelines default to: 512 for SD v1, 64 for the bundled tiny
 * model). Returns a new config; the loop saves this one, so a resume reads back the same resolution.
 */
export function withModelDefaults(c: TrainConfig, unetSampleSize: number, pixelsPerLatent = 8): ModelResolvedConfig {
  if (c.data.resolution) return c as ModelResolvedConfig;
  const side = unetSampleSize * pixelsPerLatent; // the VAE's 2^(levels-1): 8 for SD v1, 4 for the toy world's
  const out = { ...c, data: { ...c.data, resolution: [side, side] as [number, number] } };
  checkBucketRange(out.data.resolution, out.data.buckets, `data.resolution (default: the UNet's sample_size ${unetSampleSize} x ${pixelsPerLatent}): `);
  return out;
}

/** An upscale by more than this (training side / the images' median short side) is warned about. */
export const RESOLUTION_UPSCALE_WARNING = 2;

/**
 * A warning when the training resolution is far above the images' own size: every image is upscaled (no detail is
 * gained) while a step costs as much as at the full resolution (the UNet's work grows with the pixel count).
 * Rule: the resolution's shorter side over the median of the images' shorter sides exceeds
 * RESOLUTION_UPSCALE_WARNING. The suggestion is that median rounded down to a multiple of 8.
 */
export function resolutionWarning(resolution: [number, number], images: readonly { width: number; height: number }[]): string | undefined {
  if (images.length === 0) return undefined;
  const shorts = images.map((i) => Math.min(i.width, i.height)).sort((a, b) => a - b);
  const median = shorts[Math.floor((shorts.length - 1) / 2)];
  const [w, h] = resolution;
  const ratio = Math.min(w, h) / median;
  if (!(ratio > RESOLUTION_UPSCALE_WARNING)) return undefined;
  const largest = images.reduce((a, i) => (i.width * i.height > a.width * a.height ? i : a));
  const suggest = Math.max(8, Math.floor(median / 8) * 8);
  const same = images.every((i) => i.width === largest.width && i.height === largest.height);
  const sizes = same ? `${largest.width}x${largest.height}` : `median short side ${median} px, largest ${largest.width}x${largest.height}`;
  return (
    `data.resolution ${w}x${h} is ${ratio.toFixed(1)}x the images' size (${images.length} images, ${sizes}): every image is ` +
    `upscaled and each step costs as much as at ${w}x${h}; to train at the images' size use --resolution ${suggest}`
  );
}

/** Read a YAML config file (null = overrides only) and resolveConfig it; a missing file is an SdtuneError('file'). */
export async function loadConfigFile(method: Method, file: string | null, overrides: Record<string, unknown>, options: Omit<ResolveOptions, 'source'> = {}): Promise<TrainConfig> {
  if (file === null) return resolveConfig(method, null, overrides, options);
  let text: string;
  try {
    const { size } = await stat(file);
    if (size > MAX_CONFIG_BYTES) throw fileError(`${file}: the config is ${size.toLocaleString('en-US')} bytes, more than the ${MAX_CONFIG_BYTES.toLocaleString('en-US')} a config may have`);
    text = await readFile(file, 'utf8');
  } catch (e) {
    if (e instanceof SdtuneError) throw e;
    throw fileError(`cannot read config ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  return resolveConfig(method, text, overrides, { ...options, source: file });
}

/** YAML of the resolved config (saved next to the outputs as config.resolved.yaml); resolveConfig reads it back to
 *  an identical object. */
export function dumpConfig(c: TrainConfig): string {
  const method = methodNames().find((m) => (c as Record<string, unknown>)[m] !== undefined) ?? 'lora';
  const doc = new YAML.Document(c);
  YAML.visit(doc, {
    Seq(_, n) {
      if (n.items.every((i) => YAML.isScalar(i) && typeof i.value === 'number')) n.flow = true;
    },
  });
  doc.commentBefore = ` sdtune ${method} training config, fully resolved (reusable with --config)`;
  return doc.toString({ lineWidth: 0 });
}

/**
 * How many optimizer steps training runs, as diffusers / kohya count them: batches per epoch = ceil(images x repeats /
 * batch), or, when `bucketSamples` gives the samples of each aspect bucket (repeats already applied, so kohya's
 * per-folder repeats count), the sum of ceil(samples / batch) over buckets; steps per epoch = ceil(batches / gradient
 * accumulation); total = max_steps if set (epochs = ceil(max_steps / steps per epoch)) else steps x epochs.
 */
export function describeSteps(
  c: TrainConfig,
  numImages: number,
  bucketSamples?: number[],
): { totalSteps: number; stepsPerEpoch: number; epochs: number; line: string } {
  if (numImages < 1) throw fileError(`no training images found in ${c.data.dir}`);
  const { batch_size: bs, gradient_accumulation: ga, max_steps: maxSteps } = c.train;
  const r = c.data.repeats;
  const samples = bucketSamples ? bucketSamples.reduce((a, n) => a + n, 0) : numImages * r;
  const batches = bucketSamples ? bucketSamples.reduce((a, n) => a + Math.ceil(n / bs), 0) : Math.ceil(samples / bs);
  const stepsPerEpoch = Math.ceil(batches / ga);
  const totalSteps = maxSteps ?? stepsPerEpoch * c.train.epochs;
  const epochs = maxSteps !== null ? Math.ceil(maxSteps / stepsPerEpoch) : c.train.epochs;
  if (c.train.lr_warmup_steps > totalSteps) {
    throw usageError(`train.lr_warmup_steps (${c.train.lr_warmup_steps}) exceeds the ${totalSteps} training steps`);
  }
  const perEpoch =
    `${numImages} images x ${bucketSamples ? '' : `${r} `}repeats = ${samples} samples / batch ${bs} = ${batches} batches` +
    (bucketSamples && bucketSamples.length > 1 ? ` (over ${bucketSamples.length} buckets)` : '') +
    (ga > 1 ? ` / ${ga} accumulation` : '') +
    ` = ${stepsPerEpoch} steps per epoch`;
  const total = maxSteps !== null ? `max_steps decides: ${totalSteps} steps (${epochs} epochs)` : `x ${epochs} epochs = ${totalSteps} steps`;
  return { totalSteps, stepsPerEpoch, epochs, line: `${perEpoch}; ${total}` };
}
