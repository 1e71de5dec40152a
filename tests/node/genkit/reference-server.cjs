#!/usr/bin/env node
// Reference ("golden") Genkit flow server: @genkit-ai/express@1.42.0 with
// InMemoryStreamManager, for comparing streamkeep against Genkit's own server.
//
//   node reference-server.cjs [port] [--ttl-seconds N]
//
// Listens on 127.0.0.1:<port> (0 or omitted = ephemeral, or $PORT) and prints one
// JSON line on stdout when ready: {"ready":true,"port":N,"url":"http://127.0.0.1:N"}.
// Genkit's own logs go to stderr. Stop it with SIGTERM/SIGINT.
//
// Flows (POST http://127.0.0.1:<port>/<name>, body {"data": <input>}):
//   countdown    {count N, delay_ms D, yield_each?}: streams N, N-1, ..., 1 (D ms before each
//                chunk after the first), returns "countdown from N done". With D=0 the
//                chunks are one synchronous burst; yield_each:true awaits setImmediate
//                before each chunk (a producer that yields to the event loop).
//   fail_midway  {count N, delay_ms D, plain_error?}: streams the first floor(N/2)
//                chunks of the countdown, then throws
//                GenkitError{status:"INTERNAL", message:"fail_midway: failed after K of N chunks"}.
//                With plain_error:true it throws a plain Error instead, which express
//                redacts to {"status":"INTERNAL","message":"Internal Error"}.
//
// No model plugins: needs no network and no API keys.
//
// Both genkit/beta and @genkit-ai/express MUST be loaded with CommonJS require:
// mixing an ESM import of genkit/beta with the plugin's CJS copy breaks
// `instanceof StreamNotFoundError` and an unknown-id reconnect crashes the server
// instead of answering 204 (dual-package hazard).
'use strict';

const path = require('node:path');
const express = require('express');
const { genkit, z, GenkitError, InMemoryStreamManager } = require('genkit/beta');
const { expressHandler } = require('@genkit-ai/express');
// Same middleware as startFlowServer (body-parser json + cors), resolved from the
// plugin's own dependency tree so the bytes match what startFlowServer sends.
// (startFlowServer itself cannot bind to 127.0.0.1 only, so we mount by hand.)
const pluginDir = path.dirname(require.resolve('@genkit-ai/express'));
const bodyParser = require(require.resolve('body-parser', { paths: [pluginDir] }));
const cors = require(require.resolve('cors', { paths: [pluginDir] }));

function parseArgs(argv) {
  const opts = { port: process.env.PORT ? Number(process.env.PORT) : 0, ttlSeconds: 300 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--ttl-seconds') opts.ttlSeconds = Number(argv[++i]);
    else if (/^\d+$/.test(a)) opts.port = Number(a);
    else {
      process.stderr.write(`usage: node reference-server.cjs [port] [--ttl-seconds N]\n`);
      process.exit(2);
    }
  }
  return opts;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const CountdownInput = z.object({
  count: z.number().int().min(0).default(3),
  delay_ms: z.number().min(0).default(0),
  plain_error: z.boolean().optional(),
  yield_each: z.boolean().optional(),
});

// Streams count, count-1, ... for `howMany` chunks; delay D before every chunk but
// the first (so N chunks with delay D take (N-1)*D ms). delay 0 = no await at all
// (one synchronous burst) unless yield_each:true (await setImmediate before each chunk).
async function countdownChunks(input, sendChunk, howMany) {
  for (let i = 0; i < howMany; i++) {
    if (i > 0 && input.delay_ms > 0) await sleep(input.delay_ms);
    else if (input.yield_each) await new Promise((r) => setImmediate(r));
    sendChunk(input.count - i);
  }
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  const ai = genkit({}); // no plugins, no model: no network, no API keys

  const countdown = ai.defineFlow(
    { name: 'countdown', inputSchema: CountdownInput, streamSchema: z.number(), outputSchema: z.string() },
    async (input, { sendChunk }) => {
      await countdownChunks(input, sendChunk, input.count);
      return `countdown from ${input.count} done`;
    }
  );

  const failMidway = ai.defineFlow(
    { name: 'fail_midway', inputSchema: CountdownInput, streamSchema: z.number(), outputSchema: z.string() },
    async (input, { sendChunk }) => {
      const k = Math.floor(input.count / 2);
      await countdownChunks(input, sendChunk, k);
      if (input.delay_ms > 0) await sleep(input.delay_ms);
      const message = `fail_midway: failed after ${k} of ${input.count} chunks`;
      if (input.plain_error) throw new Error(message);
      throw new GenkitError({ status: 'INTERNAL', message });
    }
  );

  const streamManager = new InMemoryStreamManager({ ttlSeconds: opts.ttlSeconds });
  const app = express();
  app.use(bodyParser.json());
  app.use(cors());
  for (const flow of [countdown, failMidway]) {
    app.post(`/${flow.__action.name}`, expressHandler(flow, { streamManager }));
  }

  const server = app.listen(opts.port, '127.0.0.1', () => {
    const { port } = server.address();
    process.stdout.write(JSON.stringify({ ready: true, port, url: `http://127.0.0.1:${port}` }) + '\n');
  });
  server.on('error', (e) => {
    process.stderr.write(`reference-server: ${e.stack || e}\n`);
    process.exit(1);
  });
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections?.();
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
