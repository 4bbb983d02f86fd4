/** `sdtune toy-world --out DIR --count N`: write images of the procedural toy world as a captioned image folder. */
import type { Argv } from 'yargs';
import type { WriteToyWorldOptions } from '../../data/toy-world.js';
import { runCommand } from '../run.js';

/** "a,b" and repeated flags -> one list. */
const list = (v: unknown): string[] | undefined =>
  v === undefined ? undefined : ([] as unknown[]).concat(v).flatMap((s) => String(s).split(',')).map((s) => s.trim()).filter(Boolean);

export function registerToyWorld(y: Argv): Argv {
  return y.command(
    'toy-world',
    'write images of the toy world (coloured shapes on white, 32x32, captioned) as a dataset folder',
    (a) =>
      a
        .option('out', { type: 'string', demandOption: true, describe: 'folder to write (NNNNN.png + NNNNN.txt + labels.jsonl)' })
        .option('count', { type: 'number', demandOption: true, describe: 'number of images' })
        .option('seed', { type: 'number', default: 0, describe: 'generator seed (the same seed gives the same images)' })
        .option('include', { type: 'string', array: true, describe: 'held-out concepts to add: purple, heart (comma-separated or repeated)' })
        .option('colours', { type: 'string', array: true, describe: 'draw only these colours (red, green, blue, yellow, purple)' })
        .option('shapes', { type: 'string', array: true, describe: 'draw only these shapes (circle, square, triangle, star, heart)' })
        .option('word', { type: 'string', describe: 'caption "a <word> ..." instead of "a <colour> <shape> ..." (e.g. sks)' })
        .option('size-word-probability', { type: 'number', default: 0.5, describe: 'probability of the size word in a caption' })
        .option('position-probability', { type: 'number', default: 0.5, describe: 'probability of the position phrase in a caption' })
        .option('overwrite', { type: 'boolean', default: false, describe: 'replace a non-empty --out folder' }),
    (argv) =>
      runCommand(async () => {
        const opts: WriteToyWorldOptions = {
          seed: argv.seed,
          include: list(argv.include),
          colours: list(argv.colours),
          shapes: list(argv.shapes),
          word: argv.word,
          sizeWordProbability: argv['size-word-probability'],
          positionPhraseProbability: argv['position-probability'],
          overwrite: argv.overwrite,
        };
        const { writeToyWorld } = await import('../../data/toy-world.js'); // loaded on use: --help stays fast
        const r = await writeToyWorld(argv.out, argv.count, opts);
        process.stdout.write(`wrote ${r.files} images to ${r.dir}\n`);
      }),
  );
}
