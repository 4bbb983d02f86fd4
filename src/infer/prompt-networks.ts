/**
 * A1111 extra-network tags in a prompt, resolved to files: `<lora:name:te:unet>` (also `<lyco:...>`, A1111's alias)
 * from a LoRA folder and `<hypernet:name:multiplier>` from a hypernetwork folder, looked up by file name stem in the
 * folder and its subfolders, as A1111 lists them; a LoRA name that is no file stem may be the `ss_output_name` alias
 * in a safetensors file's metadata (A1111's default "Alias from file", which its UI writes into tags).
 * The tags leave the prompt text; other tag kinds are removed too and reported (A1111 skips them with a log line).
 */
import { readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { SdtuneError, usageError } from '../errors.js';
import { readSafetensorsHeader } from '../io/safetensors.js';
import { hypernetFromTag, loraFromTag, parseExtraNetworks } from '../tokenizer/prompt-schedule.js';

export interface PromptNetworkDirs {
  /** folder of LoRA files for `<lora:...>` tags */
  loraDir?: string;
  /** folder of hypernetwork files for `<hypernet:...>` tags */
  hypernetworkDir?: string;
}

export interface PromptNetworks {
  /** the prompt without its tags (what the text encoder sees) */
  prompt: string;
  loras: { name: string; path: string; te: number; unet: number; tag: string }[];
  hypernetworks: { name: string; path: string; strength: number; tag: string }[];
  /** tags of kinds neither A1111 nor we know, removed from the prompt */
  unknown: string[];
}

// A1111 Lora: .pt, .ckpt, .safetensors; hypernetworks: .pt (plus our safetensors form). Safetensors first on a tie.
const LORA_EXT = ['.safetensors', '.pt', '.ckpt'];
const HYPERNET_EXT = ['.safetensors', '.pt'];
const MAX_FILES = 100_000;
const MAX_DEPTH = 16;

/** Files under `dir` by stem (extension in `exts`), walking subfolders; the same stem twice is an error when asked for. */
function listByStem(dir: string, exts: string[], flag: string): Map<string, string[]> {
  const found = new Map<string, string[]>();
  let seen = 0;
  const walk = (d: string, depth: number) => {
    let names: string[];
    try {
      names = readdirSync(d).sort();
    } catch (e) {
      throw new SdtuneError('file', `${flag} ${dir}: cannot read ${d} (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
    }
    for (const n of names) {
      if (++seen > MAX_FILES) throw usageError(`${flag} ${dir}: more than ${MAX_FILES} entries; point it at the folder of the networks`);
      const full = path.join(d, n);
      let st;
      try {
        st = statSync(full);
      } catch {
        continue; // a dangling link
      }
      if (st.isDirectory()) {
        if (depth < MAX_DEPTH) walk(full, depth + 1);
        continue;
      }
      const ext = path.extname(n).toLowerCase();
      if (!exts.includes(ext)) continue;
      const stem = n.slice(0, -ext.length);
      const list = found.get(stem) ?? [];
      list.push(full);
      found.set(stem, list);
    }
  };
  walk(dir, 0);
  return found;
}

/** The LoRA safetensors files whose metadata names `alias` as ss_output_name (headers read once per folder). */
async function byAlias(found: Map<string, string[]>, cache: Map<string, string[]>, alias: string): Promise<string[]> {
  if (cache.size === 0) {
    cache.set('', []); // marks the folder as read
    for (const files of found.values()) {
      for (const f of files.filter((x) => x.toLowerCase().endsWith('.safetensors'))) {
        let a: string | undefined;
        try {
          a = (await readSafetensorsHeader(f)).metadata.ss_output_name;
        } catch {
          continue; // an unreadable file has no alias; it fails with its own error when named by its stem
        }
        if (a) cache.set(a, [...(cache.get(a) ?? []), f]);
      }
    }
  }
  return cache.get(alias) ?? [];
}

function pick(found: Map<string, string[]>, name: string, tag: string, flag: string, dir: string, exts: string[], aliased: string[] = []): string {
  const files = found.get(name);
  if (!files?.length) {
    if (aliased.length === 1) return aliased[0]!;
    if (aliased.length > 1) throw usageError(`prompt tag ${tag}: several files under ${flag} ${dir} have the alias (ss_output_name) "${name}": ${aliased.join(', ')}; use a file name`);
    throw new SdtuneError('file', `prompt tag ${tag}: no ${exts.map((e) => name + e).join(' / ')} under ${flag} ${dir}${flag === 'loraDir' ? ', and no LoRA there has the alias (ss_output_name)' : ''} "${name}"`);
  }
  // one folder may hold name.safetensors and name.pt: the safetensors wins; the same stem in two folders is ambiguous
  const byDir = new Map<string, string[]>();
  for (const f of files) byDir.set(path.dirname(f), [...(byDir.get(path.dirname(f)) ?? []), f]);
  if (byDir.size > 1) throw usageError(`prompt tag ${tag}: "${name}" names several files under ${flag} ${dir}: ${files.join(', ')}`);
  const [only] = byDir.values();
  return only!.sort((a, b) => exts.indexOf(path.extname(a).toLowerCase()) - exts.indexOf(path.extname(b).toLowerCase()))[0]!;
}

/** Remove the prompt's extra-network tags and find their files (clear errors for a missing folder or file). */
export async function resolvePromptNetworks(prompt: string, dirs: PromptNetworkDirs = {}): Promise<PromptNetworks> {
  const { text, tags } = parseExtraNetworks(prompt);
  const out: PromptNetworks = { prompt: text, loras: [], hypernetworks: [], unknown: [] };
  let loraFiles: Map<string, string[]> | undefined;
  let hyperFiles: Map<string, string[]> | undefined;
  const aliases = new Map<string, string[]>();
  for (const t of tags) {
    if (t.kind === 'lora' || t.kind === 'lyco') {
      const l = loraFromTag(t);
      if (!dirs.loraDir) throw usageError(`prompt tag ${t.text} needs a LoRA folder (loraDir, --lora-dir on the command line) holding ${l.name}.safetensors`);
      loraFiles ??= listByStem(dirs.loraDir, LORA_EXT, 'loraDir');
      const aliased = loraFiles.has(l.name) ? [] : await byAlias(loraFiles, aliases, l.name);
      out.loras.push({ ...l, path: pick(loraFiles, l.name, t.text, 'loraDir', dirs.loraDir, LORA_EXT, aliased) });
    } else if (t.kind === 'hypernet') {
      const h = hypernetFromTag(t);
      if (!dirs.hypernetworkDir) throw usageError(`prompt tag ${t.text} needs a hypernetwork folder (hypernetworkDir, --hypernetwork-dir on the command line) holding ${h.name}.pt or ${h.name}.safetensors`);
      hyperFiles ??= listByStem(dirs.hypernetworkDir, HYPERNET_EXT, 'hypernetworkDir');
      out.hypernetworks.push({ ...h, path: pick(hyperFiles, h.name, t.text, 'hypernetworkDir', dirs.hypernetworkDir, HYPERNET_EXT) });
    } else out.unknown.push(t.text);
  }
  return out;
}
