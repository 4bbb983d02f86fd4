/**
 * Sampler names (ours, A1111's, diffusers' class names) without loading tfjs: the command line declares its options
 * and the config validates `output.sample_sampler` from here.
 */
import { usageError } from '../errors.js';
import type { SamplerName, SchedulerClass } from './schedule.js';

export const SAMPLER_NAMES: readonly SamplerName[] = ['ddim', 'pndm', 'lms', 'euler', 'euler_a', 'dpmpp_2m', 'dpmpp_2m_karras', 'ddpm'];

/** A1111's display names (the "Sampler:" field of the PNG parameters text). */
export const SAMPLER_LABELS: Readonly<Record<SamplerName, string>> = {
  ddim: 'DDIM', pndm: 'PLMS', lms: 'LMS', euler: 'Euler', euler_a: 'Euler a', dpmpp_2m: 'DPM++ 2M',
  dpmpp_2m_karras: 'DPM++ 2M Karras', ddpm: 'DDPM',
};

/** The diffusers class behind each sampler (its defaults apply to keys the config lacks). */
export const SAMPLER_CLASS: Readonly<Record<SamplerName, SchedulerClass>> = {
  ddim: 'DDIMScheduler', pndm: 'PNDMScheduler', lms: 'LMSDiscreteScheduler', euler: 'EulerDiscreteScheduler',
  euler_a: 'EulerAncestralDiscreteScheduler', dpmpp_2m: 'DPMSolverMultistepScheduler',
  dpmpp_2m_karras: 'DPMSolverMultistepScheduler', ddpm: 'DDPMScheduler',
};

const norm = (s: string) => s.toLowerCase().replace(/\+\+/g, 'pp').replace(/[\s_\-+]/g, '');
const ALIASES = new Map<string, SamplerName>([
  ...SAMPLER_NAMES.map((n) => [norm(n), n] as const),
  ...SAMPLER_NAMES.map((n) => [norm(SAMPLER_LABELS[n]), n] as const),
  ...SAMPLER_NAMES.filter((n) => n !== 'dpmpp_2m_karras').map((n) => [norm(SAMPLER_CLASS[n]), n] as const),
  ['eulerancestral', 'euler_a'], ['klms', 'lms'], ['keuler', 'euler'], ['keulera', 'euler_a'], ['keulerancestral', 'euler_a'],
  ['kdpmpp2m', 'dpmpp_2m'], ['kdpmpp2mkarras', 'dpmpp_2m_karras'],
]);

/** Canonical sampler from ours, A1111's ("Euler a", "DPM++ 2M Karras", "PLMS", ...) or a diffusers class name. */
export function resolveSampler(name: string): SamplerName {
  const hit = ALIASES.get(norm(name));
  if (hit) return hit;
  const valid = SAMPLER_NAMES.map((n) => `${n} ("${SAMPLER_LABELS[n]}")`).join(', ');
  throw usageError(`unknown sampler "${name}"; valid: ${valid} (diffusers class names are accepted too)`);
}


/**
 * The "Sampler" and "Schedule type" fields A1111 >= 1.9 writes: the sampler without its schedule ("DPM++ 2M") and the
 * schedule ("Karras"), "Automatic" when the sampler runs its own default schedule.
 */
export function infotextSampler(name: SamplerName): { sampler: string; scheduleType: string } {
  return name === 'dpmpp_2m_karras' ? { sampler: 'DPM++ 2M', scheduleType: 'Karras' } : { sampler: SAMPLER_LABELS[name], scheduleType: 'Automatic' };
}

/** Our sampler from an infotext's "Sampler" and "Schedule type" (older files put the schedule in the sampler's name). */
export function samplerFromInfotext(sampler: string, scheduleType?: string): SamplerName {
  const st = scheduleType?.trim();
  return resolveSampler(st && st !== 'Automatic' && !sampler.endsWith(` ${st}`) ? `${sampler} ${st}` : sampler);
}
