// Each vitest project runs its files on one backend (vitest.config.ts): wasm for the suite, cpu as the reference
// for parity, webgpu (software adapter where no GPU) for parity where an adapter exists.
import { selectBackend } from '../src/runtime/backend.js';

await selectBackend(process.env.SDTUNE_TEST_BACKEND ?? 'cpu');
