/**
 * Depth maps for depth-to-image (stable-diffusion-2-depth): reading a user's map (8/16-bit grayscale PNG, or any
 * image sharp decodes), and the 5th UNet input channel made from it exactly as diffusers'
 * StableDiffusionDepth2ImgPipeline.prepare_depth_map does: resize to the latent size with torch's bicubic
 * (a = -0.75, align_corners=False, no antialias, borders clamped), then per image 2·(d − min)/(max − min) − 1.
 * The arithmetic is float32 step by step (Math.fround), as torch computes it on float32 tensors.
 */
import sharp from 'sharp';
import { SdtuneError, usageError } from '../errors.js';

/** A depth map: one value per pixel, row-major [height, width]; any scale (only the relative values matter). */
export interface DepthMap {
  data: Float32Array;
  width: number;
  height: number;
}

/** The largest depth map read (pixels): 8192 x 8192, 256 MiB as float32. */
export const MAX_DEPTH_PIXELS = 8192 * 8192;

/**
 * Read a depth map. Near = bright, as MiDaS / DPT write their inverse-depth PNGs (pass `invert` to depthCondition
 * for maps where near is dark). Grayscale images (8 or 16 bit, alpha ignored) are read as they are; an RGB image is
 * accepted only when its three channels are equal (a gray map saved as RGB): a colour-mapped visualisation (e.g.
 * MiDaS's "inferno" output) cannot be turned back into depth, and using its luminance would silently condition on
 * the wrong depth, so it is refused.
 */
export async function readDepthMap(file: string): Promise<DepthMap> {
  let data: Float32Array;
  let width: number;
  let height: number;
  try {
    const img = sharp(file, { limitInputPixels: MAX_DEPTH_PIXELS }).autoOrient();
    const meta = await img.metadata();
    const wide = meta.depth === 'ushort';
    const colour = (meta.channels ?? 1) >= 3;
    const space = wide ? (colour ? 'rgb16' : 'grey16') : colour ? 'srgb' : 'b-w';
    const { data: buf, info } = await img.pipelineColourspace(space).toColourspace(space).raw({ depth: wide ? 'ushort' : 'uchar' }).toBuffer({ resolveWithObject: true });
    const px = wide ? new Uint16Array(buf.buffer, buf.byteOffset, buf.byteLength / 2) : new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
    ({ width, height } = info);
    const ch = info.channels;
    data = new Float32Array(width * height);
    for (let i = 0; i < data.length; i++) {
      const v = px[i * ch];
      if (colour && (px[i * ch + 1] !== v || px[i * ch + 2] !== v)) {
        throw new SdtuneError('format', `depth map ${file} is a colour image (pixel ${i % width},${Math.floor(i / width)} has RGB ${px[i * ch]},${px[i * ch + 1]},${px[i * ch + 2]}); pass a grayscale depth map (near = bright, e.g. MiDaS's 16-bit PNG), not a colour-mapped one`);
      }
      data[i] = v;
    }
  } catch (e) {
    if (e instanceof SdtuneError) throw e;
    throw new SdtuneError('file', `cannot read depth map ${file}: ${(e as Error).message}`);
  }
  return { data, width, height };
}

const A = -0.75; // torch's bicubic coefficient
const f = Math.fround;
// torch's cubic_convolution1 / cubic_convolution2 (|x| <= 1 and 1 < |x| < 2), in float32
const cc1 = (x: number) => f(f(f(f(f(A + 2) * x) - f(A + 3)) * x) * x) + 1;
const cc2 = (x: number) => f(f(f(f(f(f(A * x) - f(5 * A)) * x) + f(8 * A)) * x) - f(4 * A));

/** Source taps (clamped indices) and float32 weights of each output index along one axis, as torch computes them. */
function cubicTaps(inSize: number, outSize: number): { idx: Int32Array; w: Float32Array } {
  const scale = f(inSize / outSize);
  const idx = new Int32Array(outSize * 4);
  const w = new Float32Array(outSize * 4);
  for (let o = 0; o < outSize; o++) {
    const real = f(f(scale * f(o + 0.5)) - 0.5); // area_pixel_compute_source_index(cubic=true): not clamped at 0
    const i0 = Math.min(Math.floor(real), inSize - 1);
    const t = Math.min(Math.max(f(real - i0), 0), 1);
    const ws = [cc2(f(t + 1)), cc1(t), cc1(f(1 - t)), cc2(f(f(1 - t) + 1))];
    for (let j = 0; j < 4; j++) {
      idx[o * 4 + j] = Math.max(Math.min(i0 - 1 + j, inSize - 1), 0);
      w[o * 4 + j] = ws[j];
    }
  }
  return { idx, w };
}

/**
 * torch.nn.functional.interpolate(mode='bicubic', align_corners=False) of one [h, w] plane to [outH, outW]: per
 * output pixel, the 4 taps along x of each of 4 rows, then those 4 sums weighted along y (torch's loop order).
 */
export function resizeBicubicTorch(src: DepthMap, outW: number, outH: number): DepthMap {
  const xs = cubicTaps(src.width, outW);
  const ys = cubicTaps(src.height, outH);
  const out = new Float32Array(outW * outH);
  for (let oy = 0; oy < outH; oy++) {
    for (let ox = 0; ox < outW; ox++) {
      let acc = 0;
      for (let j = 0; j < 4; j++) {
        const row = ys.idx[oy * 4 + j] * src.width;
        let t = f(src.data[row + xs.idx[ox * 4]] * xs.w[ox * 4]);
        for (let k = 1; k < 4; k++) t = f(t + f(src.data[row + xs.idx[ox * 4 + k]] * xs.w[ox * 4 + k]));
        acc = j === 0 ? f(t * ys.w[oy * 4]) : f(acc + f(t * ys.w[oy * 4 + j]));
      }
      out[oy * outW + ox] = acc;
    }
  }
  return { data: out, width: outW, height: outH };
}

/**
 * The depth channel of the UNet input at latent size [latentH, latentW]: bicubic resize, then 2·(d − min)/(max − min) − 1
 * (exactly [-1, 1]). `invert` flips near and far first (for maps where near is dark). A flat map (max = min) has no
 * depth to condition on and is refused (diffusers would divide by zero and sample from NaNs).
 */
export function depthCondition(map: DepthMap, latentW: number, latentH: number, opts: { invert?: boolean; source?: string } = {}): Float32Array {
  const what = opts.source ? `depth map ${opts.source}` : 'the depth map';
  if (!(map.width > 0 && map.height > 0) || map.data.length !== map.width * map.height)
    throw usageError(`${what} has ${map.data.length} values for ${map.width}x${map.height}`);
  const src = opts.invert ? { ...map, data: map.data.map((v) => -v) } : map;
  const d = resizeBicubicTorch(src, latentW, latentH).data;
  let min = Infinity;
  let max = -Infinity;
  for (const v of d) {
    if (!Number.isFinite(v)) throw usageError(`${what} holds ${v} values`);
    if (v < min) min = v;
    if (v > max) max = v;
  }
  if (!(max > min)) throw usageError(`${what} is flat (every value ${min} at ${latentW}x${latentH}): there is no depth to condition on`);
  const range = f(max - min);
  return d.map((v) => f(f(f(2 * f(v - min)) / range) - 1));
}

/** A note when the depth map's aspect ratio differs from the image's by more than 1% (it is stretched to fit, as diffusers does). */
export function depthAspectNote(map: DepthMap, width: number, height: number, source: string): string | undefined {
  const r = map.width / map.height / (width / height);
  if (Math.abs(r - 1) <= 0.01) return undefined;
  return `depth map ${source} is ${map.width}x${map.height} but the image is ${width}x${height}: it is stretched to the image's aspect ratio`;
}
