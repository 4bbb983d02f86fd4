/**
 * `sdtune sample` as a library call: load a model, apply LoRAs and embeddings, generate with the pipeline and write
 * PNGs carrying A1111's `parameters` text. Everything the CLI does is here, with typed options.
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { parseAdapterArg, mergeLora, readLora } from '../adapters/lora.js';
import { applyEmbeddings, describeEmbeddingUse, readEmbedding } from '../adapters/embeddings.js';
import { usageError } from '../errors.js';
import { embeddingHash, loraHash, modelHash } from '../io/hashes.js';
import { type LoadedModel, type OpenModelOptions, disposeModel, loadModel } from '../io/model.js';
import { formatInfotext, readImageRgb, writePng } from '../io/png.js';
import { setAttentionChunkElements } from '../models/layers.js';
import { TargetExistsError } from '../runtime/atomic.js';
import { progress } from '../runtime/progress.js';
import { SAMPLER_LABELS, type SamplerName, resolveSampler } from '../schedulers/index.js';
import { assertSamplingFits, checkImageSize, fmtBytes } from './budget.js';
import { type RgbImage, generate, resolveGenerateOptions, toUint8 } from './pipeline.js';

export const SDTUNE_VERSION = '0.1.0';

export interface SampleOptions {
  model: string;
  prompt: string;
  negativePrompt?: string;
  /** -1 or undefined: random */
  seed?: number;
  steps?: number;
  cfg?: number;
  /** our name, A1111's or diffusers' class name; default: the model's scheduler config */
  sampler?: string;
  width?: number;
  height?: number;
  batchSize?: number;
  nIter?: number;
  clipSkip?: number;
  initImage?: string;
  strength?: number;
  mask?: string;
  /** "file.safetensors[:weight]" */
  lora?: string[];
  /** "file.safetensors[:token]" */
  embedding?: string[];
  /** a .png file (one image) or a directory */
  out?: string;
  eta?: number;
  /** max attention score elements at once (memory) */
  attentionChunk?: number;
  load?: OpenModelOptions;
  /** replace an existing `out` PNG (default: refuse) */
  overwrite?: boolean;
  /** no progress output (default: a bar on a TTY, a line every ~10% of the steps and >= 10 s apart elsewhere) */
  quiet?: boolean;
  /** notes for the user, e.g. which embeddings the prompts use (default: stderr) */
  log?: (line: string) => void;
  /** refuse sizes whose estimated memory exceeds the backend's budget (default true) */
  memoryCheck?: boolean;
}

export interface SampleResult {
  files: string[];
  seeds: number[];
  sampler: SamplerName;
}

const loadRgb = (img: { data: Uint8Array; width: number; height: number }): RgbImage => ({
  data: Float32Array.from(img.data, (v) => v / 255),
  width: img.width,
  height: img.height,
});

/** Next free A1111-style number in an output folder (NNNNN-SEED.png). */
function nextIndex(dir: string): number {
  if (!existsSync(dir)) return 0;
  let n = 0;
  for (const f of readdirSync(dir)) {
    const m = /^(\d{5})-/.exec(f);
    if (m) n = Math.max(n, Number(m[1]) + 1);
  }
  return n;
}

/** Hash of the model file(s) for the PNG text: the single file's, or the UNet weights' of a diffusers folder. */
async function hashOf(model: string): Promise<string | undefined> {
  if (statSync(model).isFile()) return modelHash(model);
  for (const f of ['unet/diffusion_pytorch_model.safetensors', 'unet/diffusion_pytorch_model.fp16.safetensors']) {
    if (existsSync(path.join(model, f))) return modelHash(path.join(model, f));
  }
  return undefined;
}

/** What applyAdapters did: the prompt rewrite for embeddings and the adapters' A1111 hashes (by name / token). */
export interface AppliedAdapters {
  rewrite: (prompt: string) => string;
  loraHashes: Record<string, string>;
  tiHashes: Record<string, string>;
}

/**
 * Apply `--lora FILE[:WEIGHT]` (merged into the weights) and `--embedding FILE[:TOKEN]` (added to the tokenizer and
 * the token table) to a loaded model, as `sdtune sample` does; each undo is pushed on `restores` (run them in
 * reverse). The embeddings the prompts use are listed through `o.log`.
 */
export async function applyAdapters(
  m: LoadedModel,
  o: Pick<SampleOptions, 'lora' | 'embedding' | 'prompt' | 'negativePrompt' | 'log'> & { prompts?: string[] },
  restores: (() => void)[],
): Promise<AppliedAdapters> {
  if (!m.unet || !m.textEncoder) throw usageError(`${m.path}: adapters need a unet and a text_encoder`);
  // LoRAs merged into the weights, embeddings added to the tokenizer and token table
  const loraHashes: Record<string, string> = {};
  for (const arg of o.lora ?? []) {
    const { path: file, weight } = parseAdapterArg(arg);
    const lora = await readLora(file, { unet: m.unet.params, textEncoder: m.textEncoder.params });
    restores.push(mergeLora({ unet: m.unet.params, textEncoder: m.textEncoder.params }, lora, weight));
    loraHashes[path.basename(file).replace(/\.safetensors$/i, '')] = await loraHash(file);
  }
  let rewrite = (p: string) => p;
  const tiHashes: Record<string, string> = {};
  if (o.embedding?.length) {
    const embs = await Promise.all(
      o.embedding.map((arg) => {
        const sep = arg.lastIndexOf(':');
        const hasToken = sep > 1 && !/^[\\/]/.test(arg.slice(sep + 1)); // "C:\x" is a drive letter, not a token
        return readEmbedding(hasToken ? arg.slice(0, sep) : arg, { token: hasToken ? arg.slice(sep + 1) : undefined, expectedDim: m.textEncoder!.config.hidden_size });
      }),
    );
    const applied = applyEmbeddings(m.textEncoder.params, m.tokenizer!, embs);
    restores.push(applied.restore);
    rewrite = applied.rewritePrompt;
    // A1111 lists the embeddings the prompts use, by name, with the first 12 hex of the file's SHA-256
    const used = applied.usedIn([o.prompt, ...(o.prompts ?? [])].join(' '), o.negativePrompt ?? '');
    const log = o.log ?? ((l: string) => process.stderr.write(l + '\n'));
    for (const line of describeEmbeddingUse(embs, used)) log(line);
    for (const e of used) tiHashes[e.token] = await embeddingHash(e.path);
  }
  return { rewrite, loraHashes, tiHashes };
}

/** Generate images and write them (see SampleOptions). */
export async function sampleToFiles(o: SampleOptions): Promise<SampleResult> {
  const nIter = o.nIter ?? 1;
  const batch = o.batchSize ?? 1;
  if (!Number.isInteger(nIter) || nIter < 1) throw usageError(`nIter must be a positive integer, got ${o.nIter}`);
  const outPng = o.out?.toLowerCase().endsWith('.png');
  if (outPng && nIter * batch > 1) throw usageError(`out ${o.out} names one PNG but ${nIter * batch} images are requested; give a directory`);
  if (outPng && !o.overwrite && existsSync(o.out!)) {
    throw usageError(`out ${o.out} already exists; choose another name, a directory (numbered files), or the overwrite option (--overwrite) to replace it`);
  }
  checkImageSize(o.width, o.height); // before the model loads
  if (o.attentionChunk !== undefined) setAttentionChunkElements(o.attentionChunk);
  const sampler = o.sampler ? resolveSampler(o.sampler) : undefined;
  const init = o.initImage ? loadRgb(await readImageRgb(o.initImage)) : undefined;
  const mask = o.mask ? loadRgb(await readImageRgb(o.mask)) : undefined;
  if (mask && !init) throw usageError('a mask needs an initImage');
  if (mask && init && (mask.width !== init.width || mask.height !== init.height)) {
    throw usageError(`mask ${o.mask} is ${mask.width}x${mask.height} but initImage ${o.initImage} is ${init.width}x${init.height}`);
  }
  const m: LoadedModel = await loadModel(o.model, o.load);
  const restores: (() => void)[] = [];
  try {
    if (!m.unet || !m.vae || !m.textEncoder) throw usageError(`${o.model}: sampling needs a full model (unet, vae, text_encoder)`);
    const { rewrite, loraHashes, tiHashes } = await applyAdapters(m, o, restores);
    // the same defaults as generate(): the model's scheduler, the init image's size or the UNet's, 30 steps, cfg 7.5
    const r0 = resolveGenerateOptions(m, { prompt: o.prompt, sampler, steps: o.steps, cfg: o.cfg, width: o.width, height: o.height, seed: o.seed, initImage: init });
    const { sampler: name, width, height, steps, cfg, seed: baseSeed } = r0;
    if (!Number.isInteger(baseSeed) || baseSeed < 0) throw usageError(`seed must be a non-negative integer or -1 (random), got ${o.seed}`);
    // the memory check before any work at this size (generate() checks again, with the prompt's real length)
    const check = o.memoryCheck === false ? undefined : assertSamplingFits(m, { width, height, batchSize: batch, cfg: cfg !== 1, encode: Boolean(init) });
    const mh = await hashOf(o.model);
    const outDir = outPng ? path.dirname(o.out!) : (o.out ?? 'outputs');
    let index = outPng ? 0 : nextIndex(outDir);
    const total = nIter * steps;
    if (!o.quiet) {
      const mem = check ? `; memory ~${fmtBytes(check.onBackend)} estimated${Number.isFinite(check.budget.bytes) ? ` of ${fmtBytes(check.budget.bytes)}` : ''}` : '';
      process.stderr.write(`sample: ${nIter * batch} image(s) at ${width}x${height} (batch ${batch}), ${steps} steps ${SAMPLER_LABELS[name]}, cfg ${cfg}${mem}\n`);
    }
    const bar = o.quiet ? undefined : progress({ total, label: 'sample', logEvery: Math.max(1, Math.ceil(total / 10)), logSeconds: 10 });
    const files: string[] = [];
    const seeds: number[] = [];
    for (let it = 0; it < nIter; it++) {
      const seed = baseSeed + it * batch;
      let done = 0;
      const r = await generate(m, {
        prompt: rewrite(o.prompt),
        negativePrompt: rewrite(o.negativePrompt ?? ''),
        sampler: name,
        steps,
        cfg,
        width,
        height,
        seed,
        batchSize: batch,
        clipSkip: o.clipSkip,
        eta: o.eta,
        initImage: init,
        mask,
        strength: o.strength,
        memoryCheck: o.memoryCheck,
        onDecode: (k) => bar?.note(`decoding image ${it * batch + k + 1} of ${nIter * batch} (${width}x${height}, VAE)`),
        onStep: (_i, n) => {
          // img2img runs fewer steps than requested: advance the bar proportionally
          const target = Math.round(((_i + 1) / n) * steps);
          bar?.tick(target - done);
          done = target;
        },
      });
      for (let k = 0; k < r.images.length; k++) {
        const text = formatInfotext({
          prompt: o.prompt,
          negativePrompt: o.negativePrompt,
          steps,
          sampler: SAMPLER_LABELS[name],
          cfgScale: cfg,
          seed: r.seeds[k],
          width,
          height,
          modelHash: mh,
          modelName: path.basename(o.model).replace(/\.safetensors$/i, ''),
          loraHashes: Object.keys(loraHashes).length ? loraHashes : undefined,
          tiHashes: Object.keys(tiHashes).length ? tiHashes : undefined,
          clipSkip: o.clipSkip,
          denoisingStrength: init ? (o.strength ?? (mask ? 1 : 0.75)) : undefined,
          version: `sdtune ${SDTUNE_VERSION}`,
        });
        const rgb = toUint8(r.images[k]);
        let file = o.out!;
        if (outPng) await writePng(file, rgb, width, height, text);
        else {
          // numbered files never replace one: another run writing into the same folder just moves us on a number
          for (let tries = 0; ; tries++) {
            file = path.join(outDir, `${String(index++).padStart(5, '0')}-${r.seeds[k]}.png`);
            try {
              await writePng(file, rgb, width, height, text, { exclusive: true });
              break;
            } catch (e) {
              if (!(e instanceof TargetExistsError) || tries > 1000) throw e;
            }
          }
        }
        files.push(file);
        seeds.push(r.seeds[k]);
      }
    }
    bar?.done();
    return { files, seeds, sampler: name };
  } finally {
    for (const r of restores.reverse()) r();
    disposeModel(m);
  }
}

