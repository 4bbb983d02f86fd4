/** Rules shared by method entries. */
import type { TrainConfig } from '../config.js';

/** Adapter methods write their own small files: bf16 and output.save_as (a whole model's formats) are refused. */
export function refuseModelOutputs(c: TrainConfig, fail: (key: string, message: string) => never, method: string, writes: string): void {
  if (c.output.save_precision === 'bf16') fail('output.save_precision', `output.save_precision bf16 is for full fine-tunes; ${method} results are saved as fp16 or fp32`);
  if (c.output.save_as !== 'diffusers') fail('output.save_as', `output.save_as is for full fine-tunes (${method} writes ${writes} files)`);
  if (c.output.ema_only) fail('output.ema_only', `output.ema_only is for full fine-tunes' single files (${method} writes ${writes} files; output.export_ema picks the average)`);
}

/** Methods that export a whole model: output.ema_only is about the single file, and needs the EMA. */
export function checkModelOutputs(c: TrainConfig, fail: (key: string, message: string) => never): void {
  if (!c.output.ema_only) return;
  if (!c.train.ema.enabled) fail('output.ema_only', 'output.ema_only is set but train.ema.enabled is false (there is no average to export)');
  if (c.output.save_as === 'diffusers') fail('output.ema_only', 'output.ema_only is about the single file, but output.save_as "diffusers" writes none (use single_file or both)');
}
