import { defineConfig } from 'vitest/config';

// Model tests are CPU-heavy on the pure-TS backend: run files in forked workers, two at a time (CI has 2 cores).
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    setupFiles: ['test/setup.ts'],
    globalSetup: ['test/global-setup.ts'],
  },
});
