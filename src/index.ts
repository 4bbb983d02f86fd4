/** sdtune's library surface: everything the CLI does, as typed functions. */
export * from './errors.js';
export { selectBackend, currentBackend, assertFitsBackend, fitBackend, memoryBudget, type BackendInfo, type BackendName, type MemoryBudget } from './runtime/backend.js';
export { assertDeviceHealthy, probeAdapter, type AdapterSummary } from './runtime/webgpu.js';
export { TorchGenerator, randnNHWC, batchGenerators, randomSeed } from './runtime/rng.js';
export { progress } from './runtime/progress.js';
export { measurePeak, checkpoint, trainableIn, type PeakMeasurement } from './runtime/memory.js';
export { disposeTape } from './runtime/memory.js';
export { Interrupted, checkBeforeEveryKernel } from './runtime/interrupt.js';
export { SafetensorsFile, readSafetensorsHeader, writeSafetensors } from './io/safetensors.js';
export { openCheckpoint } from './io/checkpoint.js';
export { TorchFile, openTensorFile, isPickleFile, readHypernetworkPt, unpickle, isTensor, isTuple, toPlain, type TensorFile, type HypernetworkPt, type PyValue, type PyTensor, type PyDict, type PyStorage, type PyObject, type TorchOpenOptions } from './io/pickle.js';
export { convertCheckpoint, convertPickleTensors, saveModel, type ConvertResult, type SaveModelOptions, type SavePrecision } from './io/convert.js';
export { loadModel, disposeModel, inspectModel, type LoadedModel, type ModelReport, type OpenModelOptions } from './io/model.js';
export { formatInfotext, parseInfotext, readPngText, writePng, readImageRgb } from './io/png.js';
export { TensorBoardWriter, readEventFile } from './io/tensorboard.js';
export { clipText, clipTextParamShapes } from './models/clip-text.js';
export { unet, unetParamShapes, CHECKPOINT_DEFAULT, type UNetOptions, type CheckpointSite } from './models/unet.js';
export { vaeEncode, vaeDecode, vaeParamShapes } from './models/vae.js';
export { clipTextConfig, unetConfig, vaeConfig, type ClipTextConfig, type UNetConfig, type VaeConfig } from './models/configs.js';
export { setAttentionChunkElements, dropout, type Forward, type ContextAdapter, type AttentionSite } from './models/layers.js';
export { flattenParams, unflattenParams, disposeParams, countParams, type ParamTree } from './models/params.js';
export { randomParams, buildParams } from './models/build.js';
export { ClipTokenizer } from './tokenizer/clip.js';
export { parsePromptAttention, chunkPrompt } from './tokenizer/prompt.js';
export {
  parseExtraNetworks, loraFromTag, hypernetFromTag, splitAnd, promptSchedule, scheduleIndexAt,
  type ExtraNetworkTag, type LoraTag, type ScheduledText, type ScheduleOptions,
} from './tokenizer/prompt-schedule.js';
export * from './schedulers/index.js';
export { readLora, mergeLora, writeLoraKohya, writeLoraPeft, type LoraFile, type LoraModule } from './adapters/lora.js';
export { injectLora, extractLora, removeLora, loraTargetModules, type LoraRanks, type LoraTargets } from './adapters/lora-inject.js';
export { readEmbedding, applyEmbeddings, describeEmbeddingUse, embeddingFileStem, writeEmbeddingA1111, writeEmbeddingDiffusers } from './adapters/embeddings.js';
export {
  readHypernetwork, loadHypernetwork, createHypernetwork, disposeHypernetwork, hypernetworkAdapter, hypernetworkModule, hypernetworkEntries,
  hypernetworkData, hypernetworkTensors, hypernetworkName, resolveHypernetworkMeta, readHypernetworkSafetensors, writeHypernetworkSafetensors,
  writeHypernetworkPt, hypernetworkPickleObject, hypernetworkDataFromObject, HYPERNETWORK_ACTIVATIONS, type UnpickledTensor,
  type Hypernetwork, type HypernetworkData, type HypernetworkMeta, type HypernetworkUse, type HypernetworkEntry, type CreateHypernetworkOptions,
} from './adapters/hypernetwork.js';
export { torchSaveBytes, pickleForTorch, pyFloat, pyTuple, PyFloat, PyTuple, PyOrderedDict, type PyValue as PyWriteValue, type PyTensor as PyWriteTensor } from './io/pickle-write.js';
export { generate, resolveGenerateOptions, toUint8, DEFAULT_CFG, DEFAULT_STEPS, type GenerateOptions, type GenerateResult, type RgbImage } from './infer/pipeline.js';
export { readDepthMap, depthCondition, resizeBicubicTorch, depthAspectNote, MAX_DEPTH_PIXELS, type DepthMap } from './infer/depth.js';
export { estimateSampling, assertSamplingFits, assertTrainingFits, trainingFloorBytes, MAX_IMAGE_SIDE, type MemoryEstimate, type SamplingShape } from './infer/budget.js';
export { sampleToFiles, type SampleOptions, type SampleLora, type SampleEmbedding, type SampleHypernetwork } from './infer/sample.js';
export { PromptConditioning, encodeBatch, emphasizeBatch, type ConditioningOptions, type StepContext } from './infer/prompt-schedule.js';
export { resolvePromptNetworks, type PromptNetworks, type PromptNetworkDirs } from './infer/prompt-networks.js';
export { resolveConfig, loadConfigFile, dumpConfig, type TrainConfig, type Method, type MethodSections, type ResolveOptions } from './train/config.js';
export { withModelDefaults, resolutionWarning, type ModelResolvedConfig } from './train/config.js';
export { train, type TrainOptions, type TrainResult } from './train/loop.js';
export { registerMethod, unregisterMethod, getMethod, methodNames, type MethodEntry, type MethodFlag } from './train/registry.js';
export { str, bool, int, num, oneOf, strs, size, orNull, expected } from './train/schema.js';
export type { Recipe, RecipeCheckpoint, ExportContext, InferenceUse } from './train/recipe.js';
export { diffusionLoss, diffusionLossPerItem } from './train/loss.js';
export { vaeLoss, measureScalingFactor, type ScalingSample } from './train/recipes/vae.js';
export { createDreamboothRecipe, createDreamboothFromConfig, pairedPriorLoss, weightedPriorLoss, priorLossTerms, type DreamboothRecipeOptions, type PriorOptions } from './train/recipes/dreambooth.js';
export { prepareClassImages, classItems, listImages, missingIndices, balanceRegItems, type ClassImageOptions, type ClassImageReport } from './data/class-images.js';
export { loaderOptions, latentCacheFor, latentEncoder } from './train/data-options.js';
export type { MethodContext } from './train/registry.js';
export { createEma, emaStep, emaDecay, emaStateToHost, emaStateFromHost, disposeEma, EMA_DEFAULTS, type EmaOptions, type EmaState, type EmaHostState } from './train/ema.js';
export {
  toyWorldStream, toyWorldImages, writeToyWorld, renderToyImage, shapeCoverage, toyPalette, toyCaption, parseToyPrompt,
  TOY_SIZE, TOY_COLOURS, TOY_SHAPES, TOY_BASE_COLOURS, TOY_BASE_SHAPES, TOY_HELD_OUT_COLOURS, TOY_HELD_OUT_SHAPES, TOY_RGB, TOY_WORDS, TOY_RARE_WORD,
  type ToyWorldItem, type ToyWorldOptions, type WriteToyWorldOptions, type ToyLabels, type ToyColour, type ToyShape,
} from './data/toy-world.js';
export { toyVocabulary, toyTokenizerFiles, writeToyVocabulary, TOY_MAX_LENGTH } from './data/toy-vocab.js';
export { judgeColour, judgeShape, judgeToyImage, inkMask, rgbToHsv, REFERENCE_HUES, type JudgeImage, type ColourVerdict, type ShapeVerdict } from './eval/judges.js';
export { buildToyModel, makeToyModel, toyModelConfigs, modelParamCounts, TOY_SEEDS, type ToyModelOptions } from './data/toy-model.js';
export { evaluateModel, evalPrompts, assertToyModel, formatEvalTable, contactSheet, type EvaluateOptions, type EvalReport, type EvalResult, type EvalPromptRow, type EvalSample } from './eval/evaluate.js';
export { applyAdapters, type AppliedAdapters } from './infer/sample.js';
