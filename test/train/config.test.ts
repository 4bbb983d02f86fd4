// Training config: defaults per method, clear errors (unknown keys with suggestions, types, ranges, cross-field
// rules), flag overrides, dump/reload round trip, step arithmetic.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FLAG_KEYS, configOverrides, flagOverrides } from '../../src/cli/train-flags.js';
import { SdtuneError } from '../../src/errors.js';
import { type Method, describeSteps, dumpConfig, loadConfigFile, resolutionWarning, resolveConfig as resolveDotted, withModelDefaults } from '../../src/train/config.js';

/** resolveConfig as the training commands call it: overrides by flag name (or dotted key, as --set gives them)
 *  through the CLI's flag table (src/cli/train-flags.ts), so messages name the flags. */
const resolveConfig = (method: Method, yaml: string | null, flags: Record<string, unknown>, source?: string) => {
  const { overrides, ...named } = configOverrides(method, flags);
  return resolveDotted(method, yaml, overrides, { ...named, source });
};

const BASE = 'model:\n  path: models/sd15\ndata:\n  dir: data/dog\n';
const TI = `${BASE}textual_inversion:\n  token: "<my-logo>"\n  init_word: logo\n`;
/** BASE with extra keys in the data section. */
const withData = (lines: string) => BASE + lines.replace(/^/gm, '  ') + '\n';

/** The SdtuneError that fn throws (fails the test if none). */
function errorOf(fn: () => unknown): SdtuneError {
  try {
    fn();
  } catch (e) {
    if (e instanceof SdtuneError) return e;
    throw e;
  }
  throw new Error('expected an SdtuneError');
}
const usage = (method: Method, yaml: string | null, overrides: Record<string, unknown> = {}, source?: string) => {
  const e = errorOf(() => resolveConfig(method, yaml, overrides, source));
  expect(e.kind).toBe('usage');
  return e.message;
};

describe('defaults', () => {
  it('LoRA: kohya / diffusers defaults, derived paths', () => {
    const c = resolveConfig('lora', BASE, {});
    expect(c.model).toEqual({ path: 'models/sd15', tokenizer: null, config: null, backend: null, prediction_type: null });
    expect(c.data).toMatchObject({ caption_extension: '.txt', metadata: null, repeats: 1, resolution: null, center_crop: false, flip: false });
    expect(c.data.buckets).toEqual({ enabled: false, min_side: 256, max_side: 1024, step: 64 });
    expect(c.data).toMatchObject({ caption_dropout: 0, shuffle_captions: false, keep_tokens: 0, cache_latents: true, templates: null });
    expect(c.train).toEqual({
      max_steps: null, epochs: 1, batch_size: 1, gradient_accumulation: 1, lr: 1e-4, lr_scheduler: 'constant',
      lr_warmup_steps: 0, lr_num_cycles: 1, lr_decay_steps: 0, adam_beta1: 0.9, adam_beta2: 0.999, adam_epsilon: 1e-8, weight_decay: 1e-2,
      max_grad_norm: 1, seed: 42, noise_offset: 0, min_snr_gamma: null, mixed_precision: 'no', gradient_checkpointing: false,
      ema: { enabled: false, decay: 0.9999, min_decay: 0, update_after_step: 0, use_warmup: false, inv_gamma: 1, power: 2 / 3 },
    });
    expect(c.lora).toEqual({ rank: 16, alpha: 8, targets: 'attn', conv_rank: null, conv_alpha: null, text_encoder: false, text_encoder_lr: null, dropout: 0 });
    expect(c.textual_inversion).toBeUndefined();
    expect(c.output).toEqual({
      dir: 'output/lora', name: 'lora', save_every: null, keep_last: 3, save_precision: 'fp16', sample_every: null,
      sample_prompts: [], sample_seed: 42, sample_steps: 20, sample_sampler: null, log_dir: 'output/lora/logs', logging_dir: null, save_as: 'diffusers', export_ema: true, ema_only: false,
      also_diffusers_format: false, eval_prompts: [], eval_grid: null, eval_every: null, eval_seeds: 4, eval_cfg: 3, eval_steps: 20,
    });
    expect(c.data.cache_dir).toBe('output/lora');
  });

  it('textual inversion: A1111 lr and no weight decay, fp32 embeddings, named after the token (not the config file)', () => {
    const c = resolveConfig('textual_inversion', TI, {}, 'configs/some-run.yaml');
    expect(c.train.lr).toBe(5e-3);
    expect(c.train.weight_decay).toBe(0);
    expect(c.textual_inversion).toEqual({ token: '<my-logo>', init_word: 'logo', vectors: 1 });
    expect(c.lora).toBeUndefined();
    expect(c.output).toMatchObject({ name: 'my-logo', dir: 'output/my-logo', log_dir: 'output/my-logo/logs', save_precision: 'fp32' });
    // characters unsafe in file names are dropped; an explicit output.name wins
    const named = (token: string, extra: Record<string, unknown> = {}) => resolveConfig('textual_inversion', TI, { 'textual_inversion.token': token, ...extra }).output.name;
    expect(named('<a/b\\c:d|e?*"f>')).toBe('abcdef');
    expect(named('..<>..')).toBe('embedding');
    expect(named('<con>')).toBe('con_');
    expect(named('Mein-Stil_2')).toBe('Mein-Stil_2');
    expect(named('<my-logo>', { 'output.name': 'logo-v2' })).toBe('logo-v2');
  });

  it('--logdir (kohya logging_dir) is a folder of TensorBoard runs, this one named after output.name', () => {
    expect(resolveConfig('lora', BASE, { logdir: 'runs', name: 'style-v2' }).output).toMatchObject({ logging_dir: 'runs', log_dir: 'runs/style-v2' });
    expect(resolveConfig('lora', `${BASE}logging_dir: tb\n`.replace('logging_dir', 'output:\n  logging_dir'), {}).output.log_dir).toBe('tb/lora');
  });

  it('explicit values win over derived ones', () => {
    const c = resolveConfig('lora', `${withData('cache_dir: /cache')}output:\n  dir: /tmp/run\n  log_dir: /tmp/tb\n`, {});
    expect(c.output).toMatchObject({ dir: '/tmp/run', name: 'lora', log_dir: '/tmp/tb' });
    expect(c.data.cache_dir).toBe('/cache');
  });
});

describe('errors name the key, expected vs found', () => {
  it('unknown keys: kohya / diffusers names and typos get a suggestion, with the file line', () => {
    expect(usage('lora', `${BASE}train:\n  learning_rate: 1e-4\n`, {}, 'my.yaml')).toBe('my.yaml:6: unknown key train.learning_rate (did you mean train.lr?)');
    expect(usage('lora', `${BASE}train:\n  lr_schedular: cosine\n`)).toMatch(/unknown key train.lr_schedular \(did you mean train.lr_scheduler\?\)/);
    expect(usage('lora', `${BASE}train:\n  rank: 4\n`)).toMatch(/unknown key train.rank \(did you mean lora.rank\?\)/);
    expect(usage('lora', `${BASE}lora:\n  network_dim: 4\n`)).toMatch(/did you mean lora.rank\?/);
    expect(usage('lora', `${BASE}gradient_checkpointing: true\n`)).toMatch(/unknown key gradient_checkpointing \(did you mean train.gradient_checkpointing\?\)/);
    expect(usage('lora', `${BASE}training:\n  lr: 1\n`)).toMatch(/unknown key training \(did you mean train\?\)/);
    expect(usage('lora', withData('buckets:\n  enable: true'))).toMatch(/did you mean data.buckets.enabled\?/);
    expect(usage('textual_inversion', `${BASE}textual_inversion:\n  placeholder_token: x\n`)).toMatch(/did you mean textual_inversion.token\?/);
    expect(usage('lora', `${BASE}train:\n  optimizer_type: AdamW8bit\n`)).toMatch(/unknown key train.optimizer_type \(sdtune always uses AdamW/);
    expect(usage('lora', `${BASE}train:\n  zzzzzz: 1\n`)).toMatch(/unknown key train.zzzzzz \(valid keys in train: max_steps, epochs, /);
  });

  it('wrong types and ranges', () => {
    expect(usage('lora', `${BASE}train:\n  lr: fast\n`, {}, 'a.yaml')).toBe('a.yaml:6: train.lr: expected a number > 0, found "fast"');
    expect(usage('lora', `${BASE}lora:\n  rank: 0\n`)).toMatch(/lora.rank: expected an integer >= 1, found 0$/);
    expect(usage('lora', `${BASE}lora:\n  rank: 4.5\n`)).toMatch(/lora.rank: expected an integer >= 1, found 4.5$/);
    expect(usage('lora', withData('resolution: 500'))).toMatch(
      /data.resolution: expected a size in pixels, multiple of 8: 512 or \[width, height\], or null for the model's own size, found 500/,
    );
    expect(usage('lora', `${BASE}train:\n  lr_scheduler: cosin\n`)).toMatch(/train.lr_scheduler: expected one of "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "warmup_stable_decay", found "cosin"/);
    expect(usage('lora', `${BASE}train:\n  adam_beta2: 1\n`)).toMatch(/train.adam_beta2: expected a number in \[0, 1\), found 1/);
    expect(usage('lora', withData('flip: yes'))).toMatch(/data.flip: expected true or false, found "yes"/);
    expect(usage('lora', `${BASE}train: 5\n`)).toMatch(/train: expected a mapping with keys max_steps, epochs, .*found 5/);
    expect(usage('lora', `${BASE}output:\n  sample_sampler: nope\n`)).toMatch(/output.sample_sampler: unknown sampler "nope"/);
  });

  it('required keys name the flag that sets them', () => {
    expect(usage('lora', 'data:\n  dir: d\n')).toBe('model.path is required (set it in the config or with --model)');
    expect(usage('textual_inversion', BASE)).toBe(
      'textual_inversion.token is required (set it in the config or with --token)\nerror: textual_inversion.init_word is required (set it in the config or with --init-word)',
    );
  });

  it('every problem of a file and its flags is reported at once, one "error:" line each', () => {
    const msg = usage('lora', `${BASE}train:\n  lr: fast\n  batch_size: 0\n  learnin_rate: 1\nlora:\n  rank: x\n`, { 'max-steps': 'many', bogus: 1 }, 'a.yaml');
    const lines = msg.split('\nerror: ');
    expect(lines).toHaveLength(6);
    expect(lines).toEqual(
      expect.arrayContaining([
        'a.yaml:6: train.lr: expected a number > 0, found "fast"',
        'a.yaml:7: train.batch_size: expected an integer >= 1, found 0',
        expect.stringMatching(/^a.yaml:8: unknown key train.learnin_rate \(/),
        'a.yaml:10: lora.rank: expected an integer >= 1, found "x"',
        expect.stringMatching(/^--max-steps: train.max_steps: expected an integer >= 1 or null, found "many"/),
        expect.stringMatching(/^unknown option --bogus/),
      ]),
    );
  });

  it('cross-field rules', () => {
    expect(usage('lora', `${TI}lora:\n  rank: 4\n`)).toMatch(/has a textual_inversion section, but this command trains lora/);
    expect(usage('textual_inversion', `${TI}lora:\n`)).toMatch(/has a lora section, but this command trains textual_inversion/);
    expect(usage('lora', BASE, { rank: 4, token: 'x' })).toMatch(/--token: textual_inversion.token is a textual_inversion setting, but this command trains lora/);
    expect(usage('lora', `${BASE}train:\n  lr_warmup_steps: 100\n`)).toMatch(/lr_warmup_steps is 100 but train.lr_scheduler "constant" has no warmup/);
    expect(usage('lora', `${BASE}train:\n  lr_scheduler: linear\n  lr_warmup_steps: 100\n  max_steps: 50\n`)).toMatch(/train.lr_warmup_steps \(100\) exceeds train.max_steps \(50\)/);
    expect(usage('lora', `${BASE}lora:\n  text_encoder_lr: 1e-5\n`)).toMatch(/lora.text_encoder_lr is set but lora.text_encoder is false/);
    expect(usage('lora', `${BASE}output:\n  sample_every: 100\n`)).toMatch(/sample_prompts is empty/);
    expect(usage('lora', BASE, { 'data.buckets': { enabled: true, min_side: 640 }, resolution: 512 })).toMatch(/data.resolution 512x512 must lie within data.buckets/);
    expect(usage('lora', BASE, { 'data.templates': ['a photo'] })).toMatch(/data.templates: every template needs \{\}/);
    expect(usage('lora', BASE, { 'data.caption_extension': 'txt' })).toMatch(/starting with "."/);
    expect(usage('textual_inversion', TI, { token: 'my logo' })).toMatch(/--token: textual_inversion.token: expected one word/);
    expect(usage('textual_inversion', TI, { token: 'logo' })).toMatch(/must differ from textual_inversion.init_word/);
    expect(usage('lora', BASE, { name: 'a/b' })).toMatch(/output.name: expected a file name/);
  });

  it('LoCon keys: kohya conv_dim / conv_alpha / network_args point to lora.conv_rank / conv_alpha; types; only with conv targets', () => {
    const LOCON = `${BASE}lora:\n  targets: attn+ff+conv\n`;
    expect(usage('lora', `${LOCON}  conv_dim: 8\n`, {}, 'k.yaml')).toBe('k.yaml:7: unknown key lora.conv_dim (did you mean lora.conv_rank?)');
    expect(usage('lora', `${BASE}conv_alpha: 1\n`)).toMatch(/unknown key conv_alpha \(did you mean lora.conv_alpha\?\)/);
    expect(usage('lora', `${LOCON}  network_args: [conv_dim=8]\n`)).toMatch(/unknown key lora.network_args \(kohya conv_dim \/ conv_alpha are lora.conv_rank \/ lora.conv_alpha/);
    expect(usage('lora', `${LOCON}  conv_rank: 2.5\n`)).toMatch(/lora.conv_rank: expected an integer >= 1 or null, found 2.5$/);
    expect(usage('lora', LOCON, { 'conv-alpha': '0' })).toBe('--conv-alpha: lora.conv_alpha: expected a number > 0 or null, found 0');
    expect(usage('lora', BASE, { 'conv-rank': 4 })).toBe('--conv-rank: lora.conv_rank is set but lora.targets "attn" adapts no 3x3 convolutions (use lora.targets: attn+ff+conv)');
    expect(usage('lora', `${BASE}lora:\n  targets: attn+ff\n  conv_alpha: 1\n`, {}, 'k.yaml')).toMatch(/^k.yaml:7: lora.conv_alpha is set but lora.targets "attn\+ff"/);
    expect(resolveConfig('lora', LOCON, { 'conv-rank': '8', 'conv-alpha': '1' }).lora).toMatchObject({ targets: 'attn+ff+conv', conv_rank: 8, conv_alpha: 1 });
    expect(resolveConfig('lora', LOCON, {}).lora).toMatchObject({ conv_rank: null, conv_alpha: null }); // null: lora.rank / lora.alpha
    expect(usage('textual_inversion', TI, { 'conv-rank': 2 })).toMatch(/--conv-rank: lora.conv_rank is a lora setting, but this command trains textual_inversion/);
  });

  it('mixed precision is refused as unsupported, with the reason', () => {
    const e = errorOf(() => resolveConfig('lora', `${BASE}train:\n  mixed_precision: fp16\n`, {}));
    expect(e.kind).toBe('unsupported');
    expect(e.message).toMatch(/train.mixed_precision: "fp16" is not supported: TensorFlow.js trains in float32/);
  });

  it('invalid YAML and unreadable files are file errors with the line', async () => {
    const e = errorOf(() => resolveConfig('lora', 'model:\n  path: [unclosed\n', {}, 'x.yaml'));
    expect(e.kind).toBe('file');
    expect(e.message).toMatch(/^x.yaml:\d+: invalid YAML/);
    await expect(loadConfigFile('lora', '/nonexistent/sdtune.yaml', {})).rejects.toMatchObject({ kind: 'file', message: /cannot read config \/nonexistent\/sdtune.yaml: ENOENT/ });
  });
});

describe('hostile YAML: bounded work, one-line file errors with the line', () => {
  const fileErr = (yaml: string) => {
    const e = errorOf(() => resolveConfig('lora', yaml, {}, 'x.yaml'));
    expect(e.kind, e.message).toBe('file');
    expect(e.message).not.toContain('\n');
    return e.message;
  };
  it('an alias to a missing anchor and a billion-laughs bomb (errors of doc.toJS, were "internal error")', () => {
    expect(fileErr(`${BASE}train:\n  lr: *nope\n`)).toBe('x.yaml:6: invalid YAML: Unresolved alias (the anchor must be set before the alias): nope');
    const lol = ['a: &a [x, x, x, x, x, x, x, x, x]'];
    for (const [k, prev] of [['b', 'a'], ['c', 'b'], ['d', 'c'], ['e', 'd'], ['f', 'e'], ['g', 'f'], ['h', 'g'], ['i', 'h']]) lol.push(`${k}: &${k} [${new Array(9).fill(`*${prev}`).join(', ')}]`);
    expect(fileErr(`${BASE}${lol.join('\n')}\n`)).toMatch(/^x\.yaml:\d+: invalid YAML: Excessive alias count indicates a resource exhaustion attack$/);
  });
  it('deep nesting (flow, compact "- - -", indentation) is refused before the recursive composer sees it', () => {
    expect(fileErr(`${BASE}x: ${'['.repeat(200_000)}${']'.repeat(200_000)}\n`)).toBe('x.yaml:5: invalid YAML: nested more than 64 levels deep');
    expect(fileErr(`${BASE}x:\n${'- '.repeat(200_000)}1\n`)).toBe('x.yaml:6: invalid YAML: nested more than 64 levels deep');
    const stairs = Array.from({ length: 300 }, (_, i) => `${' '.repeat(i)}k${i}:`).join('\n');
    expect(fileErr(`${BASE}${stairs} 1\n`)).toBe('x.yaml:69: invalid YAML: nested more than 64 levels deep');
    // 64 levels is fine (and reported as an unknown key, not as YAML)
    expect(usage('lora', `${BASE}x: ${'['.repeat(63)}${']'.repeat(63)}\n`)).toMatch(/unknown key x/);
  });
  it('100,000 keys (the yaml library checks duplicates quadratically: > 300 s) and over 1 MB are refused before parsing', async () => {
    const keys = Array.from({ length: 100_000 }, (_, i) => `k${i}: 1`).join('\n');
    expect(fileErr(keys)).toBe('x.yaml:1001: the config has more than 1000 keys (a training config has under 100)');
    const big = `${BASE}# ${'x'.repeat(1 << 20)}\n`;
    expect(fileErr(big)).toMatch(/^x\.yaml: the config is 1,048,6\d\d characters, more than the 1,048,576 a config may have$/);
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdtune-cfg-'));
    try {
      await writeFile(path.join(dir, 'big.yaml'), big);
      await expect(loadConfigFile('lora', path.join(dir, 'big.yaml'), {})).rejects.toMatchObject({ kind: 'file', message: /big\.yaml: the config is [\d,]+ bytes, more than the 1,048,576/ });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
  it('other parser errors keep their line; a second document is refused; huge keys and values are cut short', () => {
    expect(fileErr(`${BASE}a: 1\n---\nb: 2\n`)).toBe('x.yaml:6: invalid YAML: a config holds one document (found a second "---")');
    expect(fileErr(`${BASE}model:\n  path: again\n`)).toMatch(/^x\.yaml:5: invalid YAML: Map keys must be unique/);
    const long = usage('lora', `${BASE}train:\n  "${'k'.repeat(1000)}\\nz": 1\n  lr: [${new Array(10_000).fill(1).join(', ')}]\n`);
    for (const line of long.split('\n')) expect(line.length).toBeLessThan(500); // two problems, one short line each
    expect(long).toMatch(/unknown key train\.kkk+\.\.\./);
    expect(long).toMatch(/train\.lr: expected a number > 0, found \[1,1,1,[1,]*\.\.\./);
  });
});

describe('overrides', () => {
  it('short flags and dotted keys override the file; command-line strings are read as YAML scalars', () => {
    const c = resolveConfig('lora', `${BASE}train:\n  lr: 1e-4\n  seed: 1\n`, {
      lr: 3e-4, 'max-steps': '500', 'train.seed': '7', resolution: '768x512', 'sample-prompt': 'a dog', 'sample-every': 50,
      'data.buckets': { enabled: true }, 'lora.text_encoder': 'true', 'model.prediction_type': 'null', alpha: undefined,
    });
    expect(c.train).toMatchObject({ lr: 3e-4, max_steps: 500, seed: 7 });
    expect(c.data.resolution).toEqual([768, 512]);
    expect(c.data.buckets.enabled).toBe(true);
    expect(c.output.sample_prompts).toEqual(['a dog']);
    // a flow list from the command line is a list ("[]" clears one); anything else is one item
    expect(resolveConfig('lora', null, { model: 'm', data: 'd', 'output.eval_prompts': '[a red star, a sks => blue circle]' }).output.eval_prompts).toEqual(['a red star', 'a sks => blue circle']);
    expect(resolveConfig('lora', `${BASE}output:\n  eval_prompts: [a red star]\n`, { 'output.eval_prompts': '[]' }).output.eval_prompts).toEqual([]);
    expect(resolveConfig('lora', null, { model: 'm', data: 'd', 'output.sample_prompts': '[a dog' }).output.sample_prompts).toEqual(['[a dog']);
    // "null" clears a nullable string key (dreambooth.class_prompt), and stays a string where null is not allowed
    expect(resolveConfig('dreambooth', 'dreambooth:\n  class_prompt: a star\n', { model: 'm', data: 'd', 'dreambooth.class_prompt': 'null', 'dreambooth.with_prior_preservation': 'false' }).dreambooth!.class_prompt).toBeNull();
    expect(resolveConfig('lora', null, { model: 'm', data: 'd', 'output.sample_prompts': 'null' }).output.sample_prompts).toEqual(['null']);
    expect(c.lora).toMatchObject({ text_encoder: true, alpha: 8 });
    expect(c.model.prediction_type).toBeNull();
    expect(resolveConfig('lora', null, { model: 'm', data: 'd', resolution: [640, 448] }).data.resolution).toEqual([640, 448]);
    expect(resolveConfig('lora', `${BASE}train:\n  gradient_checkpointing: true\n`, {}).train.gradient_checkpointing).toBe(true);
    expect(resolveConfig('lora', BASE, { 'gradient-checkpointing': true }).train.gradient_checkpointing).toBe(true);
    expect(usage('lora', BASE, { 'gradient-checkpointing': 'yes' })).toBe('--gradient-checkpointing: train.gradient_checkpointing: expected true or false, found "yes"');
  });

  it('every FLAG_KEYS target is a real key; bad flags and keys are named', () => {
    for (const key of Object.values(FLAG_KEYS)) expect(key).toMatch(/^(model|data|train|lora|textual_inversion|finetune|dreambooth|hypernetwork|vae|output)\.\w+$/);
    expect(usage('lora', BASE, { 'max-step': 5 })).toMatch(/unknown option --max-step \(did you mean --max-steps\?\)/);
    expect(usage('lora', BASE, { 'train.learning_rate': 5 })).toBe('override train.learning_rate: unknown key train.learning_rate (did you mean train.lr?)');
    expect(usage('lora', BASE, { 'max-steps': 'many' })).toBe('--max-steps: train.max_steps: expected an integer >= 1 or null, found "many"');
  });

  it('flagOverrides picks the config flags, --set pairs, --config and --resume from an argv', () => {
    const argv = { _: [], $0: 'sdtune', config: 'c.yaml', resume: 'out/ckpt-100', lr: 1e-3, maxSteps: 9, 'max-steps': 9, rank: undefined, set: ['train.seed=3', 'data.flip=true'] };
    const r = flagOverrides(argv);
    expect(r).toEqual({ configPath: 'c.yaml', resume: 'out/ckpt-100', overrides: { 'train.seed': '3', 'data.flip': 'true', lr: 1e-3, 'max-steps': 9 } });
    const c = resolveConfig('lora', BASE, r.overrides);
    expect(c.train).toMatchObject({ seed: 3, lr: 1e-3, max_steps: 9 });
    expect(c.data.flip).toBe(true);
    expect(() => flagOverrides({ set: 'oops' })).toThrow(/--set oops: expected key=value/);
  });
});

describe('dumpConfig', () => {
  const dir = mkdtemp(path.join(os.tmpdir(), 'sdtune-config-'));
  afterAll(async () => rm(await dir, { recursive: true, force: true }));

  it('round trips through resolveConfig for both methods, with every kind of value', async () => {
    const lora = resolveConfig('lora', `${BASE}lora:\n  targets: attn+ff+conv\n  conv_rank: 2\n  text_encoder: true\n  text_encoder_lr: 5e-5\n`, {
      resolution: [768, 512], 'sample-prompt': 'a "quoted": prompt, with # hash', 'sample-every': 10, 'output.sample_sampler': 'Euler a',
      'train.min_snr_gamma': 5, 'train.adam_epsilon': 1e-10, 'gradient-checkpointing': true, 'data.templates': ['a {}'], 'output.keep_last': null, seed: 1234567,
    }, 'configs/run.yml');
    expect(lora.output.sample_sampler).toBe('euler_a');
    const ti = resolveConfig('textual_inversion', TI, { vectors: 4, 'max-steps': 3000 });
    for (const [method, c] of [['lora', lora], ['textual_inversion', ti]] as const) {
      const text = dumpConfig(c);
      expect(text.startsWith(`# sdtune ${method} training config`)).toBe(true);
      expect(resolveConfig(method, text, {})).toEqual(c);
      const file = path.join(await dir, 'config.resolved.yaml');
      await writeFile(file, text);
      expect(await loadConfigFile(method, file, {})).toEqual(c);
    }
    expect(dumpConfig(lora)).toMatch(/resolution: \[ 768, 512 \]/);
  });
});

describe('describeSteps', () => {
  const cfg = (o: Record<string, unknown>) => resolveConfig('lora', BASE, o);

  it('images x repeats / batch / accumulation x epochs, as diffusers and kohya count optimizer steps', () => {
    const r = describeSteps(cfg({ repeats: 10, 'batch-size': 4, 'gradient-accumulation': 2, epochs: 3 }), 12);
    expect(r).toEqual({
      totalSteps: 45, stepsPerEpoch: 15, epochs: 3,
      line: '12 images x 10 repeats = 120 samples / batch 4 = 30 batches / 2 accumulation = 15 steps per epoch; x 3 epochs = 45 steps',
    });
    // partial batches and partial accumulations round up
    expect(describeSteps(cfg({ 'batch-size': 2, 'gradient-accumulation': 2 }), 5)).toMatchObject({ stepsPerEpoch: 2, totalSteps: 2 });
  });

  it('max_steps decides over epochs', () => {
    const r = describeSteps(cfg({ 'max-steps': 100, repeats: 10, 'batch-size': 4, 'gradient-accumulation': 2, epochs: 3 }), 12);
    expect(r).toMatchObject({ totalSteps: 100, stepsPerEpoch: 15, epochs: 7 });
    expect(r.line).toMatch(/max_steps decides: 100 steps \(7 epochs\)$/);
  });

  it('counts batches per bucket, and refuses impossible warmups or no images', () => {
    expect(describeSteps(cfg({ 'batch-size': 2 }), 5, [3, 2])).toMatchObject({ stepsPerEpoch: 3 });
    expect(describeSteps(cfg({ 'batch-size': 2 }), 5, [3, 2]).line).toMatch(/= 3 batches \(over 2 buckets\)/);
    expect(errorOf(() => describeSteps(cfg({ 'lr-scheduler': 'linear', 'lr-warmup-steps': 50 }), 10)).message).toMatch(/lr_warmup_steps \(50\) exceeds the 10 training steps/);
    expect(errorOf(() => describeSteps(cfg({}), 0)).kind).toBe('file');
  });
});

describe('defaults that follow the model and the data', () => {
  it('data.resolution null = the UNet sample_size x 8, written into the config; explicit sizes stay', () => {
    const c = resolveConfig('lora', BASE, {});
    expect(c.data.resolution).toBeNull();
    const r = withModelDefaults(c, 64);
    expect(r.data.resolution).toEqual([512, 512]);
    expect(c.data.resolution).toBeNull(); // a new object
    expect(dumpConfig(r)).toMatch(/resolution: \[ 512, 512 \]/);
    expect(resolveConfig('lora', dumpConfig(r), {}).data.resolution).toEqual([512, 512]);
    expect(withModelDefaults(resolveConfig('lora', BASE, { resolution: '768x512' }), 64).data.resolution).toEqual([768, 512]);
    expect(withModelDefaults(resolveConfig('lora', BASE, { resolution: null }), 8).data.resolution).toEqual([64, 64]);
    // the toy world's VAE has 4 pixels per latent: sample_size 8 -> 32x32
    expect(withModelDefaults(resolveConfig('lora', BASE, { resolution: null }), 8, 4).data.resolution).toEqual([32, 32]);
    // the bucket range is checked once the default is known
    const buckets = resolveConfig('lora', BASE, { 'data.buckets': { enabled: true, min_side: 640 } });
    expect(errorOf(() => withModelDefaults(buckets, 64)).message).toMatch(/data.resolution \(default: the UNet's sample_size 64 x 8\): data.resolution 512x512 must lie within/);
  });

  it('warns when the resolution is more than 2x the images\' median short side, suggesting --resolution', () => {
    const logo = Array.from({ length: 8 }, () => ({ width: 64, height: 64 }));
    expect(resolutionWarning([512, 512], logo)).toBe(
      "data.resolution 512x512 is 8.0x the images' size (8 images, 64x64): every image is upscaled and each step costs as much as at 512x512; to train at the images' size use --resolution 64",
    );
    expect(resolutionWarning([128, 128], logo)).toBeUndefined(); // 2x: fine
    expect(resolutionWarning([64, 64], logo)).toBeUndefined();
    expect(resolutionWarning([512, 512], [])).toBeUndefined();
    const mixed = [{ width: 100, height: 150 }, { width: 1024, height: 768 }, { width: 200, height: 90 }];
    expect(resolutionWarning([512, 512], mixed)).toMatch(/5.1x the images' size \(3 images, median short side 100 px, largest 1024x768\).*--resolution 96$/);
  });
});
