// The adapter flag values (`--lora FILE[:WEIGHT]`, `--embedding FILE[:TOKEN]`, `--hypernetwork FILE[:STRENGTH]`) ->
// the library's structured options.
import { describe, expect, it } from 'vitest';
import { adapterArgs, embeddingArg, hypernetworkArg, loraArg, parseAdapterArg } from '../../src/cli/adapter-args.js';
import { SdtuneError } from '../../src/errors.js';

describe('parseAdapterArg', () => {
  it.each([
    ['style.safetensors', { path: 'style.safetensors', weight: 1 }],
    ['style.safetensors:0.7', { path: 'style.safetensors', weight: 0.7 }],
    ['dir/a:b.safetensors:-.5', { path: 'dir/a:b.safetensors', weight: -0.5 }],
    ['x.safetensors:1e-1', { path: 'x.safetensors', weight: 0.1 }],
    ['C:\\loras\\style.safetensors', { path: 'C:\\loras\\style.safetensors', weight: 1 }],
    ['C:\\loras\\style.safetensors:0.5', { path: 'C:\\loras\\style.safetensors', weight: 0.5 }],
    ['C:0.5', { path: 'C:0.5', weight: 1 }],
    ['odd:name.safetensors', { path: 'odd:name.safetensors', weight: 1 }],
  ])('%s', (arg, expected) => expect(parseAdapterArg(arg)).toEqual(expected));
  it('default weight and errors', () => {
    expect(parseAdapterArg('a.safetensors', 0.25).weight).toBe(0.25);
    expect(() => parseAdapterArg('a.safetensors:')).toThrow(/missing weight/);
    expect(() => parseAdapterArg(':0.5')).toThrow(/missing file/);
    expect(() => parseAdapterArg('')).toThrow(SdtuneError);
  });
});

describe('flag values -> options', () => {
  it('lora, hypernetwork, embedding; absent, one or many values', () => {
    expect(adapterArgs(['a.safetensors:0.5', 'b.pt'], loraArg)).toEqual([{ path: 'a.safetensors', weight: 0.5 }, { path: 'b.pt', weight: 1 }]);
    expect(adapterArgs('hn.pt:0.7', hypernetworkArg)).toEqual([{ path: 'hn.pt', strength: 0.7 }]);
    expect(adapterArgs(undefined, loraArg)).toBeUndefined();
    expect(hypernetworkArg('C:\\hn\\x.pt')).toEqual({ path: 'C:\\hn\\x.pt', strength: 1 });
    expect(embeddingArg('e.safetensors')).toEqual({ path: 'e.safetensors' });
    expect(embeddingArg('e.safetensors:<my-logo>')).toEqual({ path: 'e.safetensors', token: '<my-logo>' });
    expect(embeddingArg('C:\\emb\\e.pt')).toEqual({ path: 'C:\\emb\\e.pt' });
    expect(embeddingArg('C:\\emb\\e.pt:tok')).toEqual({ path: 'C:\\emb\\e.pt', token: 'tok' });
    expect(() => embeddingArg('')).toThrow(/missing file name/);
  });
});
