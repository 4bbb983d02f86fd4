import { execFileSync } from 'node:child_process';
import { defineConfig } from 'vitest/config';

// The parity suites: every component, pipeline and training step against ../shared/golden. They run on every
// backend; the rest of the suite runs on wasm (10-30x faster than cpu), cpu stays the reference for parity.
const PARITY = ['test/models/parity.test.ts', 'test/infer/txt2img.test.ts', 'test/infer/img2img-inpaint.test.ts', 'test/infer/depth2img.test.ts', 'test/train/grad-parity.test.ts'];

/** Whether a WebGPU adapter exists (asked in a child process, so Dawn never lives in the test runner). */
function webgpuAdapter(): string | undefined {
  if (process.env.SDTUNE_TEST_WEBGPU === '0') return 'SDTUNE_TEST_WEBGPU=0';
  try {
    const out = execFileSync(process.execPath, ['--import', 'tsx', '-e', "import('./src/runtime/webgpu.ts').then(async (m) => { const p = await m.probeAdapter(); console.log(JSON.stringify(p)); })"], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
      timeout: 60_000,
    });
    const p = JSON.parse(out.trim().split('\n').pop()!) as { adapter?: unknown; reason?: string };
    return p.adapter ? undefined : p.reason;
  } catch (e) {
    return `probe failed: ${(e as Error).message.split('\n')[0]}`;
  }
}

const noWebgpu = webgpuAdapter();
if (noWebgpu) console.warn(`[sdtune tests] webgpu parity skipped: ${noWebgpu} (README: Development shows how to install the software Vulkan driver)`);

const project = (name: string, include: string[]) => ({
  extends: true as const,
  test: { name, include, env: { SDTUNE_TEST_BACKEND: name } },
});

// Files run in forked workers, two at a time (CI has 2 cores); timeouts sized for a slow, busy machine.
export default defineConfig({
  test: {
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 600_000,
    hookTimeout: 600_000,
    setupFiles: ['test/setup.ts'],
    globalSetup: ['test/global-setup.ts'],
    projects: [
      project('wasm', ['test/**/*.test.ts']),
      project('cpu', PARITY),
      ...(noWebgpu ? [] : [project('webgpu', [...PARITY, 'test/runtime/webgpu.test.ts'])]),
    ],
  },
});
