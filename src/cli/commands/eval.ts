/** `sdtune eval --model M --prompts ... | --grid "colours x shapes"`: sample, judge with the toy world's judges, report accuracy. */
import type { Argv } from 'yargs';
import type { EvaluateOptions } from '../../eval/evaluate.js';
import { adapterArgs, embeddingArg, loraArg } from '../adapter-args.js';
import { runCommand } from '../run.js';

export function registerEval(y: Argv): Argv {
  return y.command(
    'eval',
    'sample prompts with several seeds and score colour and shape with the toy world\'s judges (toy-world models only)',
    (a) =>
      a
        .option('model', { type: 'string', demandOption: true, describe: 'a toy-world model (diffusers folder or single file)' })
        .option('prompts', { type: 'string', array: true, describe: 'prompts naming a colour and/or shape; "a sks => green star" judges a new word' })
        .option('grid', { type: 'string', describe: 'prompt grid "COLOURS x SHAPES": "colours x shapes" (the base 16) or comma lists, e.g. "red,purple x heart"' })
        .option('seeds', { type: 'number', default: 4, describe: 'seeds per prompt' })
        .option('seed', { type: 'number', default: 0, describe: 'first seed (seeds seed, seed+1, ...)' })
        .option('cfg', { type: 'number', default: 3, describe: 'guidance scale' })
        .option('steps', { type: 'number', default: 20 })
        .option('sampler', { type: 'string', default: 'ddim' })
        .option('negative-prompt', { type: 'string', default: '' })
        .option('lora', { type: 'string', array: true, describe: 'FILE[:WEIGHT], repeatable' })
        .option('embedding', { type: 'string', array: true, describe: 'FILE[:TOKEN], repeatable' })
        .option('out', { type: 'string', default: 'outputs/eval', describe: 'folder for eval.json and contact-sheet.png' })
        .option('overwrite', { type: 'boolean', default: false, describe: 'replace eval.json / contact-sheet.png in --out' })
        .option('tokenizer', { type: 'string', describe: 'folder with vocab.json + merges.txt (default: the model\'s)' })
        .option('backend', { type: 'string', describe: 'tensorflow | cpu | wasm | webgpu (or SDTUNE_BACKEND)' }),
    (argv) =>
      runCommand(async () => {
        const opts: EvaluateOptions = {
          model: argv.model,
          prompts: argv.prompts,
          grid: argv.grid,
          seeds: argv.seeds,
          seed: argv.seed,
          cfg: argv.cfg,
          steps: argv.steps,
          sampler: argv.sampler,
          negativePrompt: argv['negative-prompt'],
          lora: adapterArgs(argv.lora, loraArg),
          embedding: adapterArgs(argv.embedding, embeddingArg),
          out: argv.out,
          overwrite: argv.overwrite,
          load: { tokenizerDir: argv.tokenizer },
        };
        // the library is loaded on use: --help stays fast
        const [{ selectBackend }, { evaluateModel, evalPrompts, formatEvalTable }] = await Promise.all([import('../../runtime/backend.js'), import('../../eval/evaluate.js')]);
        evalPrompts(opts.prompts, opts.grid); // bad prompts are refused before the model loads
        process.stderr.write((await selectBackend(argv.backend)).message + '\n');
        const { report } = await evaluateModel(opts);
        process.stdout.write(formatEvalTable(report) + '\n');
        if (report.files) process.stdout.write(`wrote ${report.files.json} and ${report.files.contactSheet}\n`);
      }),
  );
}
