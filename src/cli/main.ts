/** The sdtune command line: declares commands; each command turns flags into typed options and calls the library. */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { registerConvert } from './commands/convert.js';
import { registerEval } from './commands/eval.js';
import { registerInspect } from './commands/inspect.js';
import { registerSample } from './commands/sample.js';
import { registerToyWorld } from './commands/toy-world.js';
import { registerTrain, trainCommands } from './commands/train.js';

const COMMANDS = ['inspect', 'convert', 'sample', ...trainCommands(), 'toy-world', 'eval'];

let cli = yargs(hideBin(process.argv))
  .scriptName('sdtune')
  .usage('$0 <command> [options]')
  .strict()
  .demandCommand(1, 'name a command (see --help)')
  .recommendCommands()
  .help()
  .alias('h', 'help')
  .wrap(Math.min(120, process.stdout.columns || 100))
  .fail((msg, err, y) => {
    if (err) throw err;
    const cmd = process.argv.slice(2).find((a) => !a.startsWith('-'));
    const help = cmd && COMMANDS.includes(cmd) ? `sdtune ${cmd} --help` : 'sdtune --help';
    process.stderr.write(`error: ${msg} (see "${help}")\n`);
    process.exit(2);
  });
cli = registerInspect(cli);
cli = registerConvert(cli);
cli = registerSample(cli);
cli = registerTrain(cli);
cli = registerToyWorld(cli);
cli = registerEval(cli);
await cli.parseAsync();
