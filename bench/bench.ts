/**
 * `npm run bench`: seconds and peak tensor memory of the three networks, per backend, for the tiny golden model
 * (when ../shared is present) and for SD v1 shapes with random weights at a selectable latent size.
 *   npm run bench -- [--backend cpu|wasm|tensorflow] [--latent 8] [--batch 2] [--skip-sd] [--tiny DIR]
 */
import * as tf from '@tensorflow/tfjs';
import { existsSync } from 'node:fs';
import path from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { loadModel } from '../src/io/model.js';
import { randomParams } from '../src/models/build.js';
import { clipText, clipTextParamShapes } from '../src/models/clip-text.js';
import { type ClipTextConfig, type UNetConfig, type VaeConfig, clipTextConfig, unetConfig, vaeConfig } from '../src/models/configs.js';
import { type ParamTree, disposeParams } from '../src/models/params.js';
import { SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG } from '../src/models/presets.js';
import { unet, unetParamShapes } from '../src/models/unet.js';
import { vaeDecode, vaeParamShapes } from '../src/models/vae.js';
import { selectBackend } from '../src/runtime/backend.js';

const argv = await yargs(hideBin(process.argv))
  .option('backend', { type: 'string' })
  .option('latent', { type: 'number', default: 8, describe: 'latent side for SD v1 shapes (64 = 512x512)' })
  .option('batch', { type: 'number', default: 2, describe: 'UNet batch (2 = one image with CFG)' })
  .option('skip-sd', { type: 'boolean', default: false, describe: 'only the tiny model' })
  .option('tiny', { type: 'string', default: path.resolve(import.meta.dirname, '../../shared/golden/tiny-sd') })
  .strict()
  .parse();

const backend = await selectBackend(argv.backend);
console.error(backend.message);

interface Row {
  backend: string;
  model: string;
  resolution: string;
  batch: number;
  component: string;
  seconds: number;
  peakMB: number;
}
const rows: Row[] = [];

/** Time one forward (result read back so lazy backends finish) and record tfjs' peak bytes during it. */
async function measure(model: string, latent: number, batch: number, component: string, fn: () => tf.Tensor): Promise<void> {
  const base = tf.memory().numBytes;
  const t0 = performance.now();
  let out: tf.Tensor | undefined;
  const prof = await tf.profile(async () => {
    out = fn();
    await out.data();
  });
  const seconds = (performance.now() - t0) / 1000;
  out?.dispose();
  rows.push({ backend: backend.name, model, resolution: `${latent * 8}x${latent * 8}`, batch, component, seconds, peakMB: (prof.peakBytes - base) / 1e6 });
  console.error(`  ${model} ${component}: ${seconds.toFixed(2)} s`);
}

async function benchModel(
  model: string,
  nets: { te: { config: ClipTextConfig; params: ParamTree }; unet: { config: UNetConfig; params: ParamTree }; vae: { config: VaeConfig; params: ParamTree } },
  latent: number,
): Promise<void> {
  const ids = tf.tensor2d(Array.from({ length: 77 }, (_, i) => (i === 0 ? 49406 : i < 10 ? 320 + i : 49407)), [1, 77], 'int32');
  await measure(model, latent, 1, 'text encoder', () => {
    const o = clipText(nets.te.params, nets.te.config, ids);
    tf.dispose([o.hiddenRaw, o.pooled]);
    return o.hidden;
  });
  const b = argv.batch;
  const x = tf.randomNormal([b, latent, latent, nets.unet.config.in_channels], 0, 1, 'float32', 1) as tf.Tensor4D;
  const ctx = tf.randomNormal([b, 77, nets.unet.config.cross_attention_dim], 0, 1, 'float32', 2) as tf.Tensor3D;
  await measure(model, latent, b, 'unet forward', () => unet(nets.unet.params, nets.unet.config, x, 500, ctx));
  const z = tf.randomNormal([1, latent, latent, nets.vae.config.latent_channels], 0, 1, 'float32', 3) as tf.Tensor4D;
  await measure(model, latent, 1, 'vae decode', () => vaeDecode(nets.vae.params, nets.vae.config, z));
  tf.dispose([ids, x, ctx, z]);
}

if (existsSync(path.join(argv.tiny, 'model_index.json'))) {
  const m = await loadModel(argv.tiny);
  await benchModel('tiny-sd', { te: m.textEncoder!, unet: m.unet!, vae: m.vae! }, m.unet!.config.sample_size);
  [m.textEncoder!, m.unet!, m.vae!].forEach((p) => disposeParams(p.params));
} else {
  console.error(`(tiny golden model not found at ${argv.tiny}: skipped)`);
}

if (!argv['skip-sd']) {
  console.error('SD v1 shapes, random weights (initialising ~1.07 B parameters)...');
  const te = clipTextConfig({ ...SD15_TEXT_ENCODER_CONFIG });
  const un = unetConfig({ ...SD15_UNET_CONFIG });
  const va = vaeConfig({ ...SD15_VAE_CONFIG });
  const nets = {
    te: { config: te, params: randomParams(clipTextParamShapes(te), 10) },
    unet: { config: un, params: randomParams(unetParamShapes(un), 20) },
    vae: { config: va, params: randomParams(vaeParamShapes(va), 30) },
  };
  await benchModel('sd-v1 (random)', nets, argv.latent);
  Object.values(nets).forEach((p) => disposeParams(p.params));
}

const header = ['backend', 'model', 'resolution', 'batch', 'component', 'seconds', 'peak MB'];
const table = rows.map((r) => [r.backend, r.model, r.resolution, String(r.batch), r.component, r.seconds.toFixed(3), r.peakMB.toFixed(1)]);
const widths = header.map((h, i) => Math.max(h.length, ...table.map((r) => r[i].length)));
const line = (cells: string[]) => '| ' + cells.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |';
console.log(line(header));
console.log('|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|');
for (const r of table) console.log(line(r));
