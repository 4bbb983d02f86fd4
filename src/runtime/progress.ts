/**
 * Progress bars for long work: count, it/s (or s/it), elapsed and ETA, plus free-form fields (loss, lr).
 * Draws in place on a TTY from the moment it starts (0/N); elsewhere prints a line at the start, every `logEvery`
 * steps (no sooner than `logSeconds` after the last one) and at the end.
 * The rate is a smoothed recent rate (tqdm's exponential moving average of steps and seconds per tick), counting
 * only the steps run since the start: a bar resumed at `initial` does not credit the earlier steps to its first
 * instants.
 */
export interface ProgressOptions {
  total: number;
  label: string;
  stream?: NodeJS.WriteStream;
  /** steps already done when the bar starts (a resumed run): shown in the count, not in the rate */
  initial?: number;
  /** on non-TTY streams, print a line every N steps (0 = only at the start and the end; absent = never) */
  logEvery?: number;
  /** on non-TTY streams, leave at least this many seconds between the periodic lines (default 0) */
  logSeconds?: number;
  /** force drawing even when the stream is not a TTY (tests) */
  force?: boolean;
  /** clock in milliseconds (tests; default performance.now) */
  now?: () => number;
}

export interface Progress {
  /** n more steps done (n < 0 is ignored: the count never goes back) */
  tick(n?: number, fields?: Record<string, string | number>): void;
  /** a line of its own above the bar (the bar is drawn again after it on a TTY) */
  note(message: string): void;
  done(message?: string): void;
  readonly count: number;
  /** the smoothed rate in steps per second (0 until a step is done) */
  readonly rate: number;
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

/** tqdm's smoothing: weight of the newest tick in the moving averages. */
const SMOOTHING = 0.3;

/** Exponential moving average with tqdm's bias correction (the first value is not pulled towards 0). */
function ema(alpha: number) {
  let v = 0;
  let calls = 0;
  return {
    add(x: number) {
      v = alpha * x + (1 - alpha) * v;
      calls++;
    },
    get value() {
      return calls ? v / (1 - (1 - alpha) ** calls) : 0;
    },
  };
}

/** Start a progress bar (see the module comment). */
export function progress(opts: ProgressOptions): Progress {
  const stream = opts.stream ?? process.stderr;
  const tty = opts.force || Boolean(stream.isTTY);
  const now = opts.now ?? (() => performance.now());
  const start = now();
  let count = Math.max(0, opts.initial ?? 0);
  let lastTick = start;
  let lastDraw = -Infinity;
  let lastLog = { count, at: start };
  let lastFields: Record<string, string | number> | undefined;
  const dn = ema(SMOOTHING);
  const dt = ema(SMOOTHING);
  const rate = () => (dt.value > 0 ? dn.value / dt.value : 0);
  const line = (fields?: Record<string, string | number>) => {
    const el = (now() - start) / 1000;
    const r = rate();
    const eta = r > 0 ? (opts.total - count) / r : NaN;
    const width = 24;
    const filled = Math.round((width * Math.min(count, opts.total)) / Math.max(1, opts.total));
    const extra = fields ? ' ' + Object.entries(fields).map(([k, v]) => `${k}=${v}`).join(' ') : '';
    return `${opts.label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${count}/${opts.total} ${formatRate(r)} ${fmtTime(el)}<${fmtTime(eta)}${extra}`;
  };
  const draw = () => {
    lastDraw = now();
    stream.write(`\r${line(lastFields)}\x1b[K`);
  };
  const log = () => {
    lastLog = { count, at: now() };
    stream.write(line(lastFields) + '\n');
  };
  const logging = opts.logEvery !== undefined;
  // the first line, before any step: the user sees at once that work started (and from where)
  if (tty) draw();
  else if (logging) log();
  return {
    get count() {
      return count;
    },
    get rate() {
      return rate();
    },
    tick(n = 1, fields) {
      const t = now();
      if (n > 0) {
        count += n;
        dn.add(n);
        dt.add((t - lastTick) / 1000);
        lastTick = t;
      }
      if (fields) lastFields = fields;
      if (tty) {
        if (t - lastDraw > 100 || count >= opts.total) draw();
      } else if (logging && n > 0) {
        const every = opts.logEvery!;
        const due = every > 0 && count - lastLog.count >= every && t - lastLog.at >= (opts.logSeconds ?? 0) * 1000;
        if (due || (count >= opts.total && lastLog.count < opts.total)) log();
      }
    },
    note(message) {
      if (tty) {
        stream.write(`\r${message}\x1b[K\n`);
        draw();
      } else stream.write(message + '\n');
    },
    done(message) {
      if (tty) stream.write(`\r${line(lastFields)}\x1b[K\n`);
      else if (logging && lastLog.count !== count) log();
      if (message) stream.write(message + '\n');
    },
  };
}
