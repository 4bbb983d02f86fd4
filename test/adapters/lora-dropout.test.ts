// kohya network_dropout on the text encoder's LoRA modules (the UNet's are tested with the hypernetwork's training
// tests): dropout on each down projection's output, only while training, from the forward's generator.
import * as tf from '@tensorflow/tfjs';
import { describe, expect, it } from 'vitest';
import { injectLora, loraTargetModules } from '../../src/adapters/lora-inject.js';
import { randomParams } from '../../src/models/build.js';
import { clipText, clipTextParamShapes } from '../../src/models/clip-text.js';
import { disposeParams } from '../../src/models/params.js';
import { TorchGenerator } from '../../src/runtime/rng.js';
import { TINY_CLIP, maxAbsDiff } from '../helpers.js';

describe('LoRA dropout in the text encoder', () => {
  it('changes the output only while training, reproducibly by seed, and has gradients', () => {
    const params = randomParams(clipTextParamShapes(TINY_CLIP), 2);
    const vars = [...injectLora(params, loraTargetModules(params, 'text_encoder', 'attn+ff'), { rank: 2, alpha: 2, gen: new TorchGenerator(1) }).values()];
    vars.forEach((v, i) => v.name.includes('lora_up') && tf.tidy(() => v.assign(tf.randomNormal(v.shape, 0, 0.3, 'float32', i))));
    const ids = tf.tensor2d([[0, 5, 17, 33, 99, 99, 99, 99, 99, 99, 99, 99]], [1, 12], 'int32');
    const run = (o: Parameters<typeof clipText>[3]) => tf.tidy(() => clipText(params, TINY_CLIP, ids, o).hidden.dataSync());
    const base = run({});
    expect(maxAbsDiff(base, run({ loraDropout: 0.5, rng: new TorchGenerator(3) }))).toBe(0);
    const a = run({ loraDropout: 0.5, training: true, rng: new TorchGenerator(3) });
    expect(maxAbsDiff(base, a)).toBeGreaterThan(1e-3);
    expect(maxAbsDiff(a, run({ loraDropout: 0.5, training: true, rng: new TorchGenerator(3) }))).toBe(0);
    expect(maxAbsDiff(a, run({ loraDropout: 0.5, training: true, rng: new TorchGenerator(4) }))).toBeGreaterThan(1e-3);
    const { grads, value } = tf.variableGrads(() => tf.sum(tf.square(clipText(params, TINY_CLIP, ids, { loraDropout: 0.5, training: true, rng: new TorchGenerator(3) }).hidden)) as tf.Scalar, vars);
    const g = grads[vars.find((v) => v.name.includes('lora_down'))!.name].dataSync();
    expect(g.every(Number.isFinite) && g.some((x) => x !== 0)).toBe(true);
    tf.dispose([value, ...Object.values(grads), ids]);
    disposeParams(params);
  });
});
