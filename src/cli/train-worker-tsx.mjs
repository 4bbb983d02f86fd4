// Entry of the training worker when the CLI runs from the TypeScript sources (bin/sdtune.js without dist/, or
// `tsx src/cli/main.ts`): a worker thread does not inherit the main thread's tsx hooks, so it registers them itself.
import { register } from 'tsx/esm/api';

register();
await import('./train-worker.ts');
