/**
 * `npm run bench`: one table of seconds and peak tensor memory per backend for
 *   - the networks: text encoder, UNet forward at batch 2 (one CFG step), VAE decode;
 *   - sampling: seconds per sampler step (CFG UNet + scheduler) and per image (encode + steps + decode);
 *   - training: one LoRA step (rank 4, batch 1) and one textual-inversion step (loss, gradients, AdamW);
 * on the bundled tiny model, the golden tiny model when ../shared is there, and SD v1 shapes with random weights.
 *   npm run bench -- [--backend cpu|wasm|tensorflow] [--latent 8] [--steps 10] [--no-random-weights] [--only nets,sample,train]
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
import { disposeParams, leaf, sub } from '../src/models/params.js';
import { SD15_SCHEDULER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG } from '../src/models/presets.js';
import { unet, unetParamShapes } from '../src/models/unet.js';
import { vaeDecode, vaeParamShapes } from '../src/models/vae.js';
import { assertFitsBackend, selectBackend } from '../src/runtime/backend.js';
import { TorchGenerator } from '../src/runtime/rng.js';
import { disposeState, initialState, planSampler, scaleModelInput, scheduleFromConfig, step } from '../src/schedulers/index.js';
import { diffusionLoss } from '../src/train/loss.js';
import { adamwStep, createAdamW, disposeAdamW } from '../src/train/optim.js';

const here = import.meta.dirname;
const argv = await yargs(hideBin(process.argv))
  .option('backend', { type: 'string' })
  .option('latent', { type: 'number', default: 8, describe: 'latent side for SD v1 shapes (64 = 512x512)' })
  .option('steps', { type: 'number', default: 10, describe: 'sampler steps for the per-image figure' })
  .option('random-weights', { type: 'boolean', default: true, describe: 'also SD v1 shapes with random weights (--no-random-weights: only the tiny models)' })
  .option('skip-sd', { type: 'boolean', default: false, describe: 'same as --no-random-weights' })
  .option('only', { type: 'string', default: 'nets,sample,train' })
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
}
const rows: Row[] = [];

/** Time `fn` (its result read back so lazy backends finish) and record tfjs' peak bytes above the baseline. */
async function measure(model: string, latent: number, batch: number, what: string, fn: () => tf.Tensor | tf.Tensor[]): Promise<number> {
  const base = tf.memory().numBytes;
  const t0 = performance.now();
  let out: tf.Tensor[] = [];
  const prof = await tf.profile(async () => {
    const r = fn();
    out = Array.isArray(r) ? r : [r];
    await Promise.all(out.map((t) => t.data()));
  });
  const seconds = (performance.now() - t0) / 1000;
  tf.dispose(out);
  rows.push({ model, resolution: `${latent * 8}x${latent * 8}`, batch, what, seconds, peakMB: (prof.peakBytes - base) / 1e6 });
  console.error(`  ${model} ${what}: ${seconds.toFixed(2)} s`);
  return seconds;
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
    teS = await measure(model, latent, 1, 'text encoder', () => {
      const o = clipText(te.params, te.config, ids);
      tf.dispose([o.hiddenRaw, o.pooled]);
      return o.hidden;
    });
    const x2 = tf.concat([x1, x1]) as tf.Tensor4D;
    const ctx2 = tf.concat([ctx1, ctx1]) as tf.Tensor3D;
    unetS = await measure(model, latent, 2, 'unet forward', () => unet(un.params, un.config, x2, 500, ctx2));
    const z = tf.randomNormal([1, latent, latent, vae.config.latent_channels], 0, 1, 'float32', 3) as tf.Tensor4D;
    vaeS = await measure(model, latent, 1, 'vae decode', () => vaeDecode(vae.params, vae.config, z));
    if (parts.has('sample')) {
      // one sampler step: CFG UNet pass + DPM++ 2M update (the scheduler math is negligible next to the UNet)
      const plan = planSampler('dpmpp_2m', m.schedulerConfig, argv.steps);
      const state = initialState(plan);
      const stepS = await measure(model, latent, 2, 'sampler step (cfg)', () => {
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
  if (parts.has('train')) {
    const schedule = scheduleFromConfig(m.schedulerConfig);
    const batch = { latents: x1, noise: tf.randomNormal(x1.shape, 0, 1, 'float32', 4) as tf.Tensor4D, timesteps: Int32Array.from([500]), context: ctx1 };
    // LoRA rank 4 on the UNet attention projections
    const vars = injectLora(un.params, loraTargetModules(un.params, 'unet', 'attn'), { rank: 4, alpha: 4, gen: new TorchGenerator(0) });
    const opt = createAdamW(vars);
    const list = [...vars.values()];
    await measure(model, latent, 1, 'train step: LoRA r4', () => {
      const { value, grads } = tf.variableGrads(() => diffusionLoss(un.params, un.config, schedule, batch, { predictionType: 'epsilon' }), list);
      adamwStep(opt, vars, new Map([...vars].map(([k, v]) => [k, grads[v.name]])), { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 1e-2 });
      tf.dispose(Object.values(grads));
      return value;
    });
    disposeAdamW(opt);
    const { removeLora } = await import('../src/adapters/lora-inject.js');
    removeLora(un.params);
    // textual inversion: one trainable row through the text encoder and the UNet
    const table = leaf(sub(te.params, 'text_model', 'embeddings', 'token_embedding'), 'weight');
    const row = ownedVariable(table.slice([320, 0], [1, -1]).clone(), `bench/ti#${model}`);
    const rowVars = new Map([['row', row]]);
    const opt2 = createAdamW(rowVars);
    await measure(model, latent, 1, 'train step: TI', () => {
      const { value, grads } = tf.variableGrads(() => {
        const tok = tf.gather(table, ids);
        const emb = tf.concat([tok.slice([0, 0, 0], [1, 5, -1]), row.reshape([1, 1, -1]), tok.slice([0, 6, 0], [1, -1, -1])], 1) as tf.Tensor3D;
        const context = clipText(te.params, te.config, ids, { inputEmbeds: emb }).hidden;
        return diffusionLoss(un.params, un.config, schedule, { ...batch, context }, { predictionType: 'epsilon' });
      }, [row]);
      adamwStep(opt2, rowVars, new Map([['row', grads[row.name]]]), { lr: 5e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 });
      tf.dispose(Object.values(grads));
      return value;
    });
    disposeAdamW(opt2);
    row.dispose();
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
  const nets: Nets = {
    textEncoder: { config: te, params: randomParams(clipTextParamShapes(te), 10) },
    unet: { config: un, params: randomParams(unetParamShapes(un), 20) },
    vae: { config: va, params: randomParams(vaeParamShapes(va), 30) },
    schedulerConfig: { ...SD15_SCHEDULER_CONFIG },
  };
  await benchModel('sd-v1 (random)', nets, argv.latent);
  [nets.textEncoder!, nets.unet!, nets.vae!].forEach((p) => disposeParams(p.params));
}

const header = ['backend', 'model', 'resolution', 'batch', 'what', 'seconds', 'peak MB'];
const table = rows.map((r) => [backend.name, r.model, r.resolution, String(r.batch), r.what, r.seconds.toFixed(3), Number.isNaN(r.peakMB) ? '-' : r.peakMB.toFixed(1)]);
const widths = header.map((h, i) => Math.max(h.length, ...table.map((r) => r[i].length)));
const line = (cells: string[]) => '| ' + cells.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |';
console.log(line(header));
console.log('|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|');
for (const r of table) console.log(line(r));
