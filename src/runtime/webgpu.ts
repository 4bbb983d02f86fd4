/**
 * WebGPU through Dawn (`webgpu` npm package: Vulkan on Linux, Metal on macOS, D3D12 on Windows) with
 * `@tensorflow/tfjs-backend-webgpu`. Both are optional dependencies, loaded on demand.
 *
 * Two traps this module closes:
 *  - tfjs' WebGPU backend registers itself only if `navigator.gpu` exists when it is imported, so Dawn's GPU object
 *    and its globals are installed first and the backend is imported dynamically afterwards.
 *  - A tensor larger than the device's `maxStorageBufferBindingSize` cannot be bound to a shader: WebGPU reports a
 *    validation error on the device's error queue and the kernel's output reads back as zeros, with no exception.
 *    Every program launch is checked against the limit (a clear error naming the kernel, the tensor and the
 *    limit), and any device error that still happens is recorded by an `uncapturederror` listener and raised as an
 *    SdtuneError at the next kernel launch or `assertDeviceHealthy()` call.
 */
import * as tf from '@tensorflow/tfjs';
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { SdtuneError, fmtShape } from '../errors.js';

/** What the adapter says about itself (GPUAdapterInfo), plus its binding limit. */
export interface AdapterSummary {
  vendor: string;
  architecture: string;
  device: string;
  description: string;
  /** a software (CPU) implementation such as lavapipe / SwiftShader / WARP */
  fallback: boolean;
  maxBindingBytes: number;
  maxBufferBytes: number;
}

/** Human name of an adapter: the description when Dawn has one, else vendor/architecture/device. */
export function adapterName(a: AdapterSummary): string {
  return a.description || [a.vendor, a.architecture, a.device].filter(Boolean).join(' ') || 'unknown adapter';
}

interface GpuLike {
  requestAdapter(o?: { powerPreference?: string }): Promise<AdapterLike | null>;
}
interface AdapterLike {
  info?: Record<string, unknown>;
  isFallbackAdapter?: boolean;
  limits: { maxStorageBufferBindingSize: number; maxBufferSize: number };
}

let gpu: GpuLike | null | undefined;
let loadError = '';

/** Install Dawn's navigator.gpu and WebGPU globals once. Returns null (with the reason kept) where Dawn is absent. */
async function dawn(): Promise<GpuLike | null> {
  if (gpu !== undefined) return gpu;
  try {
    const mod = (await import('webgpu' as string)) as { create(flags: string[]): GpuLike; globals: Record<string, unknown> };
    const g = globalThis as unknown as Record<string, unknown> & { navigator?: Record<string, unknown> };
    for (const [k, v] of Object.entries(mod.globals)) if (!(k in g)) g[k] = v;
    const flags = (process.env.SDTUNE_DAWN_FLAGS ?? '').split(',').filter(Boolean);
    gpu = mod.create(flags);
    // Node 21+ has a global navigator; Node 20 does not
    if (!g.navigator) g.navigator = {};
    Object.defineProperty(g.navigator, 'gpu', { value: gpu, configurable: true });
  } catch (e) {
    loadError = `the \`webgpu\` package (Dawn) could not be loaded: ${(e as Error).message.split('\n')[0]}`;
    gpu = null;
  }
  return gpu;
}

/**
 * Ask Dawn for the adapter tfjs would get (high-performance preference). Undefined with a reason when there is no
 * WebGPU runtime or no adapter (no GPU driver and no software Vulkan driver).
 */
export async function probeAdapter(): Promise<{ adapter?: AdapterSummary; reason?: string }> {
  const g = await dawn();
  if (!g) return { reason: loadError };
  let a: AdapterLike | null;
  try {
    a = await g.requestAdapter({ powerPreference: 'high-performance' });
  } catch (e) {
    return { reason: `no WebGPU adapter: ${(e as Error).message}` };
  }
  if (!a) return { reason: 'no WebGPU adapter (no GPU driver for Vulkan/Metal/D3D12 was found)' };
  return { adapter: summarize(a) };
}

function summarize(a: AdapterLike): AdapterSummary {
  const info = (a.info ?? {}) as Record<string, unknown>;
  const str = (k: string) => (typeof info[k] === 'string' ? (info[k] as string) : '');
  return {
      vendor: str('vendor'),
      architecture: str('architecture'),
      device: str('device'),
      description: str('description'),
      fallback: Boolean(info.isFallbackAdapter ?? a.isFallbackAdapter ?? str('architecture') === 'software'),
      maxBindingBytes: a.limits.maxStorageBufferBindingSize,
      maxBufferBytes: a.limits.maxBufferSize,
  };
}

// what the child process of probeAdapterIsolated runs: plain JS, prints the adapter's info and limits as JSON
const PROBE_SCRIPT = `
const [url, flags] = process.argv.slice(1);
const m = await import(url);
const a = await m.create(flags ? flags.split(',') : []).requestAdapter({ powerPreference: 'high-performance' });
const info = {};
if (a?.info) for (const k of ['vendor', 'architecture', 'device', 'description', 'isFallbackAdapter']) info[k] = a.info[k];
const out = a && { info, isFallbackAdapter: a.isFallbackAdapter,
  limits: { maxStorageBufferBindingSize: a.limits.maxStorageBufferBindingSize, maxBufferSize: a.limits.maxBufferSize } };
process.stdout.write(JSON.stringify(out ?? null));
process.exit(0);
`;

/**
 * probeAdapter in a child process: what the default backend choice uses. Dawn writes its own notices to the
 * process' stderr (lavapipe: "maxDynamicUniformBuffersPerPipelineLayout artificially reduced ..." on every start)
 * and a broken GPU driver can crash the process that loads it; in a child neither reaches the user, and the
 * parent only loads Dawn when the adapter is worth using.
 */
export async function probeAdapterIsolated(timeoutMs = 60_000): Promise<{ adapter?: AdapterSummary; reason?: string }> {
  let entry: string;
  try {
    entry = pathToFileURL(createRequire(import.meta.url).resolve('webgpu')).href;
  } catch (e) {
    return { reason: `the \`webgpu\` package (Dawn) is not installed (${(e as Error).message.split('\n')[0]})` };
  }
  const flags = process.env.SDTUNE_DAWN_FLAGS ?? '';
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--input-type=module', '-e', PROBE_SCRIPT, entry, flags],
      { timeout: timeoutMs, maxBuffer: 1 << 20, env: process.env },
      (err, stdout) => {
        if (err) {
          const why = err.killed ? `timed out after ${timeoutMs / 1000} s` : `exited with ${err.code ?? err.signal}`;
          return resolve({ reason: `the WebGPU probe (a child process loading Dawn) ${why}` });
        }
        try {
          const a = JSON.parse(stdout) as AdapterLike | null;
          resolve(a ? { adapter: summarize(a) } : { reason: 'no WebGPU adapter (no GPU driver for Vulkan/Metal/D3D12 was found)' });
        } catch {
          resolve({ reason: 'the WebGPU probe printed no adapter description' });
        }
      },
    );
  });
}

interface DeviceLike {
  limits: { maxStorageBufferBindingSize: number };
  addEventListener(type: 'uncapturederror', f: (e: { error?: { message?: string } }) => void): void;
  lost: Promise<{ reason?: string; message?: string }>;
}
interface ProgramLike {
  outputShape: number[];
  shaderKey?: string;
  variableNames?: string[];
}
interface WebGPUBackendLike {
  device: DeviceLike;
  runWebGPUProgram(program: ProgramLike, inputs: tf.TensorInfo[], outputDtype: string, ...rest: unknown[]): tf.TensorInfo;
  __sdtuneGuarded?: boolean;
}

const deviceErrors: string[] = [];
let bindingLimit = Infinity;

/** The active WebGPU device's binding limit in bytes (Infinity when webgpu is not the backend). */
export function webgpuBindingLimit(): number {
  return tf.getBackend() === 'webgpu' ? bindingLimit : Infinity;
}

/** Throw the first device error recorded since the last check (validation, out-of-memory, device lost). */
export function assertDeviceHealthy(): void {
  if (!deviceErrors.length) return;
  const first = deviceErrors[0];
  const more = deviceErrors.length > 1 ? ` (and ${deviceErrors.length - 1} more)` : '';
  deviceErrors.length = 0;
  throw new SdtuneError('backend', `the WebGPU device reported an error, so results computed since are not trustworthy: ${first}${more}`);
}

const kernelName = (p: ProgramLike) => p.constructor?.name?.replace(/Program$/, '') || p.shaderKey?.split('_')[0] || 'kernel';
const mib = (b: number) => `${b.toLocaleString('en-US')} bytes (${(b / 2 ** 20).toFixed(1)} MiB)`;
const bytesOf = (shape: readonly number[]) => 4 * shape.reduce((a, b) => a * b, 1); // webgpu stores every dtype in 32 bits

/** Check each program's bound tensors against the binding limit before it runs; surface recorded device errors. */
function guard(backend: WebGPUBackendLike): void {
  if (backend.__sdtuneGuarded) return;
  const device = backend.device;
  bindingLimit = device.limits.maxStorageBufferBindingSize;
  device.addEventListener('uncapturederror', (e) => deviceErrors.push((e.error?.message ?? 'unknown error').split('\n')[0]));
  void device.lost.then((l) => deviceErrors.push(`device lost: ${l.message ?? l.reason ?? ''}`));
  const run = backend.runWebGPUProgram.bind(backend);
  backend.runWebGPUProgram = (program, inputs, outputDtype, ...rest) => {
    assertDeviceHealthy();
    const limit = bindingLimit;
    const check = (what: string, shape: readonly number[]) => {
      const bytes = bytesOf(shape);
      if (bytes > limit) {
        throw new SdtuneError(
          'backend',
          `${kernelName(program)}: ${what} ${fmtShape(shape)} needs ${mib(bytes)}, over this WebGPU device's ` +
            `maxStorageBufferBindingSize of ${mib(limit)} (a larger tensor would silently read back as zeros). ` +
            'Use a smaller size or batch, a lower --attention-chunk, or a GPU with a larger limit.',
        );
      }
    };
    check('output', program.outputShape);
    inputs.forEach((t, i) => check(`input ${program.variableNames?.[i] ?? i}`, t.shape));
    return run(program, inputs, outputDtype, ...rest);
  };
  backend.__sdtuneGuarded = true;
}

/**
 * Initialise tfjs' webgpu backend on Dawn and install the guards. Returns the adapter summary, or a reason when
 * WebGPU is unavailable (the package is missing, no adapter, or the backend failed to start).
 */
export async function activateWebgpu(): Promise<{ adapter?: AdapterSummary; reason?: string }> {
  const probe = await probeAdapter();
  if (!probe.adapter) return probe;
  try {
    await import('@tensorflow/tfjs-backend-webgpu' as string);
  } catch (e) {
    return { reason: `@tensorflow/tfjs-backend-webgpu could not be loaded: ${(e as Error).message.split('\n')[0]}` };
  }
  try {
    if (!(await tf.setBackend('webgpu'))) return { reason: 'tfjs could not start its webgpu backend on this adapter' };
    await tf.ready();
  } catch (e) {
    return { reason: `tfjs' webgpu backend failed to start: ${(e as Error).message.split('\n')[0]}` };
  }
  guard(tf.backend() as unknown as WebGPUBackendLike);
  return probe;
}
