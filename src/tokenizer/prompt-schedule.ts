/**
 * The A1111 prompt syntax that runs before emphasis parsing (AUTOMATIC1111 modules/prompt_parser.py and
 * modules/extra_networks.py, v1.10; restated from the algorithm, not copied):
 *  - extra-network tags `<lora:name:te:unet>`, `<hypernet:name:mult>`, any `<kind:args>`: removed from the prompt text
 *    (`parseExtraNetworks`);
 *  - composable diffusion: the prompt splits on the word `AND`, each sub-prompt with an optional trailing `:weight`
 *    (`splitAnd`);
 *  - prompt editing `[from:to:when]`, `[to:when]`, `[from::when]` and alternation `[a|b|c]`, nested in any way and mixed
 *    with emphasis (`promptSchedule`): the list of (last step, text) pairs that A1111's
 *    get_learned_conditioning_prompt_schedules builds.
 * Pure string functions (no tfjs): bounded time (linear scans, memoised parse) on any input.
 */
import { SdtuneError } from '../errors.js';

// ---- extra networks ------------------------------------------------------------------------------------------------

/** One `<kind:a:b:c>` tag: its items split on ':'; `positional` are the items without '=' and `named` the `key=value` ones. */
export interface ExtraNetworkTag {
  kind: string;
  items: string[];
  positional: string[];
  named: Record<string, string>;
  /** the tag as written */
  text: string;
}

const WORD_CHAR = /[\p{L}\p{N}_]/u;

/**
 * A1111 extra_networks.parse_prompt: every `<(\w+):([^>]+)>` is removed from the text and returned as a tag, in order.
 * (A scanner rather than the regex: V8 would backtrack quadratically on many '<' without a '>'.)
 */
export function parseExtraNetworks(prompt: string): { text: string; tags: ExtraNetworkTag[] } {
  const tags: ExtraNetworkTag[] = [];
  let out = '';
  let copied = 0;
  let nextGt = -1; // index of the first '>' at or after the scan position (-1: none left)
  for (let i = prompt.indexOf('<'); i >= 0 && i < prompt.length; ) {
    let j = i + 1;
    while (j < prompt.length && WORD_CHAR.test(prompt[j]!)) j++;
    if (j > i + 1 && prompt[j] === ':') {
      if (nextGt < j + 1) nextGt = prompt.indexOf('>', j + 1);
      if (nextGt < 0) break; // no '>' anywhere after: no tag can match any more
      if (nextGt > j + 1) {
        const args = prompt.slice(j + 1, nextGt);
        tags.push(makeTag(prompt.slice(i + 1, j), args.split(':'), prompt.slice(i, nextGt + 1)));
        out += prompt.slice(copied, i);
        copied = nextGt + 1;
        i = prompt.indexOf('<', copied);
        continue;
      }
    }
    i = prompt.indexOf('<', i + 1);
  }
  return { text: out + prompt.slice(copied), tags };
}

function makeTag(kind: string, items: string[], text: string): ExtraNetworkTag {
  const positional: string[] = [];
  const named: Record<string, string> = {};
  for (const item of items) {
    const parts = item.split('=');
    // Python item.split('=', 2) has exactly two parts only when there is one '='
    if (parts.length === 2) named[parts[0]!] = parts[1]!;
    else positional.push(item);
  }
  return { kind, items, positional, named, text };
}

/** Python float() of a tag argument (surrounding spaces allowed); anything else is a usage error naming the tag. */
function tagNumber(v: string, tag: ExtraNetworkTag, what: string): number {
  const s = v.trim();
  const n = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(s) ? Number(s) : NaN;
  if (!Number.isFinite(n)) throw new SdtuneError('usage', `prompt tag ${tag.text}: the ${what} "${v}" is not a number`);
  return n;
}

/** A LoRA asked for by a `<lora:...>` tag: A1111's multipliers for the text encoder and the UNet (default 1; unet defaults to te). */
export interface LoraTag {
  name: string;
  te: number;
  unet: number;
  tag: string;
}

/** `<lora:name>`, `<lora:name:m>`, `<lora:name:te:unet>`, `<lora:name:te=…:unet=…>` (extensions-builtin/Lora/extra_networks_lora.py). */
export function loraFromTag(tag: ExtraNetworkTag): LoraTag {
  const name = tag.positional[0];
  if (!name) throw new SdtuneError('usage', `prompt tag ${tag.text}: no LoRA name`);
  let te = tag.positional.length > 1 ? tagNumber(tag.positional[1]!, tag, 'text-encoder multiplier') : 1;
  if (tag.named.te !== undefined) te = tagNumber(tag.named.te, tag, 'te multiplier');
  let unet = tag.positional.length > 2 ? tagNumber(tag.positional[2]!, tag, 'UNet multiplier') : te;
  if (tag.named.unet !== undefined) unet = tagNumber(tag.named.unet, tag, 'unet multiplier');
  if (tag.positional.length > 3 || tag.named.dyn !== undefined) {
    throw new SdtuneError('unsupported', `prompt tag ${tag.text}: the dynamic-dimension argument (dyn) is not supported`);
  }
  return { name, te, unet, tag: tag.text };
}

/** `<hypernet:name>` / `<hypernet:name:multiplier>` (modules/extra_networks_hypernet.py: items[0], float(items[1]) or 1). */
export function hypernetFromTag(tag: ExtraNetworkTag): { name: string; strength: number; tag: string } {
  const name = tag.items[0];
  if (!name) throw new SdtuneError('usage', `prompt tag ${tag.text}: no hypernetwork name`);
  return { name, strength: tag.items.length > 1 ? tagNumber(tag.items[1]!, tag, 'multiplier') : 1, tag: tag.text };
}

// ---- AND -----------------------------------------------------------------------------------------------------------

const RE_AND = /(?<![\p{L}\p{N}_])AND(?![\p{L}\p{N}_])/u;
const RE_WEIGHT_NUMBER = /^[-+]?(?:\d+\.?|\d*\.\d+)$/;
const isSpace = (c: string) => /\s/.test(c);

/**
 * A1111 get_multicond_prompt_list for one prompt: split on `\bAND\b`, then each part's trailing `:weight`
 * (re_weight `^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$`, written as a scan) is taken off; trailing spaces go too.
 * A prompt without AND is one part, so a prompt ending in ":2" (e.g. "ratio 16:9") is weighted there too, as in A1111.
 */
export function splitAnd(prompt: string): { text: string; weight: number }[] {
  return prompt.split(new RegExp(RE_AND.source, 'gu')).map((part) => {
    let end = part.length;
    while (end > 0 && isSpace(part[end - 1]!)) end--;
    const stripped = part.slice(0, end);
    const colon = stripped.lastIndexOf(':');
    if (colon >= 0) {
      const num = stripped.slice(colon + 1).replace(/^\s+/, '');
      if (RE_WEIGHT_NUMBER.test(num)) {
        let t = colon;
        while (t > 0 && isSpace(stripped[t - 1]!)) t--;
        return { text: stripped.slice(0, t), weight: Number(num) };
      }
    }
    return { text: stripped, weight: 1 };
  });
}

// ---- prompt editing and alternation --------------------------------------------------------------------------------

type Node =
  | { t: 'text'; s: string }
  | { t: 'group'; open: string; parts: Node[][]; seps: string[]; close: string } // emphasis: kept verbatim
  | { t: 'sched'; before: Node[] | null; after: Node[]; num: string }
  | { t: 'alt'; options: Node[][] };

/** Nesting deeper than this is refused (the parser recurses once per bracket level). */
export const MAX_PROMPT_NESTING = 200;

// lark common.SIGNED_NUMBER, with A1111's optional whitespace around it and the closing bracket
const RE_WHEN = /\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]/y;

/**
 * Recursive descent over A1111's lark grammar (prompt_parser.schedule_parser):
 *   start: (prompt | /[][():]/+)*          prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
 *   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
 *   scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
 *   alternate: "[" prompt ("|" [prompt])+ "]"          plain: /([^\\\[\]():|]|\\.)+/
 * A bracket that does not parse as a group is a literal character at the top level (lark's preference for the
 * structured reading, checked against A1111's doctests) and a failure inside a group. `|` outside any group, or a
 * backslash at the end or before a newline, fails the whole parse: A1111 then uses the prompt as it is.
 * Group and prompt parses are memoised by position, so the time is linear in the prompt's length.
 */
class ScheduleParser {
  private groups = new Map<number, { node: Node; end: number } | null>();
  private prompts = new Map<number, { nodes: Node[]; end: number } | null>();
  private depth = 0;
  constructor(private s: string) {}

  /** The whole prompt, or null when A1111's parse fails. */
  parse(): Node[] | null {
    const s = this.s;
    const nodes: Node[] = [];
    for (let p = 0; p < s.length; ) {
      const c = s[p]!;
      if (c === '[' || c === '(') {
        const g = this.group(p);
        if (g) {
          nodes.push(g.node);
          p = g.end;
        } else {
          nodes.push({ t: 'text', s: c });
          p++;
        }
      } else if (c === ']' || c === ')' || c === ':') {
        nodes.push({ t: 'text', s: c });
        p++;
      } else if (c === '|') return null;
      else {
        const e = this.plain(p);
        if (e === null) return null;
        nodes.push({ t: 'text', s: s.slice(p, e) });
        p = e;
      }
    }
    return nodes;
  }

  /** End of the plain/whitespace run at p (> p), or null for a bad escape. */
  private plain(p: number): number | null {
    const s = this.s;
    let i = p;
    while (i < s.length) {
      const c = s[i]!;
      if (c === '\\') {
        const n = s[i + 1];
        if (n === undefined || n === '\n' || n === '\r' || n === '\u2028' || n === '\u2029') return null; // lark's '.' stops at a newline
        i += n.length === 1 && /[\uD800-\uDBFF]/.test(n) ? 3 : 2;
      } else if ('[]():|'.includes(c)) break;
      else i++;
    }
    return i > p ? i : null;
  }

  /** A `prompt` (possibly empty) from p up to one of `] ) : |` or the end; null if a group inside fails. */
  private prompt(p: number): { nodes: Node[]; end: number } | null {
    if (this.prompts.has(p)) return this.prompts.get(p)!;
    const s = this.s;
    const nodes: Node[] = [];
    let i = p;
    let res: { nodes: Node[]; end: number } | null = null;
    for (;;) {
      if (i >= s.length || ']):|'.includes(s[i]!)) {
        res = { nodes, end: i };
        break;
      }
      if (s[i] === '[' || s[i] === '(') {
        const g = this.group(i);
        if (!g) break;
        nodes.push(g.node);
        i = g.end;
        continue;
      }
      const e = this.plain(i);
      if (e === null) break;
      nodes.push({ t: 'text', s: s.slice(i, e) });
      i = e;
    }
    this.prompts.set(p, res);
    return res;
  }

  /** A group at p (`(` or `[`): emphasis, prompt editing or alternation; null if it does not parse. */
  private group(p: number): { node: Node; end: number } | null {
    if (this.groups.has(p)) return this.groups.get(p)!;
    if (++this.depth > MAX_PROMPT_NESTING) {
      throw new SdtuneError('usage', `prompt: brackets nest deeper than ${MAX_PROMPT_NESTING} levels`);
    }
    let res: { node: Node; end: number } | null = null;
    try {
      res = this.s[p] === '(' ? this.round(p) : this.square(p);
    } finally {
      this.depth--;
    }
    this.groups.set(p, res);
    return res;
  }

  private round(p: number): { node: Node; end: number } | null {
    const s = this.s;
    const a = this.prompt(p + 1);
    if (!a) return null;
    if (s[a.end] === ')') return { node: { t: 'group', open: '(', parts: [a.nodes], seps: [], close: ')' }, end: a.end + 1 };
    if (s[a.end] !== ':') return null;
    const b = this.prompt(a.end + 1);
    if (!b || s[b.end] !== ')') return null;
    return { node: { t: 'group', open: '(', parts: [a.nodes, b.nodes], seps: [':'], close: ')' }, end: b.end + 1 };
  }

  private square(p: number): { node: Node; end: number } | null {
    const s = this.s;
    const a = this.prompt(p + 1);
    if (!a) return null;
    const next = s[a.end];
    if (next === ']') return { node: { t: 'group', open: '[', parts: [a.nodes], seps: [], close: ']' }, end: a.end + 1 };
    if (next === '|') {
      const options = [a.nodes];
      let i = a.end;
      while (s[i] === '|') {
        const o = this.prompt(i + 1);
        if (!o) return null;
        options.push(o.nodes);
        i = o.end;
      }
      return s[i] === ']' ? { node: { t: 'alt', options }, end: i + 1 } : null;
    }
    if (next !== ':') return null;
    const when = this.when(a.end + 1);
    if (when) return { node: { t: 'sched', before: null, after: a.nodes, num: when.num }, end: when.end }; // [to:when]
    const b = this.prompt(a.end + 1);
    if (!b || s[b.end] !== ':') return null;
    const w = this.when(b.end + 1);
    return w ? { node: { t: 'sched', before: a.nodes, after: b.nodes, num: w.num }, end: w.end } : null;
  }

  /** `[WHITESPACE] NUMBER [WHITESPACE] "]"` at p. */
  private when(p: number): { num: string; end: number } | null {
    RE_WHEN.lastIndex = p;
    const m = RE_WHEN.exec(this.s);
    return m ? { num: m[1]!, end: RE_WHEN.lastIndex } : null;
  }
}

/** One entry of a prompt schedule: the text is used up to and including sampling step `end` (A1111 end_at_step). */
export interface ScheduledText {
  end: number;
  text: string;
}

export interface ScheduleOptions {
  /** A1111's "Use old prompt editing timelines" (use_old_scheduling): `when` < 1 is a fraction, else a step number. Default: the current rule (a number written with '.' is a fraction of the steps, one without is a step number). */
  legacy?: boolean;
}

/**
 * A1111 get_learned_conditioning_prompt_schedules for one prompt: the steps at which the text changes and the text
 * up to each, e.g. ("a [b:c:0.5]", 10) -> [{end: 5, text: "a b"}, {end: 10, text: "a c"}]. `when` becomes
 * min(steps, int(v)) with v = when·steps for a fraction; values < 1 add no change point. Alternation changes at every
 * step, option (step − 1) mod n. Emphasis brackets stay in the texts (parsePromptAttention reads them later).
 */
export function promptSchedule(prompt: string, steps: number, opts: ScheduleOptions = {}): ScheduledText[] {
  if (!Number.isInteger(steps) || steps < 1) throw new SdtuneError('usage', `prompt schedule: steps must be a positive integer, got ${steps}`);
  const tree = new ScheduleParser(prompt).parse();
  if (!tree) return [{ end: steps, text: prompt }];
  const whenOf = new Map<Node, number>();
  const points = new Set<number>([steps]);
  const collect = (nodes: Node[]) => {
    for (const n of nodes) {
      if (n.t === 'group') n.parts.forEach(collect);
      else if (n.t === 'alt') {
        n.options.forEach(collect);
        for (let k = 1; k <= steps; k++) points.add(k);
      } else if (n.t === 'sched') {
        if (n.before) collect(n.before);
        collect(n.after);
        let v = Number(n.num);
        if (opts.legacy) v = v < 1 ? v * steps : v;
        else if (n.num.includes('.')) v *= steps;
        const w = Math.min(steps, Math.trunc(v)); // Python min(steps, int(v)); an infinite v clamps to steps
        whenOf.set(n, w);
        if (w >= 1) points.add(w);
      }
    }
  };
  collect(tree);
  const render = (nodes: Node[], step: number): string => {
    let out = '';
    for (const n of nodes) {
      if (n.t === 'text') out += n.s;
      else if (n.t === 'group') {
        out += n.open;
        n.parts.forEach((part, k) => (out += (k > 0 ? n.seps[k - 1] : '') + render(part, step)));
        out += n.close;
      } else if (n.t === 'alt') out += render(n.options[(step - 1) % n.options.length]!, step);
      else out += step <= whenOf.get(n)! ? render(n.before ?? [], step) : render(n.after, step);
    }
    return out;
  };
  return [...points].sort((a, b) => a - b).map((end) => ({ end, text: render(tree, end) }));
}

/**
 * The schedule entry in force at sampler call `i` (0-based), as A1111's reconstruct_cond_batch picks it: the first
 * entry whose end >= i (A1111's denoiser counts its calls from 0 while the schedule's steps are 1-based, so
 * `[a:b:5]` uses `a` for 6 calls), the first entry when none does.
 */
export function scheduleIndexAt(schedule: readonly ScheduledText[], i: number): number {
  const k = schedule.findIndex((e) => i <= e.end);
  return k < 0 ? 0 : k;
}
