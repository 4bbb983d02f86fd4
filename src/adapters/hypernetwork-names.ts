/** The names an A1111 hypernetwork's meta takes (a module without tfjs: the training config reads it). */

/**
 * activation_func values sdtune runs: A1111's own table (linear, relu, leakyrelu, elu, swish = torch Hardswish, tanh,
 * sigmoid) plus the lower-cased torch.nn activation classes that keep the width and need no arguments.
 */
export const HYPERNETWORK_ACTIVATION_NAMES = [
  'linear', 'relu', 'leakyrelu', 'elu', 'celu', 'selu', 'swish', 'hardswish', 'tanh', 'sigmoid', 'gelu', 'silu', 'mish',
  'softplus', 'softsign', 'hardtanh', 'relu6', 'hardsigmoid', 'logsigmoid', 'tanhshrink', 'hardshrink', 'softshrink', 'prelu', 'rrelu',
] as const;
export type HypernetworkActivation = (typeof HYPERNETWORK_ACTIVATION_NAMES)[number];

/** weight_initialization values (A1111 HypernetworkModule). */
export const HYPERNETWORK_INITS = ['Normal', 'XavierUniform', 'XavierNormal', 'KaimingUniform', 'KaimingNormal'] as const;
