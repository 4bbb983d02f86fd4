/** File names of adapters (a module without tfjs: the config and the command line use it). */

/** Characters that cannot be in a file name on some OS (Windows' set, which includes POSIX's /), and control characters. */
// eslint-disable-next-line no-control-regex
const UNSAFE_IN_FILE_NAME = /[<>:"/\\|?*\u0000-\u001f\u007f]/g;
const WINDOWS_RESERVED = /^(con|prn|aux|nul|com\d|lpt\d)$/i;

/**
 * The file-name stem for an embedding of `token`, as A1111 loads embeddings by file name: the token without the
 * characters unsafe in file names (`<my-logo>` -> `my-logo`), trimmed of spaces and dots at the ends; `embedding`
 * when nothing is left, and `_` appended to a Windows device name.
 */
export function embeddingFileStem(token: string): string {
  const stem = token.replace(UNSAFE_IN_FILE_NAME, '').replace(/^[\s.]+|[\s.]+$/g, '');
  if (!stem) return 'embedding';
  return WINDOWS_RESERVED.test(stem) ? `${stem}_` : stem;
}

/** A model or adapter file's name as A1111 writes it (PNG "Model", "Lora hashes", a hypernetwork's sd_checkpoint_name):
 *  the file name without its weights extension (.safetensors, .ckpt, .pt, .pth, .bin); a folder's name as it is. */
export function modelStem(file: string): string {
  return file.replace(/[\\/]+$/, '').split(/[\\/]/).pop()!.replace(/\.(safetensors|ckpt|pt|pth|bin)$/i, '');
}
