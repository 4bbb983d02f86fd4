// Every test runs on the pure-TS cpu backend (deterministic, available everywhere).
import * as tf from '@tensorflow/tfjs';

await tf.setBackend('cpu');
await tf.ready();
