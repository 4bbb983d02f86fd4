/** The methods sdtune ships, in the order the CLI lists them (a library user adds more with registerMethod). */
import { dreambooth } from './dreambooth.js';
import { finetune } from './finetune.js';
import { hypernetwork } from './hypernetwork.js';
import { lora } from './lora.js';
import { textualInversion } from './textual-inversion.js';
import { vae } from './vae.js';
import type { MethodEntry } from '../registry.js';

export const BUILT_IN_METHODS: readonly MethodEntry[] = [lora, textualInversion, finetune, dreambooth, hypernetwork, vae];
