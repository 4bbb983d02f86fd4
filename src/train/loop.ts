/**
 * The one training loop (design principle 8), readable top to bottom:
 *   batch -> loss inside the tape -> gradients of the recipe's trainables -> accumulate -> clip -> AdamW at
 *   lrAt(step) -> log (progress bar, TensorBoard) -> sample / save on schedule.
 * Every random draw (noise, timesteps, latent samples, TI templates) comes from one torch-compatible generator whose
 * state is checkpointed with the loader's, so `--resume` continues the same curve exactly.
 */
import * as tf from '@tensorflow/tfjs';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { makeBuckets } from '../data/buckets.js';
import { LatentCache, TextCache, sampleLatents } from '../data/cache.js';
import { DataLoader, disposeBatch } from '../data/loader.js';
import { scanDataset } from '../data/dataset.js';
import { SdtuneError } from '../errors.js';
import { type LoadedModel, disposeModel, loadModel } from '../io/model.js';
import { writePng } from '../io/png.js';
import { TensorBoardWriter } from '../io/tensorboard.js';
import { assertTrainingFits } from '../infer/budget.js';
import { generate, toUint8 } from '../infer/pipeline.js';
import { vaeEncode } from '../models/vae.js';
import { currentBackend } from '../runtime/backend.js';
import { progress } from '../runtime/progress.js';
import { TorchGenerator, randnNHWC } from '../runtime/rng.js';
import { type Schedule, samplerFromConfig, scheduleFromConfig } from '../schedulers/index.js';
import { type Method, type TrainConfig, describeSteps, dumpConfig } from './config.js';
import { checkpointName, loadCheckpoint, resolveResume, saveCheckpoint } from './checkpoint.js';
import { type PredictionType, diffusionLoss } from './loss.js';
import { lrFactor } from './lr.js';
import { type AdamWState, adamwStep, clipGradNorm, createAdamW, disposeAdamW } from './optim.js';
import { type Recipe, captionIds } from './recipe.js';
import { createLoraRecipe } from './recipes/lora.js';
import { TI_TEMPLATES, createTiRecipe } from './recipes/textual-inversion.js';

export interface TrainOptions {
  /** checkpoint folder (or output folder) to continue from */
  resume?: string | null;
  /** stop after the current step, saving a checkpoint (Ctrl-C) */
  signal?: AbortSignal;
  /** human log lines (default: stderr) */
  log?: (line: string) => void;
  /** no progress bar */
  quiet?: boolean;
  /** called after every optimizer step (tests, tools) */
  onStep?: (step: number, loss: number) => void;
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
}

/** Build the method's recipe on a loaded model. */
function makeRecipe(method: Method, model: LoadedModel, c: TrainConfig, gen: TorchGenerator): Recipe {
  if (method === 'lora') {
    const l = c.lora!;
    if (l.dropout) throw new SdtuneError('unsupported', `lora.dropout = ${l.dropout}: LoRA dropout is not implemented yet; set it to 0`);
    return createLoraRecipe(model, {
      rank: l.rank,
      alpha: l.alpha,
      convRank: l.conv_rank ?? l.rank,
      convAlpha: l.conv_alpha ?? l.alpha,
      targets: l.targets,
      textEncoder: l.text_encoder,
      textEncoderLr: l.text_encoder_lr,
      savePrecision: c.output.save_precision,
      alsoDiffusers: c.output.also_diffusers_format,
      gen,
      metadata: {
        ss_output_name: c.output.name,
        ss_learning_rate: String(c.train.lr),
        ss_lr_scheduler: c.train.lr_scheduler,
        ss_max_train_steps: String(c.train.max_steps ?? ''),
        ss_resolution: `(${c.data.resolution.join(', ')})`,
        ss_seed: String(c.train.seed),
        ss_noise_offset: String(c.train.noise_offset),
        ss_min_snr_gamma: String(c.train.min_snr_gamma ?? ''),
        ss_gradient_checkpointing: c.train.gradient_checkpointing ? 'True' : 'False',
        ss_sd_model_name: path.basename(c.model.path),
        ss_base_model_version: 'sd_v1',
        ss_training_comment: 'trained with sdtune',
      },
    });
  }
  const t = c.textual_inversion!;
  return createTiRecipe(model, { token: t.token, initWord: t.init_word, vectors: t.vectors, templates: c.data.templates ?? [...TI_TEMPLATES] });
}

/** Train with `method` as configured; returns when max steps are done or the signal fires. */
export async function train(method: Method, c: TrainConfig, o: TrainOptions = {}): Promise<TrainResult> {
  const log = o.log ?? ((l: string) => process.stderr.write(l + '\n'));
  const model = await loadModel(c.model.path, { configDir: c.model.config ?? undefined, tokenizerDir: c.model.tokenizer ?? undefined });
  const cleanups: (() => void)[] = [() => disposeModel(model)];
  let tb: TensorBoardWriter | undefined;
  try {
    if (!model.unet || !model.vae || !model.textEncoder || !model.tokenizer) throw new SdtuneError('usage', `${c.model.path}: training needs unet, vae, text_encoder and tokenizer`);
    const unetP = model.unet;
    const vae = model.vae;
    const pred = (c.model.prediction_type ?? (model.schedulerConfig.prediction_type as string | undefined) ?? 'epsilon') as PredictionType;
    if (pred !== 'epsilon' && pred !== 'v_prediction') throw new SdtuneError('unsupported', `prediction type ${pred}`);
    const schedule: Schedule = scheduleFromConfig(model.schedulerConfig);
    assertTrainingFits(model, c.data.resolution, c.train.batch_size, c.train.gradient_checkpointing); // before any data is read
    // 1. data
    let warnings = 0;
    const items = await scanDataset(c.data.dir, {
      captionExtension: c.data.caption_extension,
      repeats: c.data.repeats,
      metadata: c.data.metadata,
      uncaptioned: c.textual_inversion ? 'templates' : 'empty',
      onWarning: (m) => (warnings++ < 20 ? log(`warning: ${m}`) : undefined),
    });
    const gen = new TorchGenerator(c.train.seed);
    const recipe = makeRecipe(method, model, c, gen);
    cleanups.push(() => recipe.dispose());
    const encodePixels = (px: tf.Tensor4D) => {
      const d = vaeEncode(vae.params, vae.config, px);
      d.logvar.dispose();
      return { mean: d.mean, std: d.std };
    };
    const cache = c.data.cache_latents ? new LatentCache(encodePixels, { dir: path.join(c.data.cache_dir, 'latents'), encoderId: path.resolve(c.model.path) }) : undefined;
    if (cache) cleanups.push(() => cache.dispose());
    const textCache = recipe.textEncoderTrainable
      ? undefined
      : new TextCache((caption) => tf.tidy(() => recipe.encodeIds(captionIds(model, [caption])).squeeze([0])));
    if (textCache) cleanups.push(() => textCache.dispose());
    const loaderOpts = {
      batchSize: c.train.batch_size,
      resolution: c.data.resolution as [number, number],
      buckets: c.data.buckets.enabled ? makeBuckets(c.data.resolution, c.data.buckets.min_side, c.data.buckets.max_side, c.data.buckets.step) : undefined,
      randomCrop: !c.data.center_crop,
      flip: c.data.flip,
      caption: { dropout: c.data.caption_dropout, shuffle: c.data.shuffle_captions, keepTokens: c.data.keep_tokens },
      seed: c.train.seed + 1,
      latentCache: cache,
    };
    // 2. steps: samples per bucket come from the loader (aspect buckets and per-folder repeats included)
    let loader = new DataLoader(items, loaderOpts);
    const steps = describeSteps(c, items.length, loader.bucketSummary().map((b) => b.samples));
    const total = steps.totalSteps;
    const ga = c.train.gradient_accumulation;
    // 3. optimizer, resume
    const vars = recipe.trainables;
    let opt: AdamWState = createAdamW(vars);
    cleanups.push(() => disposeAdamW(opt));
    let step = 0;
    let lossEma: number | null = null;
    if (o.resume) {
      const dir = await resolveResume(o.resume);
      const r = await loadCheckpoint(dir, vars);
      if (r.state.method !== method) throw new SdtuneError('usage', `resume: ${dir} is a ${r.state.method} checkpoint, not ${method}`);
      disposeAdamW(opt);
      opt = r.opt;
      step = r.state.step;
      gen.setState(r.state.rng);
      loader = DataLoader.fromState(items, loaderOpts, r.state.loader);
      lossEma = r.state.lossEma;
      log(`resumed from ${dir} at step ${step}`);
    }
    await mkdir(c.output.dir, { recursive: true });
    const configYaml = dumpConfig(c);
    await writeFile(path.join(c.output.dir, 'config.resolved.yaml'), configYaml);
    tb = await TensorBoardWriter.create(c.output.log_dir);
    const nParams = [...vars.values()].reduce((a, v) => a + v.size, 0);
    log(`backend: ${currentBackend()?.name ?? tf.getBackend()}; method: ${method}; trainable parameters: ${nParams.toLocaleString('en-US')}${c.train.gradient_checkpointing ? '; gradient checkpointing' : ''}`);
    log(`steps: ${steps.line}`);
    const T = schedule.config.numTrainTimesteps;
    const pick = (n: number) => gen.randint(0, n, [1])[0];
    const ckRoot = path.join(c.output.dir, 'checkpoints');
    const save = async () => saveCheckpoint(ckRoot, vars, opt, { method, step, rng: gen.getState(), loader: loader.getState(), lossEma }, configYaml, c.output.keep_last);
    const losses: number[] = [];
    const files: string[] = [];
    let checkpoint = '';
    // a resumed run starts the bar at its step: those steps count, but not towards the rate
    const bar = o.quiet ? undefined : progress({ total, label: method, initial: step, logEvery: Math.max(1, Math.round(total / 20)) });
    // 4. the loop
    while (step < total) {
      const t0 = performance.now();
      let lossSum = 0;
      const acc = new Map<string, tf.Tensor>();
      for (let micro = 0; micro < ga; micro++) {
        const batch = await loader.next();
        const b = batch.captions.length;
        const latents = batch.latents
          ? sampleLatents(batch.latents, gen, vae.config.scaling_factor)
          : tf.tidy(() => sampleLatents(encodePixels(batch.pixels!), gen, vae.config.scaling_factor));
        const [, h, w, ch] = latents.shape;
        const noise = tf.tidy(() => {
          const n = randnNHWC(gen, [b, ch, h, w]);
          // noise offset (Crosslabs): a per-channel constant shift, diffusers noise += offset * randn(B, C, 1, 1)
          return c.train.noise_offset ? tf.add(n, tf.mul(randnNHWC(gen, [b, ch, 1, 1]), c.train.noise_offset)) : n;
        }) as tf.Tensor4D;
        const timesteps = gen.randint(0, T, [b]);
        const captions = batch.captions.map((cap) => recipe.captionFor(cap, pick));
        const ids = captionIds(model, captions);
        // a frozen text encoder gives the same embedding for the same caption: cache it
        const frozenCtx = textCache ? tf.tidy(() => tf.stack(captions.map((cap) => textCache.get(cap))) as tf.Tensor3D) : undefined;
        const { value, grads } = tf.variableGrads(
          () => diffusionLoss(unetP.params, unetP.config, schedule, { latents, noise, timesteps, context: frozenCtx ?? recipe.encodeIds(ids) }, { predictionType: pred, minSnrGamma: c.train.min_snr_gamma, gradientCheckpointing: c.train.gradient_checkpointing }),
          [...vars.values()],
        );
        lossSum += (await value.data())[0];
        for (const [name, v] of vars) {
          const g = grads[v.name];
          const scaled = ga > 1 ? tf.div(g, ga) : g;
          const prev = acc.get(name);
          acc.set(name, prev ? tf.add(prev, scaled) : scaled);
          if (prev) prev.dispose();
          if (scaled !== g) g.dispose();
        }
        tf.dispose([value, latents, noise, ids]);
        frozenCtx?.dispose();
        disposeBatch(batch);
      }
      const loss = lossSum / ga;
      if (!Number.isFinite(loss)) {
        tf.dispose([...acc.values()]);
        throw new SdtuneError(
          'usage',
          `loss became ${loss} at step ${step + 1}; training stopped. The last checkpoint (${checkpoint || 'none yet'}) is intact. Try a lower learning rate.`,
        );
      }
      const { grads: clipped, totalNorm } = await clipGradNorm(acc, c.train.max_grad_norm);
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
      step++;
      losses.push(loss);
      lossEma = lossEma === null ? loss : 0.9 * lossEma + 0.1 * loss;
      const seconds = (performance.now() - t0) / 1000;
      tb.scalars({ loss, loss_smoothed: lossEma, lr, grad_norm: totalNorm, step_seconds: seconds }, step);
      bar?.tick(1, { loss: lossEma.toFixed(4), lr: lr.toExponential(2) });
      o.onStep?.(step, loss);
      if (c.output.sample_every && step % c.output.sample_every === 0 && step < total) await sampleImages(model, recipe, c, step, tb);
      const interrupted = o.signal?.aborted ?? false;
      if ((c.output.save_every && step % c.output.save_every === 0 && step < total) || interrupted) {
        checkpoint = await save();
        files.push(...(await recipe.export(c.output.dir, `${c.output.name}-${checkpointName(step)}`, step)));
      }
      if (interrupted) {
        bar?.done();
        log(`interrupted at step ${step}: checkpoint ${checkpoint}; continue with --resume ${c.output.dir}`);
        return { steps: step, losses, files, checkpoint, stopped: 'interrupted' };
      }
    }
    bar?.done();
    // 5. final outputs
    checkpoint = await save();
    files.push(...(await recipe.export(c.output.dir, c.output.name, step)));
    if (c.output.sample_every || c.output.sample_prompts.length) await sampleImages(model, recipe, c, step, tb);
    log(`done: ${step} steps; wrote ${files.join(', ')}`);
    return { steps: step, losses, files, checkpoint, stopped: 'done' };
  } finally {
    await tb?.close();
    for (const f of cleanups.reverse()) f();
  }
}

/** Validation images with the current weights: PNGs in <output>/samples and TensorBoard image summaries. */
async function sampleImages(model: LoadedModel, recipe: Recipe, c: TrainConfig, step: number, tb: TensorBoardWriter): Promise<void> {
  if (!c.output.sample_prompts.length) return;
  const [w, h] = c.data.resolution;
  await recipe.withInference(async () => {
    for (const [i, prompt] of c.output.sample_prompts.entries()) {
      const text = recipe.method === 'textual_inversion' ? recipe.captionFor(prompt, () => 0) : prompt;
      const r = await generate(model, {
        prompt: text,
        sampler: (c.output.sample_sampler as never) ?? samplerFromConfig(model.schedulerConfig),
        steps: c.output.sample_steps,
        cfg: 7.5,
        width: w,
        height: h,
        seed: c.output.sample_seed,
      });
      const rgb = toUint8(r.images[0]);
      await writePng(path.join(c.output.dir, 'samples', `${checkpointName(step)}-${i}.png`), rgb, w, h, `${prompt}\nSteps: ${c.output.sample_steps}, Seed: ${c.output.sample_seed}, Size: ${w}x${h}`);
      await tb.image(`samples/${i}`, { data: rgb, width: w, height: h }, step);
    }
  });
}
