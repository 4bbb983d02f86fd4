/**
 * The one training loop (design principle 8), readable top to bottom:
 *   batch -> loss inside the tape -> gradients of the recipe's trainables -> accumulate -> clip -> AdamW at
 *   lrAt(step) -> EMA, recipe.afterStep -> log (progress bar, TensorBoard) -> sample / save on schedule.
 * The method's recipe (registry.ts, recipe.ts) says what trains and may replace a default: its batches (nextBatch),
 * the reduction of the per-item diffusion losses (reduceLoss) or the whole loss (loss), and its checkpoint state.
 * Every random draw (noise, timesteps, latent samples, TI templates) comes from one torch-compatible generator whose
 * state is checkpointed with the loader's, so `--resume` continues the same curve exactly.
 */
import * as tf from '@tensorflow/tfjs';
import { lstatSync } from 'node:fs';
import { mkdir, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { TextCache, sampleLatents } from '../data/cache.js';
import { type Batch, DataLoader, type LoaderState, disposeBatch } from '../data/loader.js';
import { scanDataset } from '../data/dataset.js';
import { SdtuneError, usageError } from '../errors.js';
import { type LoadedModel, disposeModel, loadModel } from '../io/model.js';
import { writePng } from '../io/png.js';
import { TensorBoardWriter } from '../io/tensorboard.js';
import { assertTrainingFits } from '../infer/budget.js';
import { generate, toUint8 } from '../infer/pipeline.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import { Interrupted, checkBeforeEveryKernel } from '../runtime/interrupt.js';
import { disposeTape } from '../runtime/memory.js';
import { progress } from '../runtime/progress.js';
import { type GeneratorState, TorchGenerator, randnNHWC } from '../runtime/rng.js';
import { type Schedule, samplerFromConfig, scheduleFromConfig } from '../schedulers/index.js';
import { vaeScaleFactor } from '../models/configs.js';
import { type TrainEval, evalAtStep, formatBeforeAfter, trainEvalPrompts, writeBeforeAfter } from './eval.js';
import { type Method, type ModelResolvedConfig, type TrainConfig, describeSteps, dumpConfig, resolutionWarning, withModelDefaults } from './config.js';
import { latentCacheFor, latentEncoder, loaderOptions } from './data-options.js';
import { checkpointName, loadCheckpoint, resolveResume, saveCheckpoint } from './checkpoint.js';
import { type PredictionType, diffusionLossPerItem } from './loss.js';
import { lrFactor } from './lr.js';
import { type EmaState, createEma, disposeEma, emaStateFromHost, emaStep } from './ema.js';
import { acquireRunLock, divergedError, newRunId, prepareRunFolder, unhealthyTrainable } from './guards.js';
import { type AdamWState, adamwStep, clipGradNorm, createAdamW, disposeAdamW } from './optim.js';
import { type Recipe, captionIds, restoreRecipeState } from './recipe.js';
import { DIFFUSION_PARTS, type ModelPart, getMethod } from './registry.js';

export interface TrainOptions {
  /** checkpoint folder (or output folder) to continue from */
  resume?: string | null;
  /** stop, saving a checkpoint of the last completed step (Ctrl-C); checked between steps and, through
   *  `interrupt`'s kernel hook, inside a step too (on an async backend a timer can fire it mid-step) */
  signal?: AbortSignal;
  /** a cheap synchronous stop request, polled like `signal` between steps and before every kernel of a step (the
   *  CLI's worker passes an Atomics.load of the flag its main thread sets on Ctrl-C) */
  interrupt?: () => boolean;
  /** human log lines (default: stderr) */
  log?: (line: string) => void;
  /** no progress bar */
  quiet?: boolean;
  /** called after every optimizer step (tests, tools) */
  onStep?: (step: number, loss: number) => void;
  /** a fresh run may replace an earlier run in its output folder (its checkpoints are removed first) */
  overwrite?: boolean;
}

/** What is saved with a checkpoint from before a step (a step cut short saves the state from before it). */
interface StepState {
  rng: GeneratorState;
  loader: LoaderState;
  /** the recipe's JSON state (Recipe.checkpoint.json) */
  recipe?: unknown;
}

export interface TrainResult {
  /** optimizer steps completed in total */
  steps: number;
  /** the loss of every optimizer step run in this call */
  losses: number[];
  /** exported adapter files */
  files: string[];
  checkpoint: string;
  stopped: 'done' | 'interrupted';
  /** the judges' verdicts of this run (output.eval_*): before its first step, every eval_every steps, after the last */
  evals?: TrainEval[];
}

/**
 * Train with `method` as configured; returns when max steps are done or a stop is requested (`signal`, `interrupt`).
 * A stop request inside a step interrupts it at its next kernel: the partial step is discarded (never applied; the
 * optimizer update itself is not interruptible) and the last completed step is saved, with the generator and
 * data-loader state from before the discarded step, so `--resume` continues the same curve.
 */
export async function train(method: Method, config: TrainConfig, o: TrainOptions = {}): Promise<TrainResult> {
  const log = o.log ?? ((l: string) => process.stderr.write(l + '\n'));
  // the output folder: ours alone while we run (a lock), never an earlier run's (unless overwrite/resume), and
  // nothing in it that leads elsewhere (a symlinked subfolder would take our writes outside it)
  const out = config.output.dir;
  await mkdir(out, { recursive: true });
  for (const sub of ['checkpoints', 'logs', 'samples', 'latents']) {
    const p = path.join(out, sub);
    let link = false;
    try {
      link = lstatSync(p).isSymbolicLink();
    } catch {
      /* absent */
    }
    if (link) throw new SdtuneError('usage', `${p} is a symbolic link; sdtune writes only inside the output folder ${out}: remove the link or choose another --output`);
  }
  const lock = await acquireRunLock(out, log);
  try {
    prepareRunFolder(out, config.output.name, { overwrite: o.overwrite, resume: Boolean(o.resume) }, log);
    await removeOrphans(out);
    return await trainLocked(method, config, o, log);
  } finally {
    lock.release();
  }
}

/** Temp files and folders of saves that a killed process left behind (safe to remove: we hold the lock). */
async function removeOrphans(out: string): Promise<void> {
  for (const dir of [out, path.join(out, 'checkpoints')]) {
    let names: string[] = [];
    try {
      names = await readdir(dir);
    } catch {
      continue;
    }
    for (const n of names) if (n.startsWith('.') && n.endsWith('.tmp')) await rm(path.join(dir, n), { recursive: true, force: true });
  }
}

async function trainLocked(method: Method, config: TrainConfig, o: TrainOptions, log: (line: string) => void): Promise<TrainResult> {
  const stopRequested = () => (o.signal?.aborted ?? false) || (o.interrupt?.() ?? false);
  const model = await loadModel(config.model.path, { configDir: config.model.config ?? undefined, tokenizerDir: config.model.tokenizer ?? undefined });
  const cleanups: (() => void)[] = [() => disposeModel(model)];
  let tb: TensorBoardWriter | undefined;
  try {
    // the parts of the model the method needs (diffusion training: all four; the VAE method: the vae alone)
    const entry = getMethod(method);
    const parts = entry.components ?? DIFFUSION_PARTS;
    const have: Record<ModelPart, boolean> = { unet: Boolean(model.unet), vae: Boolean(model.vae), text_encoder: Boolean(model.textEncoder), tokenizer: Boolean(model.tokenizer) };
    const lacking = parts.filter((p) => !have[p]);
    if (lacking.length) throw new SdtuneError('usage', `${config.model.path}: ${method} training needs ${parts.join(', ')}; the model has no ${lacking.join(', ')}`);
    const diffusion = parts.includes('unet');
    const usesText = parts.includes('text_encoder') && parts.includes('tokenizer');
    // the default resolution: the UNet's latent size x the VAE's pixels per latent, else the VAE's own sample_size
    const side = diffusion ? model.unet!.config.sample_size : model.vae?.config.sample_size;
    if (side === undefined && !config.data.resolution) throw usageError(`${method} training on ${config.model.path}: set data.resolution (the model has no unet or vae to take it from)`);
    const c = withModelDefaults(config, side ?? 0, diffusion ? vaeScaleFactor(model.vae!.config) : 1);
    const vae = () => {
      if (!model.vae) throw usageError(`${config.model.path}: ${method} training encodes images, but the model has no vae`);
      return model.vae;
    };
    const pred = (c.model.prediction_type ?? (model.schedulerConfig.prediction_type as string | undefined) ?? 'epsilon') as PredictionType;
    if (diffusion && pred !== 'epsilon' && pred !== 'v_prediction') throw new SdtuneError('unsupported', `prediction type ${pred}`);
    const schedule: Schedule = scheduleFromConfig(model.schedulerConfig);
    if (diffusion) assertTrainingFits(model, c.data.resolution, c.train.batch_size, c.train.gradient_checkpointing); // before any data is read
    // the judges' prompts (toy-world models only), checked before any data is read
    const judged = diffusion ? trainEvalPrompts(c, model) : null;
    if (!diffusion && (c.output.eval_prompts.length || c.output.eval_grid !== null)) throw usageError(`output.eval_prompts: ${method} training does not sample images, so there is nothing to judge`);
    // 1. the method's recipe (registry.ts), then the data
    const gen = new TorchGenerator(c.train.seed);
    const recipe = await entry.create(model, c, gen, { log, quiet: o.quiet ?? false, stopRequested });
    if (!diffusion && !recipe.loss) throw usageError(`the ${method} method needs no unet, so its recipe must give the whole loss (Recipe.loss)`);
    cleanups.push(() => recipe.dispose());
    let warnings = 0;
    const items = recipe.items ? [...recipe.items] : await scanDataset(c.data.dir, {
      captionExtension: c.data.caption_extension,
      repeats: c.data.repeats,
      metadata: c.data.metadata,
      uncaptioned: recipe.uncaptioned ?? 'empty',
      onWarning: (m) => (warnings++ < 20 ? log(`warning: ${m}`) : undefined),
    });
    const tooLarge = resolutionWarning(c.data.resolution, items);
    if (tooLarge) log(`warning: ${tooLarge}`);
    const encodePixels = latentEncoder(model);
    const cache = latentCacheFor(model, c);
    if (cache) cleanups.push(() => cache.dispose());
    const textCache = recipe.textEncoderTrainable || !usesText
      ? undefined
      : new TextCache((caption) => tf.tidy(() => recipe.encodeIds(captionIds(model, [caption])).squeeze([0])));
    if (textCache) cleanups.push(() => textCache.dispose());
    const loaderOpts = loaderOptions(c, c.train.seed + 1, cache);
    // 2. steps: samples per bucket come from the loader (aspect buckets and per-folder repeats included)
    let loader = new DataLoader(items, loaderOpts);
    const steps = describeSteps(c, items.length, loader.bucketSummary().map((b) => b.samples));
    const total = steps.totalSteps;
    const ga = c.train.gradient_accumulation;
    // 3. optimizer, resume
    const vars = recipe.trainables;
    let opt: AdamWState = createAdamW(vars);
    cleanups.push(() => disposeAdamW(opt));
    // an exponential moving average of the trainables (diffusers EMAModel), updated after every optimizer step
    const e = c.train.ema;
    const emaOpts = e.enabled
      ? { decay: e.decay, minDecay: e.min_decay, updateAfterStep: e.update_after_step, useEmaWarmup: e.use_warmup, invGamma: e.inv_gamma, power: e.power }
      : undefined;
    let ema: EmaState | undefined = emaOpts ? createEma(vars, emaOpts) : undefined;
    cleanups.push(() => ema && disposeEma(ema));
    let step = 0;
    let lossEma: number | null = null;
    let runId = newRunId();
    let resumedFrom: string | undefined;
    if (o.resume) {
      const dir = await resolveResume(o.resume, log);
      resumedFrom = dir;
      const r = await loadCheckpoint(dir, vars);
      if (r.state.method !== method) throw new SdtuneError('usage', `resume: ${dir} is a ${r.state.method} checkpoint, not ${method}`);
      disposeAdamW(opt);
      opt = r.opt;
      step = r.state.step;
      gen.setState(r.state.rng);
      loader = DataLoader.fromState(items, loaderOpts, r.state.loader);
      lossEma = r.state.lossEma;
      runId = r.state.runId ?? runId;
      restoreRecipeState(recipe, dir, r.state.recipe, r.recipeTensors);
      if (ema && r.ema) {
        disposeEma(ema);
        ema = emaStateFromHost({ ...r.ema, opts: emaOpts! }, vars);
      } else if (ema) log(`note: ${dir} has no EMA state: the average starts from the resumed weights`);
      log(`resumed from ${dir} at step ${step}`);
    }
    const configYaml = dumpConfig(c);
    await writeFileAtomic(path.join(c.output.dir, 'config.resolved.yaml'), new TextEncoder().encode(configYaml));
    tb = await TensorBoardWriter.create(c.output.log_dir);
    // a resumed run replaces what an earlier process logged after its checkpoint (TensorBoard purges steps > step)
    if (o.resume) tb.sessionStart(step + 1);
    const nParams = [...vars.values()].reduce((a, v) => a + v.size, 0);
    log(`method: ${method}; trainable parameters: ${nParams.toLocaleString('en-US')}${c.train.gradient_checkpointing ? '; gradient checkpointing' : ''}`);
    log(`steps: ${steps.line}`);
    const T = schedule.config.numTrainTimesteps;
    const pick = (n: number) => gen.randint(0, n, [1])[0];
    const ckRoot = path.join(c.output.dir, 'checkpoints');
    // `at`: the generator and data-loader state after the last completed step (taken before each step, so that the
    // draws of a step interrupted part-way are not saved)
    // nothing is saved or exported from weights that are not finite or have blown up: the run stops as diverged,
    // naming the last good checkpoint (every saved one passed this check)
    const lastGood = () => checkpoint || resumedFrom;
    const assertHealthy = async () => {
      const bad = await unhealthyTrainable(vars);
      if (bad) throw divergedError(step, `${bad.name} has ${bad.what}`, lastGood(), c.output.dir);
    };
    const stateNow = (): StepState => ({ rng: gen.getState(), loader: loader.getState(), recipe: recipe.checkpoint?.json?.() });
    const save = async (at: StepState = stateNow()) => {
      await assertHealthy();
      await tb!.flush(); // a kill after this save loses no logged step the checkpoint covers
      return saveCheckpoint(ckRoot, vars, opt, { method, step, ...at, lossEma, runId }, configYaml, c.output.keep_last, ema, recipe.checkpoint?.tensors?.());
    };
    /** Run `fn` with the EMA average in the trainables' place (the trained weights are restored after); `fn` as is
     *  when the average is in place already. */
    let emaInPlace = false;
    const withEma = async <T>(fn: () => Promise<T>): Promise<T> => {
      if (!ema) throw new Error('withEma: no EMA');
      if (emaInPlace) return fn();
      const kept = new Map([...vars].map(([k, v]) => [k, tf.keep(tf.clone(v))] as const));
      try {
        for (const [k, v] of vars) v.assign(ema.shadow.get(k)!);
        emaInPlace = true;
        return await fn();
      } finally {
        emaInPlace = false;
        for (const [k, v] of vars) v.assign(kept.get(k)!);
        tf.dispose([...kept.values()]);
      }
    };
    /** Run `fn` with the weights that are exported and sampled: the EMA average when output.export_ema (as diffusers
     *  does), the trained weights otherwise (and always restored after). */
    const withExportWeights = <T>(fn: () => Promise<T>): Promise<T> => (ema && c.output.export_ema ? withEma(fn) : fn());
    /** The recipe's export, with the weights of output.export_ema in place and the EMA at hand (output.ema_only). */
    const exportAs = (name: string) => withExportWeights(() => recipe.export(c.output.dir, name, step, { withEma: ema ? withEma : undefined }));
    const losses: number[] = [];
    const files: string[] = [];
    let checkpoint = '';
    let savedStep = step; // a resumed run's starting step is saved already
    // a resumed run starts the bar at its step: those steps count, but not towards the rate
    const bar = o.quiet ? undefined : progress({ total, label: method, initial: step, logEvery: Math.max(1, Math.round(total / 20)) });
    // a stop request during a step's forward/backward throws Interrupted at the next kernel; disarmed for the
    // optimizer update (never applied partly), sampling and saving
    let armed = false;
    cleanups.push(checkBeforeEveryKernel(() => armed && stopRequested()));

    /** Stop on request: save the last completed step (when this run completed one not yet saved) and return. */
    const stop = async (inStep: boolean, at?: StepState): Promise<TrainResult> => {
      bar?.done();
      const discarded = inStep ? ` (step ${step + 1} was stopped part-way and discarded)` : '';
      if (savedStep !== step) {
        checkpoint = await save(at);
        savedStep = step;
        files.push(...(await exportAs(`${c.output.name}-${checkpointName(step)}`)));
        log(`interrupted at step ${step}: checkpoint ${checkpoint}; continue with --resume ${c.output.dir}${discarded}`);
      } else if (checkpoint || o.resume) {
        log(`interrupted at step ${step}: checkpoint ${checkpoint || o.resume} already holds it; continue with --resume ${c.output.dir}${discarded}`);
      } else {
        log(`interrupted before the first step finished: nothing to save${discarded}`);
      }
      return { steps: step, losses, files, checkpoint, stopped: 'interrupted' };
    };

    /** Validation samples of the current weights; a stop request skips the rest of them (the step is complete). */
    const sampleInterruptibly = () =>
      withExportWeights(async () => {
        armed = true; // only while sampling: the weight swap around it is never cut short
        try {
          await sampleImages(model, recipe, c, step, tb!);
        } catch (e) {
          if (!(e instanceof Interrupted)) throw e;
          log(`sampling at step ${step} interrupted`);
        } finally {
          armed = false;
        }
      });

    /** The loss function of a diffusion step on `bt`: its random draws (latents, noise, timesteps, captions) are made
     *  here, outside the tape, into `own`; the UNet's per-item losses are reduced by the recipe (default: their mean). */
    const diffusionStep = (bt: Batch, own: <T extends tf.Tensor>(t: T) => T): (() => tf.Scalar) => {
      const unetP = model.unet!;
      const b = bt.captions.length;
      const latents = own(
        bt.latents ? sampleLatents(bt.latents, gen, vae().config.scaling_factor) : tf.tidy(() => sampleLatents(encodePixels(bt.pixels!), gen, vae().config.scaling_factor)),
      );
      const [, h, w, ch] = latents.shape;
      const noise = own(tf.tidy(() => {
        const n = randnNHWC(gen, [b, ch, h, w]);
        // noise offset (Crosslabs): a per-channel constant shift, diffusers noise += offset * randn(B, C, 1, 1)
        return c.train.noise_offset ? tf.add(n, tf.mul(randnNHWC(gen, [b, ch, 1, 1]), c.train.noise_offset)) : n;
      }) as tf.Tensor4D);
      const timesteps = gen.randint(0, T, [b]);
      const captions = bt.captions.map((cap) => recipe.captionFor(cap, pick));
      const ids = own(captionIds(model, captions));
      // a frozen text encoder gives the same embedding for the same caption: cache it
      const frozenCtx = textCache ? own(tf.tidy(() => tf.stack(captions.map((cap) => textCache.get(cap))) as tf.Tensor3D)) : undefined;
      const lossOpts = { predictionType: pred, minSnrGamma: c.train.min_snr_gamma, gradientCheckpointing: c.train.gradient_checkpointing, forward: recipe.forward };
      return () =>
        tf.tidy(() => {
          const perItem = diffusionLossPerItem(unetP.params, unetP.config, schedule, { latents, noise, timesteps, context: frozenCtx ?? recipe.encodeIds(ids) }, lossOpts);
          return recipe.reduceLoss ? recipe.reduceLoss(perItem, bt) : (tf.mean(perItem) as tf.Scalar);
        });
    };

    /** One forward + backward pass on the next batch (the recipe's, default the loader's): adds its gradients (/ ga)
     *  into `acc`, returns its loss. Frees everything it made when it throws (an interrupt), the tensors the gradient
     *  tape saved included. */
    const microStep = async (acc: Map<string, tf.Tensor>): Promise<number> => {
      const owned: tf.Tensor[] = []; // freed when this pass ends, however it ends
      const own = <T extends tf.Tensor>(t: T) => (owned.push(t), t);
      let batch: Batch | undefined;
      let grads: tf.NamedTensorMap = {};
      try {
        const bt = (batch = await (recipe.nextBatch ? recipe.nextBatch(loader) : loader.next()));
        // the recipe's own loss (a method that is not diffusion training), else the diffusion loss
        const lossOf = recipe.loss ? () => recipe.loss!(bt) : diffusionStep(bt, own);
        // the loss is owned from inside the tape: when the backward pass throws, engine.gradients loses it
        const r = tf.variableGrads(() => own(lossOf()), [...vars.values()]);
        grads = r.grads;
        const loss = (await r.value.data())[0];
        for (const [name, v] of vars) {
          const g = grads[v.name];
          const scaled = ga > 1 ? tf.div(g, ga) : g;
          const prev = acc.get(name);
          if (prev) {
            acc.set(name, tf.add(prev, scaled));
            tf.dispose([prev, scaled]);
          } else acc.set(name, scaled);
          if (scaled !== g) g.dispose();
        }
        return loss;
      } catch (e) {
        tf.dispose(Object.values(grads));
        disposeTape();
        throw e;
      } finally {
        tf.dispose(owned);
        if (batch) disposeBatch(batch);
      }
    };

    /** The judges on the exported weights (output.eval_*): TensorBoard eval/accuracy and <output>/eval/. */
    const evals: TrainEval[] = [];
    const judgeNow = async () => {
      if (!judged) return;
      evals.push(await withExportWeights(() => evalAtStep(model, recipe, c, judged, step, tb!, { quiet: o.quiet, log })));
    };
    await judgeNow(); // before the first step (of this run)

    // 4. the loop
    while (step < total) {
      const before = stateNow();
      if (stopRequested()) return await stop(false, before); // e.g. Ctrl-C while the model was loading
      const t0 = performance.now();
      let lossSum = 0;
      const acc = new Map<string, tf.Tensor>();
      let interrupted = false;
      armed = true;
      try {
        for (let micro = 0; micro < ga; micro++) lossSum += await microStep(acc);
      } catch (e) {
        tf.dispose([...acc.values()]);
        if (!(e instanceof Interrupted)) throw e;
        interrupted = true;
      } finally {
        armed = false;
      }
      if (interrupted) return await stop(true, before);
      const loss = lossSum / ga;
      if (!Number.isFinite(loss)) {
        tf.dispose([...acc.values()]);
        throw divergedError(step + 1, `the loss became ${loss}`, lastGood(), c.output.dir);
      }
      const { grads: clipped, totalNorm } = await clipGradNorm(acc, c.train.max_grad_norm);
      if (!Number.isFinite(totalNorm)) {
        tf.dispose([...acc.values(), ...clipped.values()]);
        throw divergedError(step + 1, `the gradient norm became ${totalNorm} (the update was not applied)`, lastGood(), c.output.dir);
      }
      const factor = lrFactor(c.train, step, total);
      const lr = c.train.lr * factor;
      adamwStep(opt, vars, clipped, {
        lr,
        beta1: c.train.adam_beta1,
        beta2: c.train.adam_beta2,
        eps: c.train.adam_epsilon,
        weightDecay: c.train.weight_decay,
        lrFor: recipe.lrFor ? (name) => recipe.lrFor!(name, factor, c.train.lr) : undefined,
      });
      tf.dispose([...acc.values(), ...clipped.values()]);
      // after the update: the average of the weights (any method's: EMA is a loop feature), then the recipe's own
      if (ema) emaStep(ema, vars);
      recipe.afterStep?.(step + 1);
      step++;
      losses.push(loss);
      lossEma = lossEma === null ? loss : 0.9 * lossEma + 0.1 * loss;
      const seconds = (performance.now() - t0) / 1000;
      tb.scalars({ loss, loss_smoothed: lossEma, lr, grad_norm: totalNorm, step_seconds: seconds }, step);
      bar?.tick(1, { loss: lossEma.toFixed(4), lr: lr.toExponential(2) });
      o.onStep?.(step, loss);
      if (c.output.sample_every && step % c.output.sample_every === 0 && step < total) await sampleInterruptibly();
      if (c.output.eval_every && step % c.output.eval_every === 0 && step < total) await judgeNow();
      if (stopRequested()) return await stop(false);
      if (c.output.save_every && step % c.output.save_every === 0 && step < total) {
        checkpoint = await save();
        savedStep = step;
        files.push(...(await exportAs(`${c.output.name}-${checkpointName(step)}`)));
      }
    }
    bar?.done();
    // 5. final outputs
    checkpoint = await save();
    files.push(...(await exportAs(c.output.name)));
    if (c.output.sample_every || c.output.sample_prompts.length) await sampleInterruptibly();
    if (judged && evals.at(-1)?.step !== step) await judgeNow();
    if (evals.length >= 2) {
      const sheet = await writeBeforeAfter(c, evals[0]!, evals.at(-1)!);
      log(`judged before and after (${sheet}):\n${formatBeforeAfter(evals[0]!, evals.at(-1)!)}`);
    }
    log(`done: ${step} steps; wrote ${files.join(', ')}`);
    return { steps: step, losses, files, checkpoint, stopped: 'done', evals };
  } finally {
    await tb?.close();
    for (const f of cleanups.reverse()) f();
  }
}

/** Validation images with the current weights: PNGs in <output>/samples and TensorBoard image summaries. */
async function sampleImages(model: LoadedModel, recipe: Recipe, c: ModelResolvedConfig, step: number, tb: TensorBoardWriter): Promise<void> {
  if (!c.output.sample_prompts.length) return;
  const [w, h] = c.data.resolution;
  await recipe.withInference(async (use) => {
    for (const [i, prompt] of c.output.sample_prompts.entries()) {
      const text = recipe.samplePrompt?.(prompt) ?? prompt;
      const r = await generate(model, {
        prompt: text,
        sampler: (c.output.sample_sampler as never) ?? samplerFromConfig(model.schedulerConfig),
        steps: c.output.sample_steps,
        cfg: 7.5,
        width: w,
        height: h,
        seed: c.output.sample_seed,
        context: use?.context,
      });
      const rgb = toUint8(r.images[0]);
      await writePng(path.join(c.output.dir, 'samples', `${checkpointName(step)}-${i}.png`), rgb, w, h, `${prompt}\nSteps: ${c.output.sample_steps}, Seed: ${c.output.sample_seed}, Size: ${w}x${h}`);
      await tb.image(`samples/${i}`, { data: rgb, width: w, height: h }, step);
    }
  });
}
