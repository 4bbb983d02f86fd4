/**
 * `npm run bench`: one table of seconds and peak tensor memory per backend for
 *   - the networks: text encoder, UNet forward at batch 2 (one CFG step), VAE decode;
 *   - sampling: seconds per sampler step (CFG UNet + scheduler) and per image (encode + steps + decode);
 *   - training: one step (loss, gradients, AdamW) of LoRA rank 4 (attention; with and without gradient checkpointing),
 *     LoCon (attn+ff+conv), textual inversion and full fine-tuning of the UNet (plain, gradient checkpointing, + EMA;
 *     SD v1 shapes with --full-ft only);
 *   - the toy world (../shared/toyworld.md): its UNet's full training step at batch 64 on 8x8 latents and its VAE's
 *     at batch 32 on 32x32 images, with the PyTorch figures measured on this machine kind for the ratio;
 * on the bundled tiny model, the golden tiny model when ../shared is there, and SD v1 shapes with random weights.
 * Peak MB counts unique tensor buffers above what was live before (runtime/memory.ts measurePeak).
 *   npm run bench -- [--backend webgpu|tensorflow|wasm|cpu] [--latent 8] [--steps 10] [--no-random-weights]
 *     [--only nets,sample,train,toy] [--full-ft]
 */
import * as tf from '@tensorflow/tfjs';
import { existsSync } from 'node:fs';
import path from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { injectLora, loraTargetModules, ownedVariable } from '../src/adapters/lora-inject.js';
import { type LoadedModel, loadModel } from '../src/io/model.js';
import { randomParams } from '../src/models/build.js';
import { clipText, clipTextParamShapes } from '../src/models/clip-text.js';
import { clipTextConfig, unetConfig, vaeConfig } from '../src/models/configs.js';
import { type ParamTree, disposeParams, flattenParams, leaf, sub, unflattenParams } from '../src/models/params.js';
import { SD15_SCHEDULER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG } from '../src/models/presets.js';
import { unet, unetParamShapes } from '../src/models/unet.js';
import { vaeDecode, vaeEncode, vaeParamShapes } from '../src/models/vae.js';
import { assertFitsBackend, selectBackend } from '../src/runtime/backend.js';
import { TorchGenerator } from '../src/runtime/rng.js';
import { disposeState, initialState, planSampler, scaleModelInput, scheduleFromConfig, step } from '../src/schedulers/index.js';
import { measurePeak } from '../src/runtime/memory.js';
import { diffusionLoss } from '../src/train/loss.js';
import { createEma, disposeEma, emaStep } from '../src/train/ema.js';
import { adamwStep, createAdamW, disposeAdamW } from '../src/train/optim.js';

const here = import.meta.dirname;
const argv = await yargs(hideBin(process.argv))
  .option('backend', { type: 'string' })
  .option('latent', { type: 'number', default: 8, describe: 'latent side for SD v1 shapes (64 = 512x512)' })
  .option('steps', { type: 'number', default: 10, describe: 'sampler steps for the per-image figure' })
  .option('random-weights', { type: 'boolean', default: true, describe: 'also SD v1 shapes with random weights (--no-random-weights: only the tiny models)' })
  .option('skip-sd', { type: 'boolean', default: false, describe: 'same as --no-random-weights' })
  .option('only', { type: 'string', default: 'nets,sample,train,toy', describe: 'parts: nets, sample, train, toy, fullft (only the full fine-tuning rows of train)' })
  .option('full-ft', { type: 'boolean', default: false, describe: 'also full UNet fine-tuning on SD v1 shapes (weights, gradients, AdamW and an EMA: ~17 GB; off by default)' })
  .strict()
  .parse();
const parts = new Set(argv.only.split(','));

const backend = await selectBackend(argv.backend);
console.error(backend.message);

interface Row {
  model: string;
  resolution: string;
  batch: number;
  what: string;
  seconds: number;
  peakMB: number;
  /** PyTorch 2 CPU (2 threads) seconds for the same work on this machine kind, where measured */
  torch?: number;
}
const rows: Row[] = [];
/** warm-up runs (one untimed run first) for the small models; SD v1 shapes are too slow on CPU backends to run twice */
let warmByDefault = true;

/**
 * Time `fn` (its results read back so lazy backends finish) and record the peak of unique tensor bytes above the
 * baseline. One untimed warm-up run first where asked (shader compilation on webgpu, XNNPACK operator setup).
 */
async function measure(
  model: string,
  px: number,
  batch: number,
  what: string,
  fn: () => tf.Tensor | tf.Tensor[],
  o: { warmup?: boolean; torch?: number } = {},
): Promise<number> {
  const run = async () => {
    const r = fn();
    const out = Array.isArray(r) ? r : [r];
    await Promise.all(out.map((t) => t.data()));
    tf.dispose(out);
  };
  if (o.warmup ?? warmByDefault) await run();
  const t0 = performance.now();
  const { peakBytes } = await measurePeak(run);
  const seconds = (performance.now() - t0) / 1000;
  rows.push({ model, resolution: `${px}x${px}`, batch, what, seconds, peakMB: peakBytes / 1e6, torch: o.torch });
  console.error(`  ${model} ${what}: ${seconds.toFixed(3)} s, peak ${(peakBytes / 1e6).toFixed(1)} MB`); // each row as it is measured: a long run stopped early keeps its rows
  return seconds;
}

/** Every leaf of a params tree as a trainable variable (full fine-tuning); the original tensors are disposed. */
function trainable(tree: ParamTree, tag: string): { tree: ParamTree; vars: Map<string, tf.Variable> } {
  const vars = new Map<string, tf.Variable>();
  for (const [k, t] of flattenParams(tree)) {
    vars.set(k, tf.variable(t, true, `bench/${tag}/${k}`));
    t.dispose();
  }
  return { tree: unflattenParams(vars), vars };
}

const ADAM = { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 1e-2 };

/** One optimizer step: loss and gradients of `vars`, AdamW applied; returns the loss. */
function trainStep(vars: Map<string, tf.Variable>, opt: ReturnType<typeof createAdamW>, loss: () => tf.Scalar): tf.Scalar {
  const list = [...vars.values()];
  const { value, grads } = tf.variableGrads(loss, list);
  adamwStep(opt, vars, new Map([...vars].map(([k, v]) => [k, grads[v.name]])), ADAM);
  tf.dispose(Object.values(grads));
  return value;
}

type Nets = Pick<LoadedModel, 'unet' | 'vae' | 'textEncoder' | 'schedulerConfig'>;

async function benchModel(model: string, m: Nets, latent: number): Promise<void> {
  const te = m.textEncoder!;
  const un = m.unet!;
  const vae = m.vae!;
  const eos = te.config.eos_token_id;
  const ids = tf.tensor2d(Array.from({ length: 77 }, (_, i) => (i === 0 ? te.config.bos_token_id : i < 10 ? 300 + i : eos)), [1, 77], 'int32');
  const x1 = tf.randomNormal([1, latent, latent, un.config.in_channels], 0, 1, 'float32', 1) as tf.Tensor4D;
  const ctx1 = tf.randomNormal([1, 77, un.config.cross_attention_dim], 0, 1, 'float32', 2) as tf.Tensor3D;
  let teS = 0, unetS = 0, vaeS = 0;
  if (parts.has('nets') || parts.has('sample')) {
    teS = await measure(model, latent * 8, 1, 'text encoder', () => {
      const o = clipText(te.params, te.config, ids);
      tf.dispose([o.hiddenRaw, o.pooled]);
      return o.hidden;
    });
    const x2 = tf.concat([x1, x1]) as tf.Tensor4D;
    const ctx2 = tf.concat([ctx1, ctx1]) as tf.Tensor3D;
    unetS = await measure(model, latent * 8, 2, 'unet forward', () => unet(un.params, un.config, x2, 500, ctx2));
    const z = tf.randomNormal([1, latent, latent, vae.config.latent_channels], 0, 1, 'float32', 3) as tf.Tensor4D;
    vaeS = await measure(model, latent * 8, 1, 'vae decode', () => vaeDecode(vae.params, vae.config, z));
    if (parts.has('sample')) {
      // one sampler step: CFG UNet pass + DPM++ 2M update (the scheduler math is negligible next to the UNet)
      const plan = planSampler('dpmpp_2m', m.schedulerConfig, argv.steps);
      const state = initialState(plan);
      const stepS = await measure(model, latent * 8, 2, 'sampler step (cfg)', () => {
        const eps = tf.tidy(() => {
          const out = unet(un.params, un.config, scaleModelInput(plan, state, x2, 0) as tf.Tensor4D, plan.timesteps[0], ctx2);
          const [u, c] = tf.split(out, 2, 0);
          return tf.add(u, tf.mul(tf.sub(c, u), 7.5));
        });
        const r = step(plan, state, eps, 0, x1);
        eps.dispose();
        disposeState(r.state);
        r.predOriginal.dispose();
        return r.prevSample;
      });
      disposeState(state);
      rows.push({ model, resolution: `${latent * 8}x${latent * 8}`, batch: 1, what: `image, ${argv.steps} steps (derived)`, seconds: 2 * teS + argv.steps * stepS + vaeS, peakMB: NaN });
    }
    tf.dispose([x2, ctx2, z]);
  }
  if (parts.has('train') || parts.has('fullft')) {
    const schedule = scheduleFromConfig(m.schedulerConfig);
    const batch = { latents: x1, noise: tf.randomNormal(x1.shape, 0, 1, 'float32', 4) as tf.Tensor4D, timesteps: Int32Array.from([500]), context: ctx1 };
    const { removeLora } = await import('../src/adapters/lora-inject.js');
    // LoRA rank 4 on the attention projections (with and without gradient checkpointing), then LoCon (attn+ff+conv)
    const loraRuns: [string, 'attn' | 'attn+ff+conv', boolean][] = [
      ['train step: LoRA r4', 'attn', false],
      ['train step: LoRA r4, grad ckpt', 'attn', true],
      ['train step: LoCon r4 (attn+ff+conv)', 'attn+ff+conv', false],
    ];
    for (const [what, targets, ckpt] of parts.has('train') ? loraRuns : []) {
      const vars = injectLora(un.params, loraTargetModules(un.params, 'unet', targets), { rank: 4, alpha: 4, gen: new TorchGenerator(0) });
      const opt = createAdamW(vars);
      await measure(model, latent * 8, 1, what, () =>
        trainStep(vars, opt, () => diffusionLoss(un.params, un.config, schedule, batch, { predictionType: 'epsilon', gradientCheckpointing: ckpt })),
      );
      disposeAdamW(opt);
      removeLora(un.params);
    }
    // textual inversion: one trainable row through the text encoder and the UNet
    if (parts.has('train')) {
      const table = leaf(sub(te.params, 'text_model', 'embeddings', 'token_embedding'), 'weight');
      const row = ownedVariable(table.slice([320, 0], [1, -1]).clone(), `bench/ti#${model}`);
      const rowVars = new Map([['row', row]]);
      const opt2 = createAdamW(rowVars);
      await measure(model, latent * 8, 1, 'train step: TI', () =>
        trainStep(rowVars, opt2, () => {
          const tok = tf.gather(table, ids);
          const emb = tf.concat([tok.slice([0, 0, 0], [1, 5, -1]), row.reshape([1, 1, -1]), tok.slice([0, 6, 0], [1, -1, -1])], 1) as tf.Tensor3D;
          const context = clipText(te.params, te.config, ids, { inputEmbeds: emb }).hidden;
          return diffusionLoss(un.params, un.config, schedule, { ...batch, context }, { predictionType: 'epsilon' });
        }),
      );
      disposeAdamW(opt2);
      row.dispose();
      // an A1111 hypernetwork ([1, 2, 1], A1111's defaults) on every attention width: only its MLPs train
      const hn = await import('../src/adapters/hypernetwork.js');
      const net = hn.createHypernetwork({ widths: (await import('../src/train/recipes/hypernetwork.js')).modelAttentionWidths(un.config), gen: new TorchGenerator(0) });
      const hnVars = new Map(hn.hypernetworkTensors(net).map((t, i) => [String(i), t as tf.Variable]));
      const opt4 = createAdamW(hnVars);
      const hnForward = { training: true, rng: new TorchGenerator(1), context: hn.hypernetworkAdapter([{ net }]) };
      await measure(model, latent * 8, 1, 'train step: hypernetwork [1, 2, 1]', () =>
        trainStep(hnVars, opt4, () => diffusionLoss(un.params, un.config, schedule, batch, { predictionType: 'epsilon', forward: hnForward })),
      );
      disposeAdamW(opt4);
      hn.disposeHypernetwork(net);
    }
    // full fine-tuning of the UNet: every weight trainable (weights + grads + 2 AdamW moments; SD v1 shapes only with
    // --full-ft: ~14 GB before activations, ~17 GB with the EMA). Peak MB is above the weights, moments and EMA (all
    // live before the step): the step's activations under the tape plus the gradients.
    if (un.config.block_out_channels[0] < 320 || argv['full-ft']) {
      const full = trainable(un.params, model);
      const opt3 = createAdamW(full.vars);
      const loss = (ckpt: boolean) => () => diffusionLoss(full.tree, un.config, schedule, batch, { predictionType: 'epsilon', gradientCheckpointing: ckpt });
      await measure(model, latent * 8, 1, 'train step: full fine-tune (UNet)', () => trainStep(full.vars, opt3, loss(false)));
      await measure(model, latent * 8, 1, 'train step: full FT, grad ckpt', () => trainStep(full.vars, opt3, loss(true)));
      const ema = createEma(full.vars, { decay: 0.9999 });
      await measure(model, latent * 8, 1, 'train step: full FT + EMA', () => {
        const l = trainStep(full.vars, opt3, loss(false));
        emaStep(ema, full.vars);
        return l;
      });
      disposeEma(ema);
      disposeAdamW(opt3);
      un.params = full.tree; // the variables now hold the weights (disposed with the model)
    }
    batch.noise.dispose();
  }
  tf.dispose([ids, x1, ctx1]);
}

for (const [name, dir] of [['tiny-sd-v1 (bundled)', path.resolve(here, '../checkpoints/tiny-sd-v1')], ['tiny-sd (golden)', path.resolve(here, '../../shared/golden/tiny-sd')]] as const) {
  if (!existsSync(path.join(dir, 'model_index.json'))) {
    console.error(`(${name} not found at ${dir}: skipped)`);
    continue;
  }
  const m = await loadModel(dir);
  await benchModel(name, m, m.unet!.config.sample_size);
  [m.textEncoder!, m.unet!, m.vae!].forEach((p) => disposeParams(p.params));
}

/**
 * The toy world of ../shared/toyworld.md: its UNet (32,64,64; CrossAttnDown x2 + Down; 4 heads; cross-attention 64;
 * 8x8x4 latents) trained in full at batch 64, and its VAE (32,64,64; 4x down; 4 latent channels) at batch 32 on 32x32
 * images (MSE + 1e-6 KL). PyTorch 2 CPU on this machine kind: 0.26 s and 0.35 s per step.
 */
async function benchToy(): Promise<void> {
  // the configs the toy model builder writes (src/data/toy-model.ts)
  const toy = (await import('../src/data/toy-model.js')).toyModelConfigs();
  const ucfg = unetConfig(toy.unet);
  const vcfg = vaeConfig(toy.vae);
  const schedule = scheduleFromConfig({ ...SD15_SCHEDULER_CONFIG });
  const u = trainable(randomParams(unetParamShapes(ucfg), 40), 'toy-unet');
  const uopt = createAdamW(u.vars);
  const B = 64;
  const batch = {
    latents: tf.randomNormal([B, 8, 8, 4], 0, 1, 'float32', 41) as tf.Tensor4D,
    noise: tf.randomNormal([B, 8, 8, 4], 0, 1, 'float32', 42) as tf.Tensor4D,
    timesteps: Int32Array.from({ length: B }, (_, i) => (i * 997) % 1000),
    context: tf.randomNormal([B, 12, 64], 0, 1, 'float32', 43) as tf.Tensor3D,
  };
  await measure('toy world UNet (1.5 M)', 32, B, 'train step: full', () => trainStep(u.vars, uopt, () => diffusionLoss(u.tree, ucfg, schedule, batch, { predictionType: 'epsilon' })), {
    warmup: true,
    torch: 0.26,
  });
  disposeAdamW(uopt);
  disposeParams(u.tree);
  tf.dispose([batch.latents, batch.noise, batch.context]);
  const v = trainable(randomParams(vaeParamShapes(vcfg), 50), 'toy-vae');
  const vopt = createAdamW(v.vars);
  const images = tf.randomUniform([32, 32, 32, 3], -1, 1, 'float32', 51) as tf.Tensor4D;
  const eps = tf.randomNormal([32, 8, 8, 4], 0, 1, 'float32', 52) as tf.Tensor4D;
  const vaeLoss = () =>
    tf.tidy(() => {
      const d = vaeEncode(v.tree, vcfg, images);
      const z = tf.add(d.mean, tf.mul(d.std, eps)) as tf.Tensor4D;
      const rec = tf.mean(tf.square(tf.sub(vaeDecode(v.tree, vcfg, z), images)));
      // KL(q || N(0,1)) summed per sample, averaged over the batch
      const kl = tf.mul(0.5, tf.sum(tf.sub(tf.add(tf.square(d.mean), tf.exp(d.logvar)), tf.add(d.logvar, 1)), [1, 2, 3]).mean());
      return tf.add(rec, tf.mul(1e-6, kl)) as tf.Scalar;
    });
  await measure('toy world VAE (0.95 M)', 32, 32, 'train step: full', () => trainStep(v.vars, vopt, vaeLoss), { warmup: true, torch: 0.35 });
  disposeAdamW(vopt);
  disposeParams(v.tree);
  tf.dispose([images, eps]);
}
if (parts.has('toy')) await benchToy();

const te = clipTextConfig({ ...SD15_TEXT_ENCODER_CONFIG });
const un = unetConfig({ ...SD15_UNET_CONFIG });
const va = vaeConfig({ ...SD15_VAE_CONFIG });
const sdBytes = [clipTextParamShapes(te), unetParamShapes(un), vaeParamShapes(va)].reduce((a, m) => a + [...m.values()].reduce((b, s) => b + 4 * s.reduce((x, y) => x * y, 1), 0), 0);
let fits = true;
try {
  assertFitsBackend(sdBytes, 'SD v1 (random weights)');
} catch (e) {
  fits = false;
  console.error(`(SD v1 shapes skipped: ${(e as Error).message})`);
}
if (argv['random-weights'] && !argv['skip-sd'] && fits) {
  console.error('SD v1 shapes, random weights (initialising ~1.07 B parameters)...');
  warmByDefault = tf.getBackend() === 'webgpu';
  const nets: Nets = {
    textEncoder: { config: te, params: randomParams(clipTextParamShapes(te), 10) },
    unet: { config: un, params: randomParams(unetParamShapes(un), 20) },
    vae: { config: va, params: randomParams(vaeParamShapes(va), 30) },
    schedulerConfig: { ...SD15_SCHEDULER_CONFIG },
  };
  await benchModel('sd-v1 (random)', nets, argv.latent);
  [nets.textEncoder!, nets.unet!, nets.vae!].forEach((p) => disposeParams(p.params));
}

// the torch-compatible generator on the host (no backend): latents of a batch of 2 at 1024x1024
{
  const g = new TorchGenerator(0);
  g.randn([2, 4, 64, 64]); // warm-up
  const t0 = performance.now();
  g.randn([2, 4, 128, 128]);
  rows.push({ model: 'torch RNG', resolution: '1024x1024', batch: 2, what: 'randn latents [2,4,128,128]', seconds: (performance.now() - t0) / 1000, peakMB: NaN });
}

// PyTorch 2 CPU (2 threads), SD v1 shapes at 512x512: one CFG UNet step at batch 2 took 14.75 s on this machine kind
for (const r of rows) if (r.model.startsWith('sd-v1') && r.resolution === '512x512' && r.what === 'sampler step (cfg)') r.torch = 14.75;
const header = ['backend', 'model', 'resolution', 'batch', 'what', 'seconds', 'peak MB', 'x PyTorch'];
const table = rows.map((r) => [
  backend.name,
  r.model,
  r.resolution,
  String(r.batch),
  r.what,
  r.seconds.toFixed(3),
  Number.isNaN(r.peakMB) ? '-' : r.peakMB.toFixed(1),
  r.torch ? (r.seconds / r.torch).toFixed(2) : '-',
]);
const widths = header.map((h, i) => Math.max(h.length, ...table.map((r) => r[i].length)));
const line = (cells: string[]) => '| ' + cells.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |';
console.log(line(header));
console.log('|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|');
for (const r of table) console.log(line(r));
