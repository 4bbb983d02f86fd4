/**
 * The toy world's vocabulary (shared/toyworld.md): CLIP byte-level BPE files (vocab.json + merges.txt) with the 256
 * byte symbols and their `</w>` variants, the merges that make every world word (held-out ones and "sks" included)
 * one token, and `<|startoftext|>` / `<|endoftext|>` (pad = eos), so the ordinary CLIP tokenizer (src/tokenizer/
 * clip.ts) loads it unchanged. Built by the project's own BPE trainer (src/tokenizer/train-bpe.ts) run to completion
 * on the word list, each word counted once: deterministic, byte-identical on every machine.
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { writeFileAtomic } from '../runtime/atomic.js';
import { type BpeModel, clipTokenizerFiles, trainBpe } from '../tokenizer/train-bpe.js';
import { TOY_WORDS } from './toy-world.js';

/** Token window of the toy text encoder: BOS + the longest caption (8 words) + EOS fits with room to spare. */
export const TOY_MAX_LENGTH = 12;

/** The toy vocabulary (every word of TOY_WORDS a single token). */
export function toyVocabulary(): BpeModel {
  return trainBpe(TOY_WORDS.map((w) => [w, 1] as [string, number]), { minFrequency: 1 });
}

/** The tokenizer folder's files (vocab.json, merges.txt, tokenizer_config.json with model_max_length 12, ...). */
export function toyTokenizerFiles(): Record<string, string> {
  return clipTokenizerFiles(toyVocabulary(), { modelMaxLength: TOY_MAX_LENGTH });
}

/** Write the toy tokenizer files into `dir` (created if needed; each file written atomically). Returns the vocabulary. */
export async function writeToyVocabulary(dir: string): Promise<BpeModel> {
  const model = toyVocabulary();
  await mkdir(dir, { recursive: true });
  for (const [name, text] of Object.entries(clipTokenizerFiles(model, { modelMaxLength: TOY_MAX_LENGTH }))) {
    await writeFileAtomic(path.join(dir, name), new TextEncoder().encode(text));
  }
  return model;
}
