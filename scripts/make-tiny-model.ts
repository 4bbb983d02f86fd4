/**
 * Builds the bundled tiny model checkpoints/tiny-sd-v1/ (see checkpoints/README.md): SD v1's exact architecture at
 * toy widths, random weights, and a CLIP-format BPE vocabulary trained on scripts/tiny-vocab-corpus.txt by our own
 * trainer. Deterministic: the same corpus and code give byte-identical files.
 *
 *   npx tsx scripts/make-tiny-model.ts [--out checkpoints/tiny-sd-v1] [--overwrite]
 *
 * The components are drawn with randomParams (fixed seeds), staged as a plain diffusers folder (f32) and then written
 * by convertCheckpoint (src/io/convert.ts), the project's own diffusers writer: model_index.json, sorted configs,
 * fp16 safetensors, scheduler and tokenizer folders.
 */
import { mkdir, mkdtemp, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import { convertCheckpoint } from '../src/io/convert.js';
import { tensorToTorch } from '../src/io/layout.js';
import { writeSafetensors, type WritableTensor } from '../src/io/safetensors.js';
import { randomParams } from '../src/models/build.js';
import { clipTextParamShapes } from '../src/models/clip-text.js';
import { clipTextConfig, unetConfig, vaeConfig } from '../src/models/configs.js';
import { disposeParams, flattenParams } from '../src/models/params.js';
import { SD15_SCHEDULER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG } from '../src/models/presets.js';
import { unetParamShapes } from '../src/models/unet.js';
import { vaeParamShapes } from '../src/models/vae.js';
import { clipTokenizerFiles, countWords, trainBpe, type BpeModel } from '../src/tokenizer/train-bpe.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** Default output folder: the bundled model. */
export const TINY_MODEL_DIR = path.join(ROOT, 'checkpoints', 'tiny-sd-v1');
/** The word corpus the vocabulary is trained on. */
export const TINY_CORPUS = path.join(ROOT, 'scripts', 'tiny-vocab-corpus.txt');

/** First randomParams seed of each component (each tensor takes the next seed; the ranges never overlap). */
export const TINY_SEEDS = { text_encoder: 1_000_000, unet: 2_000_000, vae: 3_000_000 } as const;

/** Text width = UNet cross-attention width. */
const TEXT_WIDTH = 32;

/** The tiny vocabulary: every word of the corpus ends up as one token (BPE run to completion). */
export async function trainTinyVocabulary(corpus = TINY_CORPUS): Promise<BpeModel> {
  return trainBpe(countWords(await readFile(corpus, 'utf8')), { minFrequency: 1 });
}

/** diffusers/transformers configs of the tiny model: SD v1.5's presets with only the sizes changed. */
export function tinyConfigs(vocab: BpeModel): Record<'unet' | 'vae' | 'text_encoder' | 'scheduler', Record<string, unknown>> {
  return {
    unet: {
      ...SD15_UNET_CONFIG,
      block_out_channels: [32, 32, 64, 64],
      attention_head_dim: 8, // SD v1's 8 heads (head size 4 / 8)
      cross_attention_dim: TEXT_WIDTH,
      norm_num_groups: 8,
      sample_size: 8, // 8x8 latents: 64x64 images by default
    },
    vae: {
      ...SD15_VAE_CONFIG,
      block_out_channels: [16, 32, 32, 32],
      layers_per_block: 1,
      norm_num_groups: 8,
      sample_size: 64,
    },
    text_encoder: {
      ...SD15_TEXT_ENCODER_CONFIG,
      hidden_size: TEXT_WIDTH,
      intermediate_size: 4 * TEXT_WIDTH,
      num_attention_heads: 4,
      num_hidden_layers: 3,
      projection_dim: TEXT_WIDTH,
      vocab_size: vocab.eosId + 1,
      bos_token_id: vocab.bosId,
      eos_token_id: vocab.eosId,
      pad_token_id: vocab.eosId, // SD v1: pad = eos
    },
    scheduler: { ...SD15_SCHEDULER_CONFIG },
  };
}

const WEIGHTS = { unet: 'diffusion_pytorch_model.safetensors', vae: 'diffusion_pytorch_model.safetensors', text_encoder: 'model.safetensors' } as const;

/** Random weights of one component in torch layout (diffusers keys), f32. */
async function randomComponent(spec: Map<string, number[]>, seed: number): Promise<Map<string, WritableTensor>> {
  const params = randomParams(spec, seed);
  try {
    const out = new Map<string, WritableTensor>();
    for (const [key, t] of flattenParams(params)) {
      const host = await tensorToTorch(key, t);
      out.set(key, { shape: host.shape, data: host.data, dtype: 'F32' });
    }
    return out;
  } finally {
    disposeParams(params);
  }
}

/** Options of makeTinyModel. */
export interface MakeTinyOptions {
  corpus?: string;
  /** replace an existing, non-empty output folder */
  overwrite?: boolean;
  /** store weights as F16 (default true; keeps the folder around 6 MB) */
  half?: boolean;
}

/** Build the tiny model folder at `out`; returns the vocabulary size and each written file's size in bytes. */
export async function makeTinyModel(out = TINY_MODEL_DIR, opts: MakeTinyOptions = {}): Promise<{ vocabSize: number; files: Record<string, number> }> {
  await tf.setBackend('cpu');
  await tf.ready();
  const existing = await readdir(out).catch(() => [] as string[]);
  if (existing.length && !opts.overwrite) throw new Error(`${out} already exists and is not empty; pass --overwrite to rebuild it`);
  const vocab = await trainTinyVocabulary(opts.corpus);
  const configs = tinyConfigs(vocab);
  const specs = {
    text_encoder: clipTextParamShapes(clipTextConfig(configs.text_encoder)),
    unet: unetParamShapes(unetConfig(configs.unet)),
    vae: vaeParamShapes(vaeConfig(configs.vae)),
  };
  const stage = await mkdtemp(path.join(tmpdir(), 'sdtune-tiny-'));
  try {
    for (const c of ['text_encoder', 'unet', 'vae'] as const) {
      await mkdir(path.join(stage, c));
      await writeFile(path.join(stage, c, 'config.json'), JSON.stringify(configs[c]));
      await writeSafetensors(path.join(stage, c, WEIGHTS[c]), await randomComponent(specs[c], TINY_SEEDS[c]), { metadata: { format: 'pt' } });
    }
    await mkdir(path.join(stage, 'scheduler'));
    await writeFile(path.join(stage, 'scheduler', 'scheduler_config.json'), JSON.stringify(configs.scheduler));
    await mkdir(path.join(stage, 'tokenizer'));
    for (const [name, text] of Object.entries(clipTokenizerFiles(vocab))) await writeFile(path.join(stage, 'tokenizer', name), text);
    // Written next to `out` first, so that a failure leaves an existing model untouched.
    const fresh = `${path.resolve(out)}.new-${process.pid}`;
    await mkdir(path.dirname(fresh), { recursive: true });
    await convertCheckpoint(stage, fresh, { to: 'diffusers', half: opts.half ?? true });
    await rm(out, { recursive: true, force: true });
    await rename(fresh, out);
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
  const files: Record<string, number> = {};
  const walk = async (dir: string): Promise<void> => {
    for (const e of (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else files[path.relative(out, p)] = (await stat(p)).size;
    }
  };
  await walk(out);
  return { vocabSize: vocab.eosId + 1, files };
}

/** CLI entry: parse --out / --corpus / --overwrite, build, print the file sizes. */
async function main(argv: string[]): Promise<void> {
  let out = TINY_MODEL_DIR;
  let corpus: string | undefined;
  let overwrite = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--out' && argv[i + 1]) out = argv[++i]!;
    else if (a === '--corpus' && argv[i + 1]) corpus = argv[++i]!;
    else if (a === '--overwrite') overwrite = true;
    else throw new Error(`unknown argument ${a} (usage: make-tiny-model.ts [--out DIR] [--corpus FILE] [--overwrite])`);
  }
  const t0 = performance.now();
  const r = await makeTinyModel(out, { corpus, overwrite });
  let total = 0;
  for (const [f, n] of Object.entries(r.files)) {
    total += n;
    process.stdout.write(`${String(n).padStart(9)}  ${f}\n`);
  }
  process.stdout.write(`${String(total).padStart(9)}  total (${r.vocabSize} tokens) in ${out}, ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).catch((e: unknown) => {
    process.stderr.write(`error: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(1);
  });
}
