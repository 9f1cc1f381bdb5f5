// Writes picocenter.schema.json from the config's zod schema (a test checks it is current).
import { writeFileSync } from 'node:fs';
import { configJsonSchema } from '../shared/config.js';
import { repoFile } from '../test/helpers/paths.js';

writeFileSync(repoFile('picocenter.schema.json'), `${JSON.stringify(configJsonSchema(), null, 2)}\n`);
