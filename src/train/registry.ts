/**
 * The training methods (design principle 8): one registry that the config (its sections, defaults and rules), the
 * loop (the recipe it builds) and the CLI (its commands and flags) all read, so a new method is its recipe plus its
 * entry here, never an edit to a switch elsewhere. Built-in entries live in src/train/methods/ (light modules: the
 * CLI reads them to declare its commands, so they load no tfjs; `create` imports the recipe when training starts).
 */
import type { z } from 'zod';
import { usageError } from '../errors.js';
import type { LoadedModel } from '../io/model.js';
import type { TorchGenerator } from '../runtime/rng.js';
import type { ModelResolvedConfig, TrainConfig } from './config.js';
import type { Recipe } from './recipe.js';
import { BUILT_IN_METHODS } from './methods/index.js';

/** A part of a model a method can need. */
export type ModelPart = 'unet' | 'vae' | 'text_encoder' | 'tokenizer';
/** What diffusion training needs (the default of MethodEntry.components). */
export const DIFFUSION_PARTS: readonly ModelPart[] = ['unet', 'vae', 'text_encoder', 'tokenizer'];

/** A command-line flag of a method: the dotted config key it sets. */
export interface MethodFlag {
  key: string;
  describe?: string;
  /** a switch (--flag / --no-flag) */
  boolean?: boolean;
}

/** Everything that makes a training method. */
export interface MethodEntry {
  /** the method's name: `train(name, ...)`, its config section, checkpoints' `method` */
  readonly name: string;
  /** its config section's keys, types, defaults and ranges (a z.object built with train/schema.ts) */
  readonly section: z.ZodObject;
  /** defaults of shared keys that differ for this method, by dotted key (e.g. 'train.lr': 5e-3); a function of the
   *  keys as given (undefined where not given) when they depend on the method's own settings (DreamBooth: full or LoRA) */
  readonly defaults?: Readonly<Record<string, unknown>> | ((given: (key: string) => unknown) => Readonly<Record<string, unknown>>);
  /** rules between keys beyond their types; `fail(key, message)` reports one (with the key's file line) */
  check?(c: TrainConfig, fail: (key: string, message: string) => never): void;
  /** output.name when the config gives none (default: the config file's name, else the method's) */
  defaultName?(c: TrainConfig): string | undefined;
  /** the command line: `sdtune <command>`, its help line and its own flags (flag name -> key) */
  readonly cli: { command: string; describe: string; flags?: Readonly<Record<string, MethodFlag>> };
  /** the parts of the model the method needs (default: all four, as diffusion training does). Without 'unet' the
   *  loop runs no diffusion (the recipe gives the whole `loss`); without 'text_encoder' it encodes no captions. */
  readonly components?: readonly ModelPart[];
  /** the recipe on a loaded model (called once per run, before the data is scanned: a recipe may read the data
   *  itself, Recipe.items, and prepare more, e.g. DreamBooth's class images, logging through `ctx`) */
  create(model: LoadedModel, c: ModelResolvedConfig, gen: TorchGenerator, ctx?: MethodContext): Recipe | Promise<Recipe>;
}

/** What the loop gives a method's `create`: its log, whether progress bars are off, and its stop request. */
export interface MethodContext {
  log: (line: string) => void;
  quiet: boolean;
  /** a stop request (Ctrl-C): long preparation stops at the next safe point and the loop then stops before step 1 */
  stopRequested: () => boolean;
}

const registry = new Map<string, MethodEntry>();

/** Add a method (a library user's, or a test's); its name must be new and a valid section name. */
export function registerMethod(m: MethodEntry): void {
  if (!/^[a-z][a-z0-9_]*$/.test(m.name)) throw usageError(`method name ${JSON.stringify(m.name)}: expected lower_snake_case`);
  if (['model', 'data', 'train', 'output'].includes(m.name)) throw usageError(`method name ${m.name} is a shared config section`);
  if (registry.has(m.name)) throw usageError(`a method named ${m.name} is registered already`);
  registry.set(m.name, m);
}

/** Remove a method registered with registerMethod (tests). */
export function unregisterMethod(name: string): void {
  registry.delete(name);
}

/** The registered method names, in registration order. */
export const methodNames = (): string[] => [...registry.keys()];

/** The method named `name`; an unknown one is a usage error listing the registered ones. */
export function getMethod(name: string): MethodEntry {
  const m = registry.get(name);
  if (!m) throw usageError(`unknown training method ${JSON.stringify(name)}; registered: ${methodNames().join(', ')}`);
  return m;
}

/** Whether `name` is a registered method (and so a method section of configs). */
export const isMethod = (name: string): boolean => registry.has(name);

for (const m of BUILT_IN_METHODS) registerMethod(m);
