/** `method: textual_inversion` (and `sdtune textual-inversion`): new token embeddings (recipes/textual-inversion.ts). */
import { z } from 'zod';
import { embeddingFileStem } from '../../adapters/file-names.js';
import type { MethodEntry } from '../registry.js';
import { int, show, str } from '../schema.js';
import { refuseModelOutputs } from './common.js';

/** diffusers textual_inversion.py imagenet_templates_small, with {} where the token goes. */
export const TI_TEMPLATES: readonly string[] = [
  'a photo of a {}', 'a rendering of a {}', 'a cropped photo of the {}', 'the photo of a {}', 'a photo of a clean {}',
  'a photo of a dirty {}', 'a dark photo of the {}', 'a photo of my {}', 'a photo of the cool {}', 'a close-up photo of a {}',
  'a bright photo of the {}', 'a cropped photo of a {}', 'a photo of the {}', 'a good photo of the {}', 'a photo of one {}',
  'a close-up photo of the {}', 'a rendition of the {}', 'a photo of the clean {}', 'a rendition of a {}', 'a photo of a nice {}',
  'a good photo of a {}', 'a photo of the nice {}', 'a photo of the small {}', 'a photo of the weird {}', 'a photo of the large {}',
  'a photo of a cool {}', 'a photo of a small {}',
];

export const TI_SECTION = z.object({
  token: str(), // the new prompt word, e.g. "<my-logo>" (diffusers placeholder_token)
  init_word: str(), // its initial embedding comes from this word (diffusers initializer_token)
  vectors: int(1, { max: 75 }).default(1), // embedding vectors per token (A1111 "vectors per token", diffusers --num_vectors)
});

declare module '../config.js' {
  interface MethodSections {
    textual_inversion: z.output<typeof TI_SECTION>;
  }
}

export const textualInversion: MethodEntry = {
  name: 'textual_inversion',
  section: TI_SECTION,
  defaults: { 'train.lr': 5e-3, 'train.weight_decay': 0, 'output.save_precision': 'fp32' }, // A1111
  check(c, fail) {
    refuseModelOutputs(c, fail, 'textual_inversion', 'embedding');
    const ti = c.textual_inversion!;
    if (!/^\S+$/.test(ti.token) || ti.token.includes(',')) {
      fail('textual_inversion.token', `textual_inversion.token: expected one word without spaces or commas, like "<my-logo>", found ${show(ti.token)}`);
    }
    if (ti.init_word.trim() === '') fail('textual_inversion.init_word', `textual_inversion.init_word: expected a non-empty string, found ${show(ti.init_word)}`);
    if (ti.token === ti.init_word.trim()) fail('textual_inversion.token', `textual_inversion.token must differ from textual_inversion.init_word (both ${show(ti.token)})`);
  },
  // an embedding is named after its token: A1111 loads it by file name (<my-logo> -> my-logo.safetensors)
  defaultName: (c) => embeddingFileStem(c.textual_inversion!.token),
  cli: {
    command: 'textual-inversion',
    describe: 'train a textual-inversion embedding (A1111 + diffusers .safetensors output)',
    flags: {
      token: { key: 'textual_inversion.token', describe: 'the new prompt word, e.g. "<my-logo>" (textual_inversion.token)' },
      'init-word': { key: 'textual_inversion.init_word', describe: 'word whose embedding starts the token (textual_inversion.init_word)' },
      vectors: { key: 'textual_inversion.vectors', describe: 'vectors per token (textual_inversion.vectors)' },
    },
  },
  async create(model, c) {
    const t = c.textual_inversion!;
    const { createTiRecipe } = await import('../recipes/textual-inversion.js');
    return createTiRecipe(model, { token: t.token, initWord: t.init_word, vectors: t.vectors, templates: c.data.templates ?? [...TI_TEMPLATES] });
  },
};
