/**
 * Loading a whole SD model (any layout openCheckpoint understands) into params trees, strictly checked against
 * what each network reads, and describing a model without reading its tensors (`sdtune inspect`).
 */
import { SdtuneError } from '../errors.js';
import { fitBackend } from '../runtime/backend.js';
import { ClipTokenizer } from '../tokenizer/clip.js';
import { buildParams } from '../models/build.js';
import { clipTextParamShapes } from '../models/clip-text.js';
import { type ClipTextConfig, type UNetConfig, type VaeConfig, clipTextConfig, unetConfig, vaeConfig } from '../models/configs.js';
import { type ParamTree, checkAgainstSpec, disposeParams } from '../models/params.js';
import { unetParamShapes } from '../models/unet.js';
import { vaeParamShapes } from '../models/vae.js';
import { type CheckpointSource, type Component, type ComponentSource, openCheckpoint, readComponent } from './checkpoint.js';

export interface OpenModelOptions {
  /** diffusers folder whose configs apply to a single-file checkpoint */
  configDir?: string;
  /** folder with vocab.json + merges.txt */
  tokenizerDir?: string;
  /** use the EMA weights of a single file that has them */
  ema?: boolean;
  /** diffusers weight variant, e.g. "fp16" */
  variant?: string;
  /** load only these components (default: all the model has) */
  components?: Component[];
}

export interface LoadedModel {
  path: string;
  layout: CheckpointSource['layout'];
  variant: CheckpointSource['variant'];
  unet?: { config: UNetConfig; params: ParamTree };
  vae?: { config: VaeConfig; params: ParamTree };
  textEncoder?: { config: ClipTextConfig; params: ParamTree };
  tokenizer?: ClipTokenizer;
  schedulerConfig: Record<string, unknown>;
  notes: string[];
  /** where it came from, for writing it back out (saveModel): each component's config.json fields as read, the
   *  pipeline's model_index.json, and the tokenizer files (a folder, or those embedded in a single file) */
  source?: {
    configs: Partial<Record<Component, Record<string, unknown>>>;
    modelIndex?: Record<string, unknown>;
    tokenizerDir?: string;
    embeddedTokenizer?: CheckpointSource['embeddedTokenizer'];
  };
}

const SPECS = {
  unet: (raw: Record<string, unknown>) => {
    const config = unetConfig(raw);
    return { config, spec: unetParamShapes(config) };
  },
  vae: (raw: Record<string, unknown>) => {
    const config = vaeConfig(raw);
    return { config, spec: vaeParamShapes(config) };
  },
  text_encoder: (raw: Record<string, unknown>) => {
    const config = clipTextConfig(raw);
    return { config, spec: clipTextParamShapes(config) };
  },
} as const;

const IGNORED_KEY = /(^|\.)position_ids$/;

/** Shapes of a component's tensors (torch layout, after key-map transforms), minus buffers no model reads. */
function shapesOf(src: ComponentSource): Map<string, number[]> {
  const m = new Map<string, number[]>();
  for (const [k, ref] of src.tensors) if (!IGNORED_KEY.test(k)) m.set(k, ref.shape);
  return m;
}

/** Check a component's keys and shapes against its config without reading tensor data. */
function checkComponent(
  ck: CheckpointSource,
  name: Component,
): { config: UNetConfig | VaeConfig | ClipTextConfig; spec: Map<string, number[]>; params: number } {
  const src = ck.components[name]!;
  const { config, spec } = SPECS[name](src.config);
  checkAgainstSpec(`${ck.path} (${name})`, spec, shapesOf(src));
  let params = 0;
  for (const s of spec.values()) params += s.reduce((a, b) => a * b, 1);
  return { config, spec, params };
}

/**
 * The model's tokenizer, first found: opts.tokenizerDir, the folder openCheckpoint found (tokenizer/ of the pipeline,
 * of the config folder, of a folder named like a single file, or beside it), the tokenizer a single file written by
 * sdtune carries in its metadata.
 */
async function tokenizerOf(ck: CheckpointSource, opts: OpenModelOptions, notes: string[], positions: number): Promise<ClipTokenizer> {
  const dir = opts.tokenizerDir ?? ck.tokenizerDir;
  // a tokenizer without model_max_length takes the text encoder's window (SD v1: 77; the toy world's: 12)
  const tokOpts = { defaultMaxLength: positions };
  let tok: ClipTokenizer | undefined;
  if (dir) {
    if (ck.embeddedTokenizer) notes.push(`tokenizer from ${dir} (not the one embedded in ${ck.path})`);
    tok = await ClipTokenizer.fromDir(dir, tokOpts);
  } else if (ck.embeddedTokenizer) {
    notes.push('tokenizer: the one embedded in the file');
    tok = ClipTokenizer.fromTexts(ck.embeddedTokenizer, (name) => `${ck.path} (embedded ${name})`, tokOpts);
  }
  if (tok) {
    if (tok.maxLength > positions) {
      throw new SdtuneError('format', `${dir ?? ck.path}: the tokenizer's model_max_length is ${tok.maxLength} but the text encoder has ${positions} positions (max_position_embeddings); they must agree`);
    }
    return tok;
  }
  const where = ck.layout === 'single-file' ? `no tokenizer/ folder beside it or in a folder named like it, and none embedded in the file` : 'no tokenizer/ folder';
  throw new SdtuneError('usage', `${ck.path}: no tokenizer found (${where}); pass --tokenizer DIR (a folder with vocab.json and merges.txt, e.g. the tokenizer/ of the diffusers model it came from)`);
}

/** Load a model's networks (and tokenizer, when there is a text encoder) into memory. */
export async function loadModel(path: string, opts: OpenModelOptions = {}): Promise<LoadedModel> {
  const ck = await openCheckpoint(path, opts);
  const loaded: LoadedModel = {
    path,
    layout: ck.layout,
    variant: ck.variant,
    schedulerConfig: ck.schedulerConfig,
    notes: [...ck.notes],
    source: { configs: {}, modelIndex: ck.modelIndex, tokenizerDir: opts.tokenizerDir ?? ck.tokenizerDir, embeddedTokenizer: ck.embeddedTokenizer },
  };
  try {
    const want = (opts.components ?? (['text_encoder', 'unet', 'vae'] as Component[])).filter((c) => ck.components[c]);
    if (opts.components) {
      const missing = opts.components.filter((c) => !ck.components[c]);
      if (missing.length) throw new SdtuneError('format', `${path}: the model has no ${missing.join(', ')} component`);
    }
    const checked = want.map((c) => [c, checkComponent(ck, c)] as const);
    const stepDown = await fitBackend(checked.reduce((a, [, r]) => a + r.params * 4, 0), path);
    if (stepDown) {
      // the backend line the user saw no longer holds: say which backend runs now
      loaded.notes.push(stepDown);
      process.stderr.write(stepDown + '\n');
    }
    for (const [name, { config, spec }] of checked) {
      const tensors = await readComponent(ck.components[name]!);
      const params = buildParams(`${path} (${name})`, spec, tensors);
      loaded.source!.configs[name] = ck.components[name]!.config;
      if (name === 'unet') loaded.unet = { config: config as UNetConfig, params };
      else if (name === 'vae') loaded.vae = { config: config as VaeConfig, params };
      else loaded.textEncoder = { config: config as ClipTextConfig, params };
    }
    if (loaded.textEncoder) loaded.tokenizer = await tokenizerOf(ck, opts, loaded.notes, loaded.textEncoder.config.max_position_embeddings);
    return loaded;
  } catch (e) {
    disposeModel(loaded);
    throw e;
  } finally {
    await ck.close();
  }
}

/** Free every tensor of a loaded model. */
export function disposeModel(m: LoadedModel): void {
  for (const part of [m.unet, m.vae, m.textEncoder]) if (part) disposeParams(part.params);
}

export interface ComponentReport {
  params: number;
  config: Record<string, unknown>;
}

export interface ModelReport {
  path: string;
  layout: CheckpointSource['layout'];
  variant: CheckpointSource['variant'];
  dtype: CheckpointSource['dtype'];
  ema: boolean;
  components: Partial<Record<Component, ComponentReport>>;
  scheduler: Record<string, unknown>;
  tokenizer: string | null;
  notes: string[];
}

/** Describe a model from headers and configs only (no tensor data read); fails like loadModel on bad keys/shapes. */
export async function inspectModel(path: string, opts: OpenModelOptions = {}): Promise<ModelReport> {
  const ck = await openCheckpoint(path, opts);
  try {
    const components: ModelReport['components'] = {};
    for (const name of ['unet', 'vae', 'text_encoder'] as Component[]) {
      if (!ck.components[name]) continue;
      const { params } = checkComponent(ck, name);
      components[name] = { params, config: ck.components[name]!.config };
    }
    return {
      path,
      layout: ck.layout,
      variant: ck.variant,
      dtype: ck.dtype,
      ema: ck.hasEma,
      components,
      scheduler: ck.schedulerConfig,
      tokenizer: opts.tokenizerDir ?? ck.tokenizerDir ?? (ck.embeddedTokenizer ? `embedded in ${path}` : null),
      notes: ck.notes,
    };
  } finally {
    await ck.close();
  }
}

