/** `sdtune sample`: txt2img / img2img / inpaint with LoRAs, embeddings and a hypernetwork; writes PNGs with A1111 parameters. */
import type { Argv } from 'yargs';
import type { SampleOptions } from '../../infer/sample.js';
import { SAMPLER_NAMES } from '../../schedulers/names.js';
import { adapterArgs, embeddingArg, hypernetworkArg, loraArg } from '../adapter-args.js';
import { runCommand } from '../run.js';

export function registerSample(y: Argv): Argv {
  return y.command(
    'sample',
    'generate images (txt2img, img2img with --init-image, inpainting with --mask, depth-to-image with --depth-map)',
    (a) =>
      a
        .option('model', { type: 'string', demandOption: true, describe: 'diffusers folder or single-file .safetensors' })
        .option('prompt', { type: 'string', demandOption: true, describe: 'A1111 syntax: (word:1.2), [word], BREAK, [from:to:when], [a|b], AND with :weight, <lora:name:weight>, <hypernet:name:weight>' })
        .option('negative-prompt', { type: 'string', default: '' })
        .option('seed', { type: 'number', default: -1, describe: 'torch-compatible seed; image i of a batch uses seed+i; -1 = random' })
        .option('steps', { type: 'number', default: 30 })
        .option('cfg', { type: 'number', default: 7.5, describe: 'guidance scale (1 = no unconditional pass)' })
        .option('sampler', { type: 'string', describe: `${SAMPLER_NAMES.join(', ')} or A1111 names ("Euler a", "DPM++ 2M Karras"); default: the model's scheduler` })
        .option('width', { type: 'number', describe: 'multiple of 8 (default: UNet sample_size x 8)' })
        .option('height', { type: 'number', describe: 'multiple of 8 (default: UNet sample_size x 8)' })
        .option('batch-size', { type: 'number', default: 1 })
        .option('n-iter', { type: 'number', default: 1 })
        .option('clip-skip', { type: 'number', default: 1, describe: 'A1111 CLIP skip (1 = last layer)' })
        .option('init-image', { type: 'string', describe: 'img2img / inpaint source image' })
        .option('strength', { type: 'number', describe: 'img2img denoising strength 0-1 (default 0.75; inpaint 1.0)' })
        .option('mask', { type: 'string', describe: 'inpainting mask, white = repaint, same size as --init-image' })
        .option('depth-map', { type: 'string', describe: 'depth model (SD 2 depth) only: grayscale depth map, 8/16-bit PNG, near = bright (MiDaS), any size; with --init-image' })
        .option('depth-invert', { type: 'boolean', default: false, describe: 'the --depth-map has near = dark: flip it' })
        .option('lora', { type: 'string', array: true, describe: 'FILE[:WEIGHT], repeatable' })
        .option('lora-dir', { type: 'string', describe: 'folder of LoRA files for the prompt\'s <lora:NAME:WEIGHT> / <lora:NAME:TE:UNET> tags (NAME = file name stem)' })
        .option('hypernetwork-dir', { type: 'string', describe: 'folder of hypernetwork files for the prompt\'s <hypernet:NAME:WEIGHT> tags' })
        .option('embedding', { type: 'string', array: true, describe: 'FILE[:TOKEN], repeatable (token defaults to the file name)' })
        .option('hypernetwork', { type: 'string', array: true, describe: 'FILE[:STRENGTH]: an A1111 hypernetwork (.pt, read as data, or our .safetensors)' })
        .option('overwrite', { type: 'boolean', default: false, describe: 'replace an existing --out PNG' })
        .option('out', { type: 'string', default: 'outputs', describe: 'a .png file (one image) or a directory (NNNNN-SEED.png)' })
        .option('eta', { type: 'number', describe: 'DDIM eta' })
        .option('attention-chunk', { type: 'number', describe: 'max attention score elements computed at once (memory)' })
        .option('memory-check', { type: 'boolean', default: true, describe: 'refuse sizes whose estimated memory exceeds the backend (--no-memory-check to try anyway)' })
        .option('config', { type: 'string', describe: 'diffusers folder whose configs apply to a single-file model' })
        .option('tokenizer', { type: 'string', describe: 'folder with vocab.json + merges.txt (default: the model\'s tokenizer/, or the one a single file written by sdtune carries)' })
        .option('backend', { type: 'string', describe: 'tensorflow | cpu | wasm | webgpu (or SDTUNE_BACKEND)' }),
    (argv) =>
      runCommand(async () => {
        // the library is loaded on use: --help stays fast
        const [{ selectBackend }, { sampleToFiles }] = await Promise.all([import('../../runtime/backend.js'), import('../../infer/sample.js')]);
        const b = await selectBackend(argv.backend);
        process.stderr.write(b.message + '\n');
        const opts: SampleOptions = {
          model: argv.model,
          prompt: argv.prompt,
          negativePrompt: argv['negative-prompt'],
          seed: argv.seed,
          steps: argv.steps,
          cfg: argv.cfg,
          sampler: argv.sampler,
          width: argv.width,
          height: argv.height,
          batchSize: argv['batch-size'],
          nIter: argv['n-iter'],
          clipSkip: argv['clip-skip'],
          initImage: argv['init-image'],
          strength: argv.strength,
          mask: argv.mask,
          depthMap: argv['depth-map'],
          depthInvert: argv['depth-invert'],
          lora: adapterArgs(argv.lora, loraArg),
          loraDir: argv['lora-dir'],
          hypernetworkDir: argv['hypernetwork-dir'],
          embedding: adapterArgs(argv.embedding, embeddingArg),
          hypernetwork: adapterArgs(argv.hypernetwork, hypernetworkArg),
          out: argv.out,
          overwrite: argv.overwrite,
          eta: argv.eta,
          attentionChunk: argv['attention-chunk'],
          memoryCheck: argv['memory-check'],
          load: { configDir: argv.config, tokenizerDir: argv.tokenizer },
        };
        const r = await sampleToFiles(opts);
        for (const f of r.files) process.stdout.write(`${f}\n`);
      }),
  );
}
