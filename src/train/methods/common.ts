/** Rules shared by method entries. */
import type { TrainConfig } from '../config.js';

/** Adapter methods write their own small files: bf16 and output.save_as (a whole model's formats) are refused. */
export function refuseModelOutputs(c: TrainConfig, fail: (key: string, message: string) => never, method: string, writes: string): void {
  if (c.output.save_precision === 'bf16') fail('output.save_precision', `output.save_precision bf16 is for full fine-tunes; ${method} results are saved as fp16 or fp32`);
  if (c.output.save_as !== 'diffusers') fail('output.save_as', `output.save_as is for full fine-tunes (${method} writes ${writes} files)`);
}
