/**
 * CLIP text encoder (transformers CLIPTextModel) as a pure function over its params tree.
 * Pre-LN transformer with a causal mask; quick_gelu (SD v1) or gelu (SD 2) MLP.
 */
import * as tf from '@tensorflow/tfjs';
import type { ClipTextConfig } from './configs.js';
import { type Forward, activation, attention, layerNorm, linear } from './layers.js';
import { type ParamTree, leaf, sub } from './params.js';

/** Every parameter key the model reads, with its torch shape (for strict loading and random init). */
export function clipTextParamShapes(cfg: ClipTextConfig): Map<string, number[]> {
  const m = new Map<string, number[]>();
  const h = cfg.hidden_size;
  const i = cfg.intermediate_size;
  m.set('text_model.embeddings.token_embedding.weight', [cfg.vocab_size, h]);
  m.set('text_model.embeddings.position_embedding.weight', [cfg.max_position_embeddings, h]);
  for (let l = 0; l < cfg.num_hidden_layers; l++) {
    const p = `text_model.encoder.layers.${l}`;
    for (const proj of ['q_proj', 'k_proj', 'v_proj', 'out_proj']) {
      m.set(`${p}.self_attn.${proj}.weight`, [h, h]);
      m.set(`${p}.self_attn.${proj}.bias`, [h]);
    }
    for (const ln of ['layer_norm1', 'layer_norm2']) {
      m.set(`${p}.${ln}.weight`, [h]);
      m.set(`${p}.${ln}.bias`, [h]);
    }
    m.set(`${p}.mlp.fc1.weight`, [i, h]);
    m.set(`${p}.mlp.fc1.bias`, [i]);
    m.set(`${p}.mlp.fc2.weight`, [h, i]);
    m.set(`${p}.mlp.fc2.bias`, [h]);
  }
  m.set('text_model.final_layer_norm.weight', [h]);
  m.set('text_model.final_layer_norm.bias', [h]);
  return m;
}

export interface ClipTextOptions extends Pick<Forward, 'training' | 'rng' | 'loraDropout'> {
  // From Forward: `training` + `rng` + `loraDropout` = kohya network_dropout on the text encoder's LoRA modules
  /** A1111 "CLIP skip": 1 = last layer (default), 2 = penultimate layer, ... (always through final_layer_norm) */
  clipSkip?: number;
  /**
   * Token embeddings to use instead of the table lookup ([B,L,hidden]); textual inversion and prompt weighting
   * feed these.
   */
  inputEmbeds?: tf.Tensor3D;
}

export interface ClipTextOutput {
  /** final_layer_norm(hidden state `clipSkip` from the end): what the UNet is conditioned on, [B,L,hidden] */
  hidden: tf.Tensor3D;
  /** the same hidden state before final_layer_norm */
  hiddenRaw: tf.Tensor3D;
  /** last_hidden_state at the first EOS token, [B,hidden] (transformers' pooler_output) */
  pooled: tf.Tensor2D;
}

/** Look up token embeddings [B,L,hidden] (the input of the transformer before positions are added). */
export function clipTokenEmbeddings(params: ParamTree, inputIds: tf.Tensor2D): tf.Tensor3D {
  return tf.tidy(() => tf.gather(leaf(sub(params, 'text_model', 'embeddings', 'token_embedding'), 'weight'), inputIds.toInt()) as tf.Tensor3D);
}

/** CLIPTextModel forward. inputIds: int32 [B, L] with L <= max_position_embeddings. */
export function clipText(params: ParamTree, cfg: ClipTextConfig, inputIds: tf.Tensor2D, opts: ClipTextOptions = {}): ClipTextOutput {
  const skip = opts.clipSkip ?? 1;
  const fw: Forward = { training: opts.training, rng: opts.rng, loraDropout: opts.loraDropout };
  if (!Number.isInteger(skip) || skip < 1 || skip > cfg.num_hidden_layers) {
    throw new Error(`clip skip must be an integer in 1..${cfg.num_hidden_layers}, got ${skip}`);
  }
  return tf.tidy(() => {
    const tm = sub(params, 'text_model');
    const [b, len] = inputIds.shape;
    const act = activation(cfg.hidden_act);
    // 1. token + position embeddings
    const tok = opts.inputEmbeds ?? clipTokenEmbeddings(params, inputIds);
    const pos = leaf(sub(tm, 'embeddings', 'position_embedding'), 'weight').slice([0, 0], [len, -1]);
    let x = tf.add(tok, pos) as tf.Tensor3D;
    // 2. causal mask: token i attends to tokens <= i
    const mask = tf.tidy(() => {
      const r = tf.range(0, len).reshape([len, 1]);
      const c = tf.range(0, len).reshape([1, len]);
      return tf.where(tf.greater(c, r), tf.fill([len, len], -1e9), tf.zeros([len, len])) as tf.Tensor2D;
    });
    // 3. encoder layers; hidden state k from the end is kept for clip skip
    let skipped: tf.Tensor3D | undefined;
    const layers = sub(tm, 'encoder', 'layers');
    for (let l = 0; l < cfg.num_hidden_layers; l++) {
      const prev = x;
      x = tf.tidy(() => {
        const p = sub(layers, l);
        const sa = sub(p, 'self_attn');
        const hN = layerNorm(sub(p, 'layer_norm1'), prev, cfg.layer_norm_eps) as tf.Tensor3D;
        const q = linear(sub(sa, 'q_proj'), hN, fw) as tf.Tensor3D;
        const k = linear(sub(sa, 'k_proj'), hN, fw) as tf.Tensor3D;
        const v = linear(sub(sa, 'v_proj'), hN, fw) as tf.Tensor3D;
        const a = linear(sub(sa, 'out_proj'), attention(q, k, v, cfg.num_attention_heads, mask), fw);
        const h1 = tf.add(prev, a);
        const m = sub(p, 'mlp');
        const f = linear(sub(m, 'fc2'), act(linear(sub(m, 'fc1'), layerNorm(sub(p, 'layer_norm2'), h1, cfg.layer_norm_eps), fw)), fw);
        return tf.add(h1, f) as tf.Tensor3D;
      });
      if (l === cfg.num_hidden_layers - skip) skipped = x;
    }
    const fln = sub(tm, 'final_layer_norm');
    const last = layerNorm(fln, x, cfg.layer_norm_eps) as tf.Tensor3D;
    const hidden = skip === 1 ? last : (layerNorm(fln, skipped!, cfg.layer_norm_eps) as tf.Tensor3D);
    // 4. pooled output: transformers takes argmax(ids) when eos_token_id == 2 (legacy configs), else the first EOS
    const ids = inputIds.toInt();
    const eosPos = firstArgMax((cfg.eos_token_id === 2 ? ids : tf.equal(ids, cfg.eos_token_id).toInt()) as tf.Tensor2D);
    const flat = last.reshape([b * len, -1]);
    const pooled = tf.gather(flat, tf.add(tf.range(0, b * len, len, 'int32'), eosPos.toInt())) as tf.Tensor2D;
    return { hidden, hiddenRaw: skipped!, pooled };
  });
}

/**
 * Index of the first maximum along axis 1, as torch.argmax. tf.argMax leaves ties to the backend (a parallel GPU
 * reduction may return any of them), and the pooled position is a tie by construction (padding repeats EOS).
 */
function firstArgMax(x: tf.Tensor2D): tf.Tensor1D {
  const len = x.shape[1];
  const isMax = tf.equal(x, tf.max(x, 1, true));
  const pos = tf.broadcastTo(tf.range(0, len, 1, 'int32').reshape([1, len]), x.shape);
  return tf.min(tf.where(isMax, pos, tf.fill(x.shape, len, 'int32')), 1) as tf.Tensor1D;
}
