/**
 * Learning-rate schedules, pure: lrAt(step) = base lr x the LambdaLR factor that diffusers' get_scheduler
 * (diffusers/optimization.py, same lambdas as transformers' get_*_schedule_with_warmup) would apply.
 * `step` is the optimizer-step index as LambdaLR sees it: the first optimizer step uses step 0, so a linear warmup
 * starts at lr 0 exactly like diffusers' and kohya's training scripts.
 */
import { usageError } from '../errors.js';

export type LrSchedulerName = 'constant' | 'constant_with_warmup' | 'linear' | 'cosine' | 'cosine_with_restarts' | 'warmup_stable_decay';
export const LR_SCHEDULERS: readonly LrSchedulerName[] = ['constant', 'constant_with_warmup', 'linear', 'cosine', 'cosine_with_restarts', 'warmup_stable_decay'];

/** The schedule settings lrAt needs (a subset of TrainConfig['train']). */
export interface LrSchedule {
  lr: number;
  lr_scheduler: LrSchedulerName;
  lr_warmup_steps: number;
  lr_num_cycles: number;
  /** warmup_stable_decay: the last steps, over which the lr falls to 0 (a half cosine) */
  lr_decay_steps?: number;
}

/** Linear warmup ramp shared by every *_with_warmup lambda: step / max(1, warmup). */
const warmup = (step: number, w: number) => step / Math.max(1, w);

/** The LambdaLR multiplier at `step` (diffusers get_constant_schedule / get_*_schedule_with_warmup lr_lambda). */
export function lrFactor(s: Omit<LrSchedule, 'lr'>, step: number, totalSteps: number): number {
  const w = s.lr_warmup_steps;
  switch (s.lr_scheduler) {
    case 'constant': // get_constant_schedule: no warmup at all (config rejects a warmup with it, as kohya does)
      return 1;
    case 'constant_with_warmup':
      return step < w ? warmup(step, w) : 1;
    case 'linear':
      return step < w ? warmup(step, w) : Math.max(0, (totalSteps - step) / Math.max(1, totalSteps - w));
    case 'cosine': {
      // get_scheduler passes no num_cycles for 'cosine', so the half-cosine default 0.5 applies
      if (step < w) return warmup(step, w);
      const progress = (step - w) / Math.max(1, totalSteps - w);
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * 0.5 * 2 * progress)));
    }
    case 'cosine_with_restarts': {
      if (step < w) return warmup(step, w);
      const progress = (step - w) / Math.max(1, totalSteps - w);
      if (progress >= 1) return 0;
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * ((s.lr_num_cycles * progress) % 1))));
    }
    case 'warmup_stable_decay': {
      // transformers' get_wsd_schedule (linear warmup, constant, then decay_type "cosine" to min_lr_ratio 0 over the
      // last lr_decay_steps): steps before the decay are exactly constant_with_warmup's, so a constant run can be
      // resumed into its decay
      if (step < w) return warmup(step, w);
      const d = s.lr_decay_steps ?? 0;
      const start = totalSteps - d;
      if (step < start) return 1;
      const progress = (step - start) / Math.max(1, d);
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * Math.min(1, progress))));
    }
    default:
      throw usageError(`unknown lr_scheduler ${JSON.stringify(s.lr_scheduler)}; valid: ${LR_SCHEDULERS.join(', ')}`);
  }
}

/** Learning rate of optimizer step `step` (0-based) out of `totalSteps`: base lr x lrFactor. */
export function lrAt(s: LrSchedule, step: number, totalSteps: number): number {
  return s.lr * lrFactor(s, step, totalSteps);
}
