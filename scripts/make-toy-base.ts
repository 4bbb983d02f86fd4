/**
 * Builds the toy base checkpoints/toy-sd/ from nothing, with sdtune's own training loop (shared/toyworld.md, issue 11):
 *   1. the toy model with random weights (src/data/toy-model.ts) and the toy world written as two captioned folders:
 *      the superset palette (purple and hearts in) for the VAE, the base world (no purple, heart or "sks") for the UNet
 *   2. the VAE (method vae: pixel MSE + 1e-6 KL, Adam 1e-3, batch 32), then its scaling_factor = 1 / std of the latents
 *   3. the UNet from random init (method finetune: AdamW 1e-3, 100 warmup steps, constant, then a half cosine to 0 over
 *      the last 400 steps, batch 64, grad clip 1, 10% caption dropout) with the frozen random text encoder
 *   4. the judges (sdtune eval: 16 prompts x N seeds, DDIM 20) at each CFG, on the files as bundled
 *   5. the diffusers folder (fp16 by default) with a model card README.md and eval.json, written atomically
 *
 *   npm run make-toy-base -- [--out checkpoints/toy-sd] [--vae-steps 400] [--unet-steps 1800] [--threads N] ...
 *
 * It prints the training loop's progress bars and how long each part took. A quick run of the machinery:
 *   npm run make-toy-base -- --vae-steps 3 --unet-steps 3 --out /tmp/toy-sd --eval-seeds 1 --eval-steps 4
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** Default output folder: the bundled toy base. */
export const TOY_BASE_DIR = path.join(ROOT, 'checkpoints', 'toy-sd');
/** The bundled folder must stay this small (issue 11). */
export const TOY_BASE_MAX_BYTES = 12 * 1024 * 1024;

export interface ToyBaseOptions {
  out?: string;
  /** replace a non-empty `out` */
  overwrite?: boolean;
  /** folder for the worlds, runs and checkpoints (default: a temp folder, removed at the end unless keepWork) */
  work?: string;
  keepWork?: boolean;
  vaeSteps?: number;
  unetSteps?: number;
  vaeBatch?: number;
  unetBatch?: number;
  /** images of the VAE's world (superset palette) and of the UNet's (base world) */
  vaeImages?: number;
  unetImages?: number;
  /** training images the scaling factor is measured on */
  scalingImages?: number;
  /** warmup steps of the UNet (capped at its steps) */
  warmup?: number;
  /** the UNet's last steps, over which its lr falls to 0 (warmup_stable_decay; 0 = constant to the end) */
  unetDecaySteps?: number;
  seed?: number;
  precision?: 'fp16' | 'fp32';
  /** CFG scales the judges run at; seeds per prompt; DDIM steps */
  cfgs?: number[];
  evalSeeds?: number;
  evalSteps?: number;
  /** tfjs backend (default: wasm) */
  backend?: string;
  /** SDTUNE_WASM_THREADS for this run */
  threads?: string;
  quiet?: boolean;
  log?: (line: string) => void;
}

export const TOY_BASE_DEFAULTS = {
  vaeSteps: 400,
  unetSteps: 1800,
  unetDecaySteps: 400,
  vaeBatch: 32,
  unetBatch: 64,
  vaeImages: 20_000,
  unetImages: 8_000,
  scalingImages: 512,
  warmup: 100,
  seed: 0,
  precision: 'fp16',
  cfgs: [1, 3, 5, 7.5],
  evalSeeds: 4,
  evalSteps: 20,
} as const;

/** One CFG's result. */
export interface ToyBaseEval {
  cfg: number;
  correct: number;
  total: number;
  accuracy: number;
  colourAccuracy: number | null;
  shapeAccuracy: number | null;
}

export interface ToyBaseResult {
  out: string;
  /** seconds per part */
  seconds: { world: number; vae: number; unet: number; eval: number; total: number };
  scalingFactor: number;
  steps: { vae: number; unet: number };
  losses: { vae: number[]; unet: number[] };
  evals: ToyBaseEval[];
  bytes: number;
  params: Record<'unet' | 'vae' | 'text_encoder', number>;
  backend: string;
}

const fmtTime = (s: number) => (s < 90 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`);
const pct = (x: number | null) => (x === null ? '-' : `${(100 * x).toFixed(1)}%`);

async function folderBytes(dir: string): Promise<number> {
  let n = 0;
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    n += e.isDirectory() ? await folderBytes(p) : (await stat(p)).size;
  }
  return n;
}

/** Build the toy base (see the module comment). */
export async function makeToyBase(opts: ToyBaseOptions = {}): Promise<ToyBaseResult> {
  const o = { ...TOY_BASE_DEFAULTS, ...Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)) } as typeof TOY_BASE_DEFAULTS & ToyBaseOptions;
  const log = o.log ?? ((l: string) => process.stderr.write(l + '\n'));
  const out = path.resolve(o.out ?? TOY_BASE_DIR);
  for (const [k, v] of Object.entries({ vaeSteps: o.vaeSteps, unetSteps: o.unetSteps, vaeBatch: o.vaeBatch, unetBatch: o.unetBatch, vaeImages: o.vaeImages, unetImages: o.unetImages, evalSeeds: o.evalSeeds, evalSteps: o.evalSteps, scalingImages: o.scalingImages })) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`make-toy-base: ${k} must be a positive integer, got ${v}`);
  }
  if (existsSync(out) && (await readdir(out)).length && !o.overwrite) throw new Error(`make-toy-base: ${out} is not empty; pass --overwrite to replace it`);
  if (o.threads !== undefined) process.env.SDTUNE_WASM_THREADS = o.threads;
  // the library is loaded after SDTUNE_WASM_THREADS is set
  const [{ selectBackend }, { makeToyModel }, { writeToyWorld }, { resolveConfig }, { train }, { loadModel, disposeModel }, { saveModel }, { evaluateModel, formatEvalTable, contactSheet }, { writePng }] = await Promise.all([
    import('../src/runtime/backend.js'),
    import('../src/data/toy-model.js'),
    import('../src/data/toy-world.js'),
    import('../src/train/config.js'),
    import('../src/train/loop.js'),
    import('../src/io/model.js'),
    import('../src/io/convert.js'),
    import('../src/eval/evaluate.js'),
    import('../src/io/png.js'),
  ]);
  const backend = await selectBackend(o.backend ?? 'wasm');
  log(backend.message);
  const work = path.resolve(o.work ?? (await mkdtemp(path.join(tmpdir(), 'sdtune-toy-base-'))));
  const trainOpts = { quiet: o.quiet, log, overwrite: true };
  const since = (t: number) => (performance.now() - t) / 1000;
  try {
    // 1. the random model and the two worlds
    let t = performance.now();
    const random = path.join(work, 'random');
    // a given --work folder is reused: its worlds and a finished VAE are kept, an interrupted UNet run resumes
    const done = path.join(work, 'worlds.done');
    const reuse = Boolean(o.work) && existsSync(done) && (await readFile(done, 'utf8')) === worldKey(o);
    const made = await makeToyModel(random, { precision: 'fp32', overwrite: true });
    const vaeWorld = path.join(work, 'world-vae'), unetWorld = path.join(work, 'world-base');
    let worldSeconds: number;
    if (reuse) {
      log(`[make-toy-base] reusing the worlds in ${work}`);
      worldSeconds = Number(await readFile(`${done}.seconds`, 'utf8').catch(() => 'NaN'));
    } else {
      await writeToyWorld(vaeWorld, o.vaeImages, { seed: o.seed + 1, include: ['purple', 'heart'], overwrite: true, quiet: o.quiet });
      await writeToyWorld(unetWorld, o.unetImages, { seed: o.seed + 2, overwrite: true, quiet: o.quiet });
      worldSeconds = since(t);
      await writeFile(`${done}.seconds`, String(worldSeconds));
      await writeFile(done, worldKey(o));
    }
    if (!Number.isFinite(worldSeconds)) worldSeconds = since(t);
    log(`[make-toy-base] random model (${Object.entries(made.params).map(([k, n]) => `${k} ${n.toLocaleString('en-US')}`).join(', ')} params) and worlds (${o.vaeImages} superset images for the VAE, ${o.unetImages} base images for the UNet): ${fmtTime(worldSeconds)}`);

    // 2. the VAE, then its scaling factor (measured at its export)
    t = performance.now();
    const vaeRun = path.join(work, 'vae-run');
    const vaeCfg = resolveConfig('vae', null, {
      'model.path': random,
      'data.dir': vaeWorld,
      'train.batch_size': o.vaeBatch,
      'train.max_steps': o.vaeSteps,
      'train.seed': o.seed,
      'vae.scaling_images': o.scalingImages,
      'output.save_every': 100,
      'output.dir': vaeRun,
      'output.name': 'model',
    });
    const withVae = path.join(vaeRun, 'model');
    const vaeDone = path.join(vaeRun, 'vae.done');
    // a reused VAE keeps the seconds and losses of the run that trained it
    let vaeR: { steps: number; losses: number[]; seconds: number };
    if (o.work && existsSync(vaeDone)) {
      vaeR = JSON.parse(await readFile(vaeDone, 'utf8')) as typeof vaeR;
      log(`[make-toy-base] reusing the trained VAE in ${withVae}`);
    } else {
      const r = await train('vae', vaeCfg, { ...trainOpts, ...resumeFrom(vaeRun) });
      vaeR = { steps: r.steps, losses: r.losses, seconds: since(t) };
      await writeFile(vaeDone, JSON.stringify(vaeR));
    }
    const vaeSeconds = vaeR.seconds;
    const scalingFactor = JSON.parse(await readFile(path.join(withVae, 'vae', 'config.json'), 'utf8')).scaling_factor as number;
    log(`[make-toy-base] VAE: ${vaeR.steps} steps, loss ${vaeR.losses[0]?.toFixed(4)} -> ${vaeR.losses.at(-1)?.toFixed(4)}, scaling_factor ${scalingFactor.toFixed(4)}: ${fmtTime(vaeSeconds)}`);

    // 3. the UNet from random init, the text encoder frozen
    t = performance.now();
    const unetRun = path.join(work, 'unet-run');
    const unetCfg = resolveConfig('finetune', null, {
      'model.path': withVae,
      'data.dir': unetWorld,
      'data.caption_dropout': 0.1,
      'train.batch_size': o.unetBatch,
      'train.max_steps': o.unetSteps,
      'train.lr': 1e-3,
      // constant after the warmup, then (unetDecaySteps > 0) a half cosine to 0 over the last unetDecaySteps
      'train.lr_scheduler': o.unetDecaySteps > 0 ? 'warmup_stable_decay' : 'constant_with_warmup',
      'train.lr_warmup_steps': Math.min(o.warmup, o.unetSteps),
      ...(o.unetDecaySteps > 0 && { 'train.lr_decay_steps': Math.min(o.unetDecaySteps, o.unetSteps - Math.min(o.warmup, o.unetSteps)) }),
      'train.max_grad_norm': 1,
      'train.seed': o.seed,
      'output.save_every': 100,
      'output.dir': unetRun,
      'output.name': 'model',
    });
    const unetR = await train('finetune', unetCfg, { ...trainOpts, ...resumeFrom(unetRun) });
    // a run resumed from an interrupted build: its steps' time from the TensorBoard log, the earlier process's included
    const unetSeconds = (await loggedStepSeconds(path.join(unetRun, 'logs'), unetR.steps)) ?? since(t);
    log(`[make-toy-base] UNet: ${unetR.steps} steps, loss ${unetR.losses[0]?.toFixed(4)} -> ${unetR.losses.at(-1)?.toFixed(4)}: ${fmtTime(unetSeconds)}`);

    // 4. the bundled files (staged next to `out`), judged as bundled
    t = performance.now();
    const stage = `${out}.tmp-${process.pid}`;
    await rm(stage, { recursive: true, force: true });
    const trained = await loadModel(path.join(unetRun, 'model'));
    try {
      await saveModel(trained, stage, { to: 'diffusers', precision: o.precision });
    } finally {
      disposeModel(trained);
    }
    const bundled = await loadModel(stage);
    const evals: ToyBaseEval[] = [];
    const tables: string[] = [];
    let best: { cfg: number; images: Uint8Array[][]; correct: boolean[][]; accuracy: number } | undefined;
    try {
      for (const cfg of o.cfgs) {
        const r = await evaluateModel({ model: bundled, grid: 'colours x shapes', seeds: o.evalSeeds, cfg, steps: o.evalSteps, sampler: 'ddim', quiet: o.quiet, log });
        const ov = r.report.overall;
        evals.push({ cfg, correct: ov.correct, total: ov.total, accuracy: ov.accuracy, colourAccuracy: ov.colourAccuracy, shapeAccuracy: ov.shapeAccuracy });
        tables.push(formatEvalTable({ ...r.report, model: 'checkpoints/toy-sd' }));
        log(`[make-toy-base] eval cfg ${cfg}: ${ov.correct}/${ov.total} = ${pct(ov.accuracy)} (colour ${pct(ov.colourAccuracy)}, shape ${pct(ov.shapeAccuracy)})`);
        if (!best || ov.accuracy > best.accuracy) best = { cfg, images: r.images, correct: r.report.prompts.map((p) => p.samples.map((s) => s.correct)), accuracy: ov.accuracy };
      }
    } finally {
      disposeModel(bundled);
    }
    const evalSeconds = since(t);
    const sheet = contactSheet(best!.images, best!.correct);
    await writePng(path.join(stage, 'contact-sheet.png'), sheet.data, sheet.width, sheet.height);
    // the parts' sum: a build continued from a --work folder counts the earlier processes' parts too
    const seconds = { world: worldSeconds, vae: vaeSeconds, unet: unetSeconds, eval: evalSeconds, total: worldSeconds + vaeSeconds + unetSeconds + evalSeconds };
    const result: Omit<ToyBaseResult, 'bytes'> = {
      out,
      seconds,
      scalingFactor,
      steps: { vae: vaeR.steps, unet: unetR.steps },
      losses: { vae: vaeR.losses, unet: unetR.losses },
      evals,
      params: made.params,
      backend: backend.message,
    };
    await writeFile(path.join(stage, 'eval.json'), JSON.stringify({ cfgs: evals, bestCfg: best!.cfg, evalSeeds: o.evalSeeds, evalSteps: o.evalSteps, sampler: 'ddim', prompts: 'colours x shapes (16)' }, null, 2) + '\n');
    await writeFile(path.join(stage, 'README.md'), modelCard(o, result, best!.cfg, tables[o.cfgs.indexOf(best!.cfg)]!));
    const bytes = await folderBytes(stage);
    if (bytes > TOY_BASE_MAX_BYTES) log(`[make-toy-base] warning: ${bytes.toLocaleString('en-US')} bytes, more than the ${TOY_BASE_MAX_BYTES.toLocaleString('en-US')} the bundled base may have (use --precision fp16)`);
    await rm(out, { recursive: true, force: true });
    await rename(stage, out);
    log(`[make-toy-base] wrote ${out} (${(bytes / 1024 ** 2).toFixed(2)} MB): world ${fmtTime(seconds.world)}, VAE ${fmtTime(seconds.vae)}, UNet ${fmtTime(seconds.unet)}, eval ${fmtTime(seconds.eval)}, total ${fmtTime(seconds.total)}`);
    return { ...result, bytes };
  } finally {
    if (!o.keepWork && !o.work) await rm(work, { recursive: true, force: true });
  }
}

/** The sum of the logged step_seconds of steps 1..last (the last value logged for each step: a resumed run replaces
 *  the steps after its checkpoint), or null when a step is missing. */
async function loggedStepSeconds(logDir: string, last: number): Promise<number | null> {
  const { readEventFile } = await import('../src/io/tensorboard.js');
  const per = new Map<number, number>();
  for (const f of (await readdir(logDir)).filter((f) => f.startsWith('events.out.tfevents')).sort()) {
    for (const e of await readEventFile(path.join(logDir, f))) for (const v of e.values ?? []) if (v.tag === 'step_seconds' && v.simpleValue !== undefined) per.set(e.step, v.simpleValue);
  }
  let total = 0;
  for (let s = 1; s <= last; s++) {
    const v = per.get(s);
    if (v === undefined) return null;
    total += v;
  }
  return total;
}

/** What the worlds were made from: a reused --work folder must have been made with the same. */
const worldKey = (o: ToyBaseOptions & typeof TOY_BASE_DEFAULTS) => JSON.stringify({ seed: o.seed, vae: o.vaeImages, unet: o.unetImages });

/** Resume a run folder that has checkpoints (an interrupted build), else start it. */
function resumeFrom(runDir: string): { resume?: string } {
  return existsSync(path.join(runDir, 'checkpoints')) ? { resume: runDir } : {};
}

/** The model card (README.md of the bundled folder). */
function modelCard(o: typeof TOY_BASE_DEFAULTS & ToyBaseOptions, r: Omit<ToyBaseResult, 'bytes'>, bestCfg: number, bestTable: string): string {
  const p = r.params;
  const total = p.unet + p.vae + p.text_encoder;
  const rows = r.evals.map((e) => `| ${e.cfg} | ${e.correct}/${e.total} | **${pct(e.accuracy)}** | ${pct(e.colourAccuracy)} | ${pct(e.shapeAccuracy)} |`);
  const args = [
    `--vae-steps ${r.steps.vae}`, `--unet-steps ${r.steps.unet}`, `--unet-decay-steps ${o.unetDecaySteps}`, `--vae-batch ${o.vaeBatch}`, `--unet-batch ${o.unetBatch}`,
    `--vae-images ${o.vaeImages}`, `--unet-images ${o.unetImages}`, `--scaling-images ${o.scalingImages}`, `--warmup ${o.warmup}`, `--seed ${o.seed}`, `--precision ${o.precision}`,
    `--cfg ${r.evals.map((e) => e.cfg).join(',')}`, `--eval-seeds ${o.evalSeeds}`, `--eval-steps ${o.evalSteps}`,
  ].join(' ');
  return `# toy-sd: a tiny SD v1 trained by sdtune on the toy world

A Stable Diffusion v1-architecture model (diffusers folder, ${o.precision} safetensors) trained from scratch with sdtune's own
training loop on the procedural toy world (\`sdtune toy-world\`: one coloured shape on white, 32x32). It draws what its
prompt says ("a red star", "a large blue circle on the left"), so fine-tuning on it can be seen, and tested, to learn.

## What is held out

The colour **purple**, the shape **heart** and the word **sks** are in the vocabulary but never in the UNet's training
captions or images: they are what the fine-tuning demos teach. The VAE *was* trained on purple and hearts (the superset
palette): a VAE that never saw purple decodes it as green or yellow, and no fine-tune of the UNet could fix that.

## Architecture (${total.toLocaleString('en-US')} parameters)

| part | config | params |
|---|---|---|
| VAE (AutoencoderKL) | block_out (32, 64, 64), 1 layer/block, GroupNorm 8 groups, 4 latent channels, 4x down; scaling_factor ${r.scalingFactor.toFixed(4)} | ${p.vae.toLocaleString('en-US')} |
| text encoder (CLIPTextModel) | hidden 64, 2 layers, 2 heads, max length 12; **random init, frozen** (saved as drawn) | ${p.text_encoder.toLocaleString('en-US')} |
| UNet (SD v1 block pattern) | block_out (32, 64, 64): CrossAttnDown x2 + Down, Up + CrossAttnUp x2; 1 layer/block; 4 heads; cross-attention 64; 8x8x4 latents | ${p.unet.toLocaleString('en-US')} |

Tokenizer: CLIP byte-level BPE built by the project (every world word one token), pad = EOS. Scheduler: SD v1's
(scaled_linear 0.00085-0.012, 1000 steps).

## Recipe

| part | settings | steps | time |
|---|---|---|---|
| worlds | ${o.vaeImages} superset images (VAE), ${o.unetImages} base images (UNet) | | ${fmtTime(r.seconds.world)} |
| VAE (\`method: vae\`) | MSE + 1e-6 x KL (summed per sample), Adam lr 1e-3, batch ${o.vaeBatch}; scaling_factor = 1 / std of the latents of ${o.scalingImages} training images | ${r.steps.vae} | ${fmtTime(r.seconds.vae)} |
| UNet (\`method: finetune\`, from random init) | epsilon, AdamW lr 1e-3 (decay 1e-2), ${Math.min(o.warmup, r.steps.unet)} warmup steps${o.unetDecaySteps > 0 ? `, constant, then a half cosine to 0 over the last ${o.unetDecaySteps} steps (warmup_stable_decay)` : ', then constant'}, grad clip 1, batch ${o.unetBatch}, 10% caption dropout, latents cached as distributions and sampled each step | ${r.steps.unet} | ${fmtTime(r.seconds.unet)} |
| judges | ${r.evals.length} CFG scales x 16 prompts x ${o.evalSeeds} seeds, DDIM ${o.evalSteps} | | ${fmtTime(r.seconds.eval)} |

Total ${fmtTime(r.seconds.total)} on ${r.backend.replace(/^backend: /, '')} (the UNet's time is the sum of its logged step times).
Final losses: VAE ${r.losses.vae.at(-1)?.toFixed(4)}, UNet ${r.losses.unet.at(-1)?.toFixed(4)}.

Reproduce: \`npm run make-toy-base -- ${args}\`

## Accuracy (colour and shape both right; "a <colour> <shape>" for the 4 base colours x 4 base shapes)

| CFG | right | accuracy | colour | shape |
|---|---|---|---|---|
${rows.join('\n')}

\`contact-sheet.png\` shows CFG ${bestCfg} (rows: prompts, columns: seeds; green frame = judged right). Per prompt at CFG ${bestCfg}:

\`\`\`
${bestTable}
\`\`\`
`;
}

function parseCli(argv: string[]): ToyBaseOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      out: { type: 'string' }, work: { type: 'string' }, 'keep-work': { type: 'boolean' }, overwrite: { type: 'boolean' },
      'vae-steps': { type: 'string' }, 'unet-steps': { type: 'string' }, 'unet-decay-steps': { type: 'string' }, 'vae-batch': { type: 'string' }, 'unet-batch': { type: 'string' },
      'vae-images': { type: 'string' }, 'unet-images': { type: 'string' }, 'scaling-images': { type: 'string' }, warmup: { type: 'string' },
      seed: { type: 'string' }, precision: { type: 'string' }, cfg: { type: 'string' }, 'eval-seeds': { type: 'string' }, 'eval-steps': { type: 'string' },
      backend: { type: 'string' }, threads: { type: 'string' }, quiet: { type: 'boolean' }, help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(
      'npm run make-toy-base -- [--out DIR] [--overwrite] [--vae-steps N] [--unet-steps N] [--unet-decay-steps N] [--vae-batch N] [--unet-batch N]\n' +
        '  [--vae-images N] [--unet-images N] [--scaling-images N] [--warmup N] [--seed N] [--precision fp16|fp32]\n' +
        '  [--cfg 1,3,5,7.5] [--eval-seeds N] [--eval-steps N] [--backend wasm|cpu|...] [--threads N|auto] [--work DIR] [--keep-work] [--quiet]\n' +
        `defaults: ${JSON.stringify(TOY_BASE_DEFAULTS)}\n`,
    );
    process.exit(0);
  }
  const int = (k: string): number | undefined => {
    const v = values[k as keyof typeof values] as string | undefined;
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`--${k}: expected a non-negative integer, got ${JSON.stringify(v)}`);
    return n;
  };
  const precision = values.precision as 'fp16' | 'fp32' | undefined;
  if (precision !== undefined && precision !== 'fp16' && precision !== 'fp32') throw new Error(`--precision: expected fp16 or fp32, got ${JSON.stringify(precision)}`);
  const cfgs = values.cfg?.split(',').map((s) => {
    const n = Number(s.trim());
    if (!(n >= 1)) throw new Error(`--cfg: expected a comma list of numbers >= 1, got ${JSON.stringify(values.cfg)}`);
    return n;
  });
  return {
    out: values.out, work: values.work, keepWork: values['keep-work'], overwrite: values.overwrite,
    vaeSteps: int('vae-steps'), unetSteps: int('unet-steps'), unetDecaySteps: int('unet-decay-steps'), vaeBatch: int('vae-batch'), unetBatch: int('unet-batch'),
    vaeImages: int('vae-images'), unetImages: int('unet-images'), scalingImages: int('scaling-images'), warmup: int('warmup'),
    seed: int('seed'), precision, cfgs, evalSeeds: int('eval-seeds'), evalSteps: int('eval-steps'),
    backend: values.backend, threads: values.threads, quiet: values.quiet,
  };
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  Promise.resolve()
    .then(() => makeToyBase(parseCli(process.argv.slice(2))))
    .then((r) => process.stdout.write(`${r.out}\n`))
    .catch((e: unknown) => {
      process.stderr.write(`error: ${(e as Error).message}\n`);
      process.exit(1);
    });
}
