// lrAt against hand-computed values of diffusers' get_scheduler lambdas (LambdaLR step index, 0-based).
import { describe, expect, it } from 'vitest';
import { resolveConfig } from '../../src/train/config.js';
import { type LrSchedule, lrAt, lrFactor } from '../../src/train/lr.js';

const s = (lr_scheduler: LrSchedule['lr_scheduler'], lr_warmup_steps = 0, lr_num_cycles = 1): LrSchedule => ({
  lr: 2e-4,
  lr_scheduler,
  lr_warmup_steps,
  lr_num_cycles,
});
const at = (sched: LrSchedule, total: number, steps: number[]) => steps.map((t) => lrFactor(sched, t, total));
const close = (got: number[], want: number[]) => got.forEach((g, i) => expect(g, `index ${i}`).toBeCloseTo(want[i], 12));

describe('lrAt', () => {
  it('constant: base lr at every step', () => {
    close(at(s('constant'), 100, [0, 1, 50, 99, 500]), [1, 1, 1, 1, 1]);
    expect(lrAt(s('constant'), 7, 100)).toBe(2e-4);
  });

  it('constant_with_warmup: step / warmup, then 1', () => {
    close(at(s('constant_with_warmup', 10), 100, [0, 1, 5, 9, 10, 99]), [0, 0.1, 0.5, 0.9, 1, 1]);
    expect(lrAt(s('constant_with_warmup', 10), 5, 100)).toBeCloseTo(1e-4, 15);
  });

  it('linear: warmup, then (total - step) / (total - warmup), floored at 0', () => {
    close(at(s('linear', 10), 110, [0, 5, 10, 60, 109, 110, 130]), [0, 0.5, 1, 0.5, 0.01, 0, 0]);
    close(at(s('linear'), 4, [0, 1, 2, 3]), [1, 0.75, 0.5, 0.25]);
  });

  it('cosine: half a cosine (num_cycles 0.5 as get_scheduler passes none) after the warmup', () => {
    const c = 0.5 * (1 + Math.cos(Math.PI / 4)); // progress 0.25
    close(at(s('cosine'), 100, [0, 25, 50, 75, 100]), [1, c, 0.5, 1 - c, 0]);
    // like diffusers, progress is not clamped: past the end the cosine rises again
    close(at(s('cosine'), 100, [120]), [0.5 * (1 + Math.cos(Math.PI * 1.2))]);
    close(at(s('cosine', 10), 110, [0, 5, 10, 60]), [0, 0.5, 1, 0.5]);
    // lr_num_cycles only applies to cosine_with_restarts, as in diffusers
    close(at(s('cosine', 0, 3), 100, [50]), [0.5]);
  });

  it('cosine_with_restarts: num_cycles hard restarts, 0 from the last step on', () => {
    const r = 0.5 * (1 + Math.cos(Math.PI * 0.98)); // step 99: (2 * 0.99) % 1 = 0.98
    close(at(s('cosine_with_restarts', 0, 2), 100, [0, 25, 50, 75, 99, 100]), [1, 0.5, 1, 0.5, r, 0]);
    close(at(s('cosine_with_restarts', 10, 1), 110, [5, 10, 60, 110]), [0.5, 1, 0.5, 0]);
  });

  it('warmup_stable_decay: warmup, constant (exactly constant_with_warmup), then a half cosine to 0 over lr_decay_steps', () => {
    const wsd = { ...s('warmup_stable_decay', 10), lr_decay_steps: 40 };
    close(at(wsd, 100, [0, 5, 10, 59, 60, 80, 100, 120]), [0, 0.5, 1, 1, 1, 0.5, 0, 0]);
    close(at(wsd, 100, [70]), [0.5 * (1 + Math.cos(Math.PI * 0.25))]);
    for (const step of [0, 3, 10, 30, 59]) expect(lrFactor(wsd, step, 100)).toBe(lrFactor(s('constant_with_warmup', 10), step, 100));
    expect(() => resolveConfig('lora', null, { 'model.path': 'm', 'data.dir': 'd', 'train.lr_scheduler': 'warmup_stable_decay', 'train.max_steps': 10, 'train.lr_decay_steps': 11 })).toThrow(
      /train\.lr_warmup_steps \(0\) \+ train\.lr_decay_steps \(11\) exceed train\.max_steps \(10\)/,
    );
    expect(() => resolveConfig('lora', null, { 'model.path': 'm', 'data.dir': 'd', 'train.lr_decay_steps': 5 })).toThrow(/lr_decay_steps is set but train\.lr_scheduler is "constant"/);
  });

  it('accepts the resolved train section', () => {
    const c = resolveConfig('lora', null, { 'model.path': 'm', 'data.dir': 'd', 'train.lr_scheduler': 'linear', 'train.max_steps': 10 });
    expect(lrAt(c.train, 5, 10)).toBeCloseTo(0.5e-4, 15);
  });
});
