/**
 * Typed user-facing errors. Library code throws these for bad input (files, keys, shapes, flags); the CLI prints
 * `error: <message>` on one line and exits with `exitCode`. Anything else is a bug and keeps its stack.
 */
export type ErrorKind =
  | 'usage' // bad flag or option value
  | 'file' // missing / unreadable / malformed file
  | 'format' // file readable but not what we expect (wrong keys, shapes, layout)
  | 'backend' // requested backend unavailable or unsuitable
  | 'unsupported' // valid input we deliberately do not handle (pickle files, SDXL, ...)
  | 'diverged'; // training produced NaN/Inf or absurd weights (nothing bad was saved)

const EXIT_CODES: Record<ErrorKind, number> = { usage: 2, file: 3, format: 4, backend: 5, unsupported: 6, diverged: 7 };

export class SdtuneError extends Error {
  readonly kind: ErrorKind;
  constructor(kind: ErrorKind, message: string) {
    super(message);
    this.name = 'SdtuneError';
    this.kind = kind;
  }
  get exitCode(): number {
    return EXIT_CODES[this.kind];
  }
}

export const usageError = (msg: string) => new SdtuneError('usage', msg);
export const fileError = (msg: string) => new SdtuneError('file', msg);
export const formatError = (msg: string) => new SdtuneError('format', msg);

/** `[2,3,4]` as it appears in messages. */
export const fmtShape = (shape: readonly number[]) => `[${shape.join(',')}]`;
