/** Backend names, in the default order of preference (a module without tfjs, for the command line and configs). */
export type BackendName = 'tensorflow' | 'cpu' | 'wasm' | 'webgpu';
export const BACKENDS: readonly BackendName[] = ['webgpu', 'tensorflow', 'wasm', 'cpu'];
