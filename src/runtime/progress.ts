/**
 * Progress bars for long work: count, it/s (or s/it), elapsed and ETA, plus free-form fields (loss, lr).
 * Draws in place on a TTY; elsewhere stays quiet except for an occasional line when `logEvery` is set.
 */
export interface ProgressOptions {
  total: number;
  label: string;
  stream?: NodeJS.WriteStream;
  /** on non-TTY streams, print a line every N steps (0 = never) */
  logEvery?: number;
  /** force drawing even when the stream is not a TTY (tests) */
  force?: boolean;
}

export interface Progress {
  tick(n?: number, fields?: Record<string, string | number>): void;
  done(message?: string): void;
  readonly count: number;
}

const fmtTime = (s: number) => {
  if (!Number.isFinite(s)) return '--:--';
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = Math.floor(s % 60);
  return (h ? `${h}:${String(m).padStart(2, '0')}` : `${m}`) + `:${String(sec).padStart(2, '0')}`;
};

/** Human rate: "3.21 it/s" or "4.50 s/it" when slower than 1 it/s. */
export function formatRate(itemsPerSecond: number): string {
  if (!(itemsPerSecond > 0)) return '-- it/s';
  return itemsPerSecond >= 1 ? `${itemsPerSecond.toFixed(2)} it/s` : `${(1 / itemsPerSecond).toFixed(2)} s/it`;
}

/** Start a progress bar. */
export function progress(opts: ProgressOptions): Progress {
  const stream = opts.stream ?? process.stderr;
  const tty = opts.force || Boolean(stream.isTTY);
  const start = performance.now();
  let count = 0;
  let last = 0;
  const line = (fields?: Record<string, string | number>) => {
    const el = (performance.now() - start) / 1000;
    const rate = count / el;
    const eta = rate > 0 ? (opts.total - count) / rate : NaN;
    const width = 24;
    const filled = Math.round((width * Math.min(count, opts.total)) / Math.max(1, opts.total));
    const extra = fields ? ' ' + Object.entries(fields).map(([k, v]) => `${k}=${v}`).join(' ') : '';
    return `${opts.label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${count}/${opts.total} ${formatRate(rate)} ${fmtTime(el)}<${fmtTime(eta)}${extra}`;
  };
  return {
    get count() {
      return count;
    },
    tick(n = 1, fields) {
      count += n;
      if (tty) {
        const now = performance.now();
        if (now - last > 100 || count >= opts.total) {
          last = now;
          stream.write(`\r${line(fields)}\x1b[K`);
        }
      } else if (opts.logEvery && (count % opts.logEvery === 0 || count === opts.total)) {
        stream.write(line(fields) + '\n');
      }
    },
    done(message) {
      if (tty) stream.write(`\r${line()}\x1b[K\n`);
      if (message) stream.write(message + '\n');
    },
  };
}
