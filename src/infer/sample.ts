/**
 * `sdtune sample` as a library call: load a model, apply LoRAs and embeddings, generate with the pipeline and write
 * PNGs carrying A1111's `parameters` text. Everything the CLI does is here, with typed options.
 */
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { modelStem } from '../adapters/file-names.js';
import { mergeLora, readLora } from '../adapters/lora.js';
import { applyEmbeddings, describeEmbeddingUse, readEmbedding } from '../adapters/embeddings.js';
import { type HypernetworkUse, disposeHypernetwork, hypernetworkAdapter, hypernetworkName, readHypernetwork } from '../adapters/hypernetwork.js';
import { usageError } from '../errors.js';
import { embeddingHash, fileSha256, legacyModelHash, loraHash, modelPathHash } from '../io/hashes.js';
import { type LoadedModel, type OpenModelOptions, disposeModel, loadModel } from '../io/model.js';
import { formatInfotext, readImageRgb, writePng } from '../io/png.js';
import { setAttentionChunkElements } from '../models/layers.js';
import { TargetExistsError } from '../runtime/atomic.js';
import { progress } from '../runtime/progress.js';
import { SAMPLER_LABELS, type SamplerName, infotextSampler, resolveSampler } from '../schedulers/index.js';
import { assertSamplingFits, checkImageSize, fmtBytes } from './budget.js';
import { depthAspectNote, readDepthMap } from './depth.js';
import { type RgbImage, generate, resolveGenerateOptions, toUint8 } from './pipeline.js';
import { parseExtraNetworks } from '../tokenizer/prompt-schedule.js';
import { type PromptNetworks, resolvePromptNetworks } from './prompt-networks.js';

export const SDTUNE_VERSION = '0.1.0';

/** A LoRA file and its multiplier (sd-scripts `--network_mul`, A1111 `<lora:name:weight>`). */
export interface SampleLora {
  path: string;
  weight: number;
}
/** An embedding file and the prompt word it is used under (default: its own token). */
export interface SampleEmbedding {
  path: string;
  token?: string;
}
/** A hypernetwork file and its strength (A1111's multiplier). */
export interface SampleHypernetwork {
  path: string;
  strength: number;
}

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
  /** depth-to-image with a depth model: a grayscale depth map (8/16-bit PNG, near = bright), with initImage */
  depthMap?: string;
  /** the depth map has near = dark (e.g. metric depth): flip it */
  depthInvert?: boolean;
  /** LoRA files merged into the weights at their weights (the CLI's `--lora FILE[:WEIGHT]`) */
  lora?: SampleLora[];
  /** folder of LoRA files for the prompt's A1111 `<lora:name:weight>` / `<lora:name:te:unet>` tags (found by file name stem) */
  loraDir?: string;
  /** folder of hypernetwork files for the prompt's `<hypernet:name:multiplier>` tags */
  hypernetworkDir?: string;
  /** textual-inversion embeddings, each under its token (default: the file's own, A1111: the file name) */
  embedding?: SampleEmbedding[];
  /** hypernetwork files (our form, or A1111's .pt, read as data) at their strengths; the prompt's
   *  `<hypernet:name:strength>` tags (from hypernetworkDir) are added to these */
  hypernetwork?: SampleHypernetwork[];
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
  o: Pick<SampleOptions, 'lora' | 'embedding' | 'prompt' | 'negativePrompt' | 'log'> & { prompts?: string[]; promptLoras?: PromptNetworks['loras'] },
  restores: (() => void)[],
): Promise<AppliedAdapters> {
  if (!m.unet || !m.textEncoder) throw usageError(`${m.path}: adapters need a unet and a text_encoder`);
  // LoRAs merged into the weights, embeddings added to the tokenizer and token table
  const loraHashes: Record<string, string> = {};
  for (const { path: file, weight } of o.lora ?? []) {
    const lora = await readLora(file, { unet: m.unet.params, textEncoder: m.textEncoder.params });
    restores.push(mergeLora({ unet: m.unet.params, textEncoder: m.textEncoder.params }, lora, weight));
    loraHashes[modelStem(file)] = await loraHash(file); // A1111 names a LoRA by its file's stem
  }
  // prompt tags: A1111's text-encoder and UNet multipliers; "Lora hashes" names them as the tag does
  for (const l of o.promptLoras ?? []) {
    const lora = await readLora(l.path, { unet: m.unet.params, textEncoder: m.textEncoder.params });
    restores.push(mergeLora({ unet: m.unet.params, textEncoder: m.textEncoder.params }, lora, { textEncoder: l.te, unet: l.unet }));
    loraHashes[l.name] = await loraHash(l.path);
  }
  let rewrite = (p: string) => p;
  const tiHashes: Record<string, string> = {};
  if (o.embedding?.length) {
    const embs = await Promise.all(
      o.embedding.map((e) => readEmbedding(e.path, { token: e.token, expectedDim: m.textEncoder!.config.hidden_size })),
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
  if (o.depthInvert && !o.depthMap) throw usageError('depthInvert needs a depthMap');
  const depthMap = o.depthMap ? await readDepthMap(o.depthMap) : undefined;
  if (depthMap && !init) throw usageError(`a depthMap needs an initImage (depth-to-image starts from the image, as diffusers' StableDiffusionDepth2ImgPipeline)`);
  // A1111 extra-network tags: removed from the prompt text and resolved to files before anything loads
  // (A1111 reads them from the prompt only; in the negative prompt they stay text)
  const nets = await resolvePromptNetworks(o.prompt, { loraDir: o.loraDir, hypernetworkDir: o.hypernetworkDir });
  const log = o.log ?? ((l: string) => process.stderr.write(l + '\n'));
  const negTags = parseExtraNetworks(o.negativePrompt ?? '').tags;
  if (negTags.length) log(`note: the negative prompt's ${negTags.map((t) => t.text).join(' ')} stay${negTags.length > 1 ? '' : 's'} text: A1111 reads network tags only from the prompt`);
  for (const t of nets.unknown) log(`note: prompt tag ${t} is no extra network sdtune knows (lora, lyco, hypernet); removed from the prompt, as A1111 does`);
  const m: LoadedModel = await loadModel(o.model, o.load);
  const restores: (() => void)[] = [];
  try {
    if (!m.unet || !m.vae || !m.textEncoder) throw usageError(`${o.model}: sampling needs a full model (unet, vae, text_encoder)`);
    if (m.unet.config.in_channels === 5 && !depthMap)
      throw usageError(`${o.model} is a depth-to-image model (5 input channels): pass a depth map (--depth-map FILE, near = bright) with --init-image`);
    if (depthMap && m.unet.config.in_channels !== 5)
      throw usageError(`${o.model} is not a depth-to-image model (its UNet has ${m.unet.config.in_channels} input channels, a depth model 5): --depth-map needs e.g. stable-diffusion-2-depth`);
    // SD 2's text encoder (OpenCLIP: exact gelu) was trained on prompts padded with "!" (id 0); SD v1's tokenizer pads
    // with <|endoftext|>, which changes every result a little: say so rather than guess which was meant
    if (m.textEncoder.config.hidden_act === 'gelu' && m.tokenizer && m.tokenizer.padTokenId === m.tokenizer.eosTokenId)
      (o.log ?? ((l: string) => process.stderr.write(l + '\n')))(
        `warning: ${o.model} has an SD 2 (OpenCLIP) text encoder but its tokenizer pads with <|endoftext|> as SD v1's does; SD 2's pads with "!": pass --tokenizer DIR with an SD 2 model's tokenizer/ folder`,
      );
    // adapters: --lora and the prompt's <lora:...> tags merged into the weights, embeddings added to the tokenizer
    const { rewrite, loraHashes, tiHashes } = await applyAdapters(m, { ...o, prompt: nets.prompt, promptLoras: nets.loras }, restores);
    // hypernetworks: context adapters of every attention (A1111), chained in order
    const hypernets: (HypernetworkUse & { name: string; file: string })[] = [];
    restores.push(() => hypernets.forEach((h) => disposeHypernetwork(h.net)));
    for (const { path: file, strength } of [...(o.hypernetwork ?? []), ...nets.hypernetworks]) {
      const net = await readHypernetwork(file);
      hypernets.push({ net, strength, name: hypernetworkName(file), file });
      // a width no attention has changes nothing (A1111 applies it silently): say so
      const uc = m.unet.config;
      const widths = new Set([uc.cross_attention_dim, ...uc.block_out_channels]);
      if (![...net.layers.keys()].some((d) => widths.has(d))) {
        (o.log ?? ((l: string) => process.stderr.write(l + '\n')))(
          `warning: hypernetwork ${file} has modules for context widths ${[...net.layers.keys()].join(', ')}, but this model's attentions read widths ${[...widths].join(', ')}: it changes nothing`,
        );
      }
    }
    if (hypernets.length > 1) {
      // generate() chains any number (hypernetworkAdapter), but A1111's PNG keys name one: refuse rather than record half
      throw usageError(`${hypernets.length} hypernetworks given; sample applies one (A1111's PNG parameters name one: "Hypernet")`);
    }
    const hypernetHash = hypernets[0] && (await legacyModelHash(hypernets[0].file)); // A1111's "Hypernet hash"
    // the same defaults as generate(): the model's scheduler, the init image's size or the UNet's, 30 steps, cfg 7.5
    const r0 = resolveGenerateOptions(m, { prompt: o.prompt, sampler, steps: o.steps, cfg: o.cfg, width: o.width, height: o.height, seed: o.seed, initImage: init });
    const { sampler: name, width, height, steps, cfg, seed: baseSeed } = r0;
    if (!Number.isInteger(baseSeed) || baseSeed < 0) throw usageError(`seed must be a non-negative integer or -1 (random), got ${o.seed}`);
    // the memory check before any work at this size (generate() checks again, with the prompt's real length)
    const check = o.memoryCheck === false ? undefined : assertSamplingFits(m, { width, height, batchSize: batch, cfg: cfg !== 1, encode: Boolean(init) });
    const mh = await modelPathHash(o.model);
    if (depthMap) {
      const note = depthAspectNote(depthMap, width, height, o.depthMap!);
      if (note) (o.log ?? ((l: string) => process.stderr.write(l + '\n')))(note);
    }
    // A1111 has no key for a given depth map (it always runs the checkpoint's own MiDaS on the init image): ours are
    // extra "Key: value" pairs, which A1111 shows in PNG Info and otherwise ignores
    const depthInfo: Record<string, string> | undefined = depthMap
      ? { 'Depth map': path.basename(o.depthMap!), 'Depth map hash': (await fileSha256(o.depthMap!)).slice(0, 10), ...(o.depthInvert ? { 'Depth invert': 'True' } : {}) }
      : undefined;
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
        prompt: rewrite(nets.prompt),
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
        depthMap,
        depthInvert: o.depthInvert,
        strength: o.strength,
        memoryCheck: o.memoryCheck,
        context: hypernets.length ? hypernetworkAdapter(hypernets) : undefined,
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
          ...infotextSampler(name),
          cfgScale: cfg,
          seed: r.seeds[k],
          width,
          height,
          modelHash: mh,
          modelName: modelStem(o.model),
          loraHashes: Object.keys(loraHashes).length ? loraHashes : undefined,
          tiHashes: Object.keys(tiHashes).length ? tiHashes : undefined,
          hypernet: hypernets[0] && { name: hypernets[0].name, hash: hypernetHash, strength: hypernets[0].strength ?? 1 },
          clipSkip: o.clipSkip,
          denoisingStrength: init ? (o.strength ?? (mask ? 1 : 0.75)) : undefined,
          extra: depthInfo,
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

