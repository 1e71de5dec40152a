#!/usr/bin/env node
// Byte-exact TCP capture between a client and a flow server, for wire comparisons.
//
//   node capture-proxy.mjs <listenPort> <targetHost:targetPort> <outDir>
//
// Every accepted connection N is piped to the target unchanged; the bytes are saved to
// <outDir>/conn-N.req.bin (client->server) and conn-N.resp.bin (server->client, with
// chunked transfer framing intact), plus conn-N.resp.reads.json ([ms since accept,
// byte length] per TCP read, to see how frames were split/flushed). Prints one JSON line
// {"ready":true,"port":N} when listening; stop with SIGTERM/SIGINT.
// Point client.mjs at http://127.0.0.1:<listenPort>/<flow> to capture the real client.
import net from 'node:net';
import fs from 'node:fs';
import path from 'node:path';

const [listenPort, target, outDir] = process.argv.slice(2);
if (!listenPort || !target || !outDir) {
  process.stderr.write('usage: node capture-proxy.mjs <listenPort> <targetHost:targetPort> <outDir>\n');
  process.exit(2);
}
const [thost, tport] = target.split(':');
fs.mkdirSync(outDir, { recursive: true });
let n = 0;

const server = net.createServer((client) => {
  const id = ++n;
  const t0 = performance.now();
  const req = [];
  const resp = [];
  const reads = [];
  const upstream = net.connect(Number(tport), thost);
  client.on('data', (b) => {
    req.push(b);
    upstream.write(b);
  });
  upstream.on('data', (b) => {
    resp.push(b);
    reads.push([Math.round((performance.now() - t0) * 100) / 100, b.length]);
    client.write(b);
  });
  let saved = false;
  const save = () => {
    if (saved) return;
    saved = true;
    const base = path.join(outDir, `conn-${id}`);
    fs.writeFileSync(base + '.req.bin', Buffer.concat(req));
    fs.writeFileSync(base + '.resp.bin', Buffer.concat(resp));
    fs.writeFileSync(base + '.resp.reads.json', JSON.stringify(reads) + '\n');
  };
  client.on('end', () => upstream.end());
  upstream.on('end', () => client.end());
  client.on('close', () => { upstream.destroy(); save(); });
  upstream.on('close', () => { client.destroy(); save(); });
  client.on('error', () => {});
  upstream.on('error', () => {});
});
server.listen(Number(listenPort), '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ ready: true, port: server.address().port }) + '\n');
});
const stop = () => server.close(() => process.exit(0)) && setTimeout(() => process.exit(0), 500).unref();
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
