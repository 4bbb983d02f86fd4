// The progress bar on an injected clock: lines off a TTY at the requested cadence, a resumed bar's rate, a count
// that never goes back, and the first line drawn before any step.
import { describe, expect, it } from 'vitest';
import { type ProgressOptions, formatRate, progress } from '../../src/runtime/progress.js';

/** A fake stream collecting what is written, and a clock the test advances (ms). */
function rig(opts: Partial<ProgressOptions> & { tty?: boolean } = {}) {
  const writes: string[] = [];
  const stream = { isTTY: opts.tty ?? false, write: (s: string) => (writes.push(s), true) } as unknown as NodeJS.WriteStream;
  const clock = { t: 1000 };
  const bar = progress({ total: 100, label: 'test', stream, now: () => clock.t, ...opts });
  /** the "k/N" counts of the lines written so far */
  const counts = () => writes.join('').split(/[\r\n]/).flatMap((l) => (/ (\d+)\/\d+ /.exec(l) ? [Number(/ (\d+)\/\d+ /.exec(l)![1])] : []));
  return { bar, writes, clock, counts };
}

describe('progress', () => {
  it('off a TTY: a line at the start, then every logEvery steps but never sooner than logSeconds, and at the end', () => {
    // 1 s per step: 10 steps take 10 s >= 5 s, so the step cadence rules
    const slow = rig({ logEvery: 10, logSeconds: 5 });
    for (let i = 0; i < 100; i++) {
      slow.clock.t += 1000;
      slow.bar.tick();
    }
    slow.bar.done();
    expect(slow.counts()).toEqual([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    expect(slow.writes.every((w) => w.endsWith('\n') && !w.includes('\r'))).toBe(true);
    // 0.1 s per step: 10 steps are only 1 s, so a line waits for 5 s (50 steps)
    const fast = rig({ logEvery: 10, logSeconds: 5 });
    for (let i = 0; i < 100; i++) {
      fast.clock.t += 100;
      fast.bar.tick();
    }
    fast.bar.done();
    expect(fast.counts()).toEqual([0, 50, 100]);
    // without logEvery a non-TTY stream stays silent
    const quiet = rig();
    quiet.bar.tick(100);
    quiet.bar.done('finished');
    expect(quiet.writes).toEqual(['finished\n']);
  });

  it('a resumed bar counts the earlier steps but rates only the new ones', () => {
    const r = rig({ total: 1000, initial: 187, logEvery: 1 });
    expect(r.bar.count).toBe(187);
    expect(r.bar.rate).toBe(0);
    expect(r.writes[0]).toMatch(/ 187\/1000 -- it\/s /);
    r.clock.t += 2000; // the first new step takes 2 s
    r.bar.tick(1, { loss: '0.1234' });
    expect(r.bar.rate).toBeCloseTo(0.5, 12);
    expect(r.writes[1]).toMatch(/ 188\/1000 2\.00 s\/it 0:02<27:04 loss=0\.1234\n$/); // 812 steps left at 2 s: 27 min
  });

  it('the rate is a smoothed recent rate: steady steps give exactly their rate, a change moves it towards the new one', () => {
    const r = rig({ total: 1000 });
    for (let i = 0; i < 20; i++) {
      r.clock.t += 500;
      r.bar.tick();
    }
    expect(r.bar.rate).toBeCloseTo(2, 12);
    const rates: number[] = [];
    for (let i = 0; i < 20; i++) {
      r.clock.t += 100; // ten times faster
      r.bar.tick();
      rates.push(r.bar.rate);
    }
    for (let i = 1; i < rates.length; i++) expect(rates[i]).toBeGreaterThan(rates[i - 1]);
    expect(rates[0]).toBeLessThan(3); // one fast step does not swing it
    expect(rates.at(-1)).toBeGreaterThan(9.9); // 20 steps later it is the new rate
    expect(rates.at(-1)).toBeLessThanOrEqual(10);
    // count / elapsed would say (20 + 20) / 12 s = 3.33 it/s
  });

  it('the count never goes back, whatever tick is given', () => {
    const r = rig({ logEvery: 1 });
    r.clock.t += 10;
    r.bar.tick(5);
    r.bar.tick(-3);
    r.bar.tick(0);
    r.clock.t += 10;
    r.bar.tick(2);
    expect(r.bar.count).toBe(7);
    const c = r.counts();
    expect(c).toEqual([0, 5, 7]);
  });

  it('on a TTY: drawn in place from the start, notes go above the bar, done ends the line', () => {
    const r = rig({ tty: true, total: 4 });
    expect(r.writes).toHaveLength(1);
    expect(r.writes[0]).toMatch(/^\rtest \[\.{24}\] 0\/4 -- it\/s 0:00<--:--\x1b\[K$/);
    r.clock.t += 1000;
    r.bar.tick();
    r.bar.note('decoding image 1 of 1');
    expect(r.writes.at(-2)).toBe('\rdecoding image 1 of 1\x1b[K\n');
    expect(r.writes.at(-1)).toMatch(/^\rtest \[#{6}\.{18}\] 1\/4 1\.00 it\/s /);
    r.bar.done();
    expect(r.writes.at(-1)).toMatch(/1\/4 .*\x1b\[K\n$/);
  });

  it('formats rates as it/s, or s/it below 1 it/s', () => {
    expect(formatRate(3.214)).toBe('3.21 it/s');
    expect(formatRate(0.25)).toBe('4.00 s/it');
    expect(formatRate(0)).toBe('-- it/s');
  });
});
