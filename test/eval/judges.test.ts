// The toy world's judges, validated on freshly generated procedural images (purple and heart included) before they
// judge any model, and on images with nothing to judge (they give no verdict, never throw).
import { describe, expect, it } from 'vitest';
import { TOY_COLOURS, TOY_RGB, TOY_SHAPES, renderToyImage, toyWorldImages } from '../../src/data/toy-world.js';
import { REFERENCE_HUES, judgeColour, judgeShape, judgeToyImage, rgbToHsv } from '../../src/eval/judges.js';

const img = (data: Uint8Array) => ({ data, width: 32, height: 32 });

describe('toy world judges', () => {
  it('are >= 99% right on 500 fresh world images (all 5 colours and 5 shapes)', () => {
    const items = toyWorldImages(500, { seed: 2026, include: ['purple', 'heart'] });
    expect(new Set(items.map((x) => x.labels.colour)).size).toBe(5);
    expect(new Set(items.map((x) => x.labels.shape)).size).toBe(5);
    let colours = 0;
    let shapes = 0;
    const wrong: string[] = [];
    for (const x of items) {
      const v = judgeToyImage(img(x.pixels));
      if (v.colour.colour === x.labels.colour) colours++;
      else wrong.push(`colour ${x.caption}: ${v.colour.colour}`);
      if (v.shape.shape === x.labels.shape) shapes++;
      else wrong.push(`shape ${x.caption}: ${v.shape.shape}`);
    }
    expect(colours / items.length, wrong.join('\n')).toBeGreaterThanOrEqual(0.99);
    expect(shapes / items.length, wrong.join('\n')).toBeGreaterThanOrEqual(0.99);
  });

  it('stay >= 98% right on blurred, noisy images (what a decoder draws is softer than the rasteriser)', () => {
    // a 3x3 binomial blur plus uniform noise of +-20 per channel, from a fixed LCG
    let seed = 99;
    const rnd = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32 - 0.5;
    const soften = (p: Uint8Array) => {
      const o = new Uint8Array(p.length);
      for (let i = 0; i < 32; i++) {
        for (let j = 0; j < 32; j++) {
          for (let c = 0; c < 3; c++) {
            let acc = 0, w = 0;
            for (let a = -1; a <= 1; a++) {
              for (let b = -1; b <= 1; b++) {
                const y = i + a, x = j + b;
                if (y < 0 || x < 0 || y > 31 || x > 31) continue;
                const k = (2 - Math.abs(a)) * (2 - Math.abs(b));
                acc += k * p[(y * 32 + x) * 3 + c]!;
                w += k;
              }
            }
            o[(i * 32 + j) * 3 + c] = Math.max(0, Math.min(255, Math.round(acc / w + 40 * rnd())));
          }
        }
      }
      return o;
    };
    const items = toyWorldImages(300, { seed: 77, include: ['purple', 'heart'] });
    let right = 0;
    for (const x of items) {
      const v = judgeToyImage(img(soften(x.pixels)));
      if (v.colour.colour === x.labels.colour && v.shape.shape === x.labels.shape) right++;
    }
    expect(right / items.length).toBeGreaterThanOrEqual(0.98);
  });

  it('locate the shape: the best template sits where it was drawn', () => {
    const v = judgeShape(img(renderToyImage('heart', TOY_RGB.purple, 21.2, 15.3, 8.6)));
    expect(v.shape).toBe('heart');
    expect(v.iou.heart).toBeGreaterThan(0.9);
    expect(Math.abs(v.cx - 21.2)).toBeLessThan(0.5);
    expect(Math.abs(v.cy - 15.3)).toBeLessThan(0.5);
    expect(Math.abs(v.radius - 8.6) / 8.6).toBeLessThan(0.06);
    for (const s of TOY_SHAPES) if (s !== 'heart') expect(v.iou[s]).toBeLessThan(v.iou.heart - 0.05);
  });

  it('snap each reference colour to itself, whatever the shape', () => {
    for (const c of TOY_COLOURS) {
      expect(rgbToHsv(...TOY_RGB[c]).s).toBeGreaterThan(0.75);
      for (const s of TOY_SHAPES) {
        const v = judgeColour(img(renderToyImage(s, TOY_RGB[c], 16, 16, 5)));
        expect(v.colour, `${c} ${s}`).toBe(c);
        expect(Math.abs(v.hue - REFERENCE_HUES[c])).toBeLessThan(1); // anti-aliased edges keep the hue
      }
    }
  });

  it('give no verdict (scored wrong) on an empty, a black, a grey or an almost empty image, without throwing', () => {
    const white = new Uint8Array(32 * 32 * 3).fill(255);
    for (const data of [white, new Uint8Array(32 * 32 * 3), new Uint8Array(32 * 32 * 3).fill(128)]) {
      const v = judgeToyImage(img(data));
      expect(v.colour.colour).toBeNull();
      expect(Number.isNaN(v.colour.hue)).toBe(true);
      expect(v.shape.shape).toBeNull();
      expect(v.shape.pixels).toBe(0);
    }
    const speck = white.slice();
    for (const p of [0, 1, 2, 33, 34, 500, 900]) speck.set([200, 20, 20], 3 * p); // 7 ink pixels < 8
    expect(judgeToyImage(img(speck)).colour.colour).toBeNull();
    expect(judgeToyImage(img(speck)).shape.shape).toBeNull();
  });

  it('judge noise without crashing; a scatter of ink matches no shape', () => {
    let s = 12345;
    const noise = Uint8Array.from({ length: 32 * 32 * 3 }, () => ((s = (s * 1103515245 + 12345) >>> 0) >>> 24));
    const v = judgeToyImage(img(noise));
    expect(v.colour.pixels).toBeGreaterThan(100);
    expect(v.colour.colour === null || TOY_COLOURS.includes(v.colour.colour)).toBe(true);
    expect(v.shape.shape).toBeNull(); // ink everywhere at random: no template reaches IoU 0.5
  });

  it('refuse an image of the wrong size or a short buffer with a usage error', () => {
    expect(() => judgeToyImage({ data: new Uint8Array(64 * 64 * 3), width: 64, height: 64 })).toThrow(/toy world's images are 32x32, got 64x64/);
    expect(() => judgeColour({ data: new Uint8Array(10), width: 32, height: 32 })).toThrow(/expected 32x32x3 bytes/);
  });
});
