#!/usr/bin/env node
// Drives Genkit's real JS client (genkit/beta/client, genkit@1.42.0) against a flow URL.
//
//   node client.mjs <scenario> <flowUrl> ['<json args>']
//
// Prints exactly ONE JSON object (one line) on stdout; diagnostics go to stderr.
// Exit code: 0 = scenario ran (the flow itself may have failed: see "error"),
//            2 = usage error, 3 = harness timeout (partial observations printed).
//
// Scenarios and args (all args optional unless noted):
//   run                   {input, headers, init}               streamFlow, read all chunks + output
//   disconnect-reconnect  {input, k=1, reconnect_delay_ms=0, reconnect_url}  read k chunks, abort, reconnect by id (at reconnect_url if given), read all
//   reconnect             {stream_id (required)}               streamFlow({url, streamId}) only
//   slow                  {input, delay_ms=100}                sleep delay_ms after each chunk read
//   runflow               {input, headers, init}               runFlow (non-streaming)
//   bench                 {count=10000, input, runs=1, warmup=true}  live chunks/s, then replay
//                         chunks/s (median over runs); input defaults to {count, delay_ms:0}
// Common: timeout_ms (default 30000), headers, chunk_times (true: per-chunk ms timestamps).
//
// Output fields: scenario, url, ok (flow output received), streamId, chunks, output,
// error (err.message, exactly as the client produced it), errorName, errorCause,
// timings {streamIdMs, firstChunkMs, lastChunkMs, totalMs} (ms since the call started),
// unreadOnError (chunks the client received but its `stream` iterator never delivered
// because the error came first; chunks + unreadOnError = everything on the wire),
// plus scenario-specific fields (live/reconnect phases, bench rates), unhandled
// (unhandled rejections seen, normally []), unhandledAborts (expected after an abort)
// and timedOut.
//
// Never hangs the caller: the client runs in a worker thread and the main thread keeps
// a watchdog. A body that ends without a terminal frame puts genkit's client into a
// busy loop that starves its own event loop (setTimeout/AbortSignal never fire there),
// so only a separate thread (or the OS) can stop it: on timeout the worker is terminated
// and the partial observations so far are printed with timedOut:true, exit code 3.
// Still wrap calls in an OS timeout (e.g. `timeout 60 node client.mjs ...`).

import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';

const SCENARIOS = ['run', 'disconnect-reconnect', 'reconnect', 'slow', 'runflow', 'bench'];

if (isMainThread) {
  mainThread();
} else {
  workerThread().catch((e) => {
    parentPort.postMessage({ type: 'fatal', error: String(e?.stack || e) });
  });
}

// ---------------------------------------------------------------- main thread

function emit(obj, code) {
  process.stdout.write(JSON.stringify(obj) + '\n', () => process.exit(code));
}

function mainThread() {
  const [scenario, url, rawArgs] = process.argv.slice(2);
  const usage = `usage: node client.mjs <${SCENARIOS.join('|')}> <flowUrl> ['<json args>']`;
  if (!SCENARIOS.includes(scenario) || !url) {
    process.stderr.write(usage + '\n');
    return emit({ scenario: scenario ?? null, url: url ?? null, ok: false, error: usage }, 2);
  }
  let args = {};
  try {
    args = rawArgs ? JSON.parse(rawArgs) : {};
    if (args === null || typeof args !== 'object' || Array.isArray(args)) throw new Error('args must be a JSON object');
  } catch (e) {
    return emit({ scenario, url, ok: false, error: 'bad json args: ' + e.message }, 2);
  }
  if (scenario === 'reconnect' && !args.stream_id) {
    return emit({ scenario, url, ok: false, error: 'reconnect needs {"stream_id": "..."}' }, 2);
  }
  const timeoutMs = args.timeout_ms ?? 30000;

  // Partial observations, rebuilt from the worker's progress events (used on timeout).
  const partial = { phases: {} };
  const phase = (name) => (partial.phases[name] ??= { streamId: undefined, chunks: [], chunkCount: 0 });
  let finished = false;

  const worker = new Worker(new URL(import.meta.url), { workerData: { scenario, url, args } });
  const timer = setTimeout(async () => {
    if (finished) return;
    finished = true;
    await worker.terminate(); // interrupts even a microtask busy loop
    const phases = partial.phases;
    const last = phases.reconnect ?? phases.main ?? phases.live ?? Object.values(phases).at(-1) ?? {};
    emit(
      {
        scenario,
        url,
        ok: false,
        timedOut: true,
        streamId: (phases.live ?? phases.main ?? last).streamId ?? null,
        chunks: last.chunks ?? [],
        output: null,
        error: `harness timeout after ${timeoutMs} ms (no terminal frame? client busy loop?)`,
        phases,
      },
      3
    );
  }, timeoutMs);

  worker.on('message', (m) => {
    if (finished) return;
    if (m.type === 'streamId') phase(m.phase).streamId = m.value;
    else if (m.type === 'chunk') {
      const p = phase(m.phase);
      p.chunkCount++;
      if (p.chunks.length < 100000) p.chunks.push(m.value);
    } else if (m.type === 'result' || m.type === 'fatal') {
      finished = true;
      clearTimeout(timer);
      const out =
        m.type === 'result' ? m.result : { scenario, url, ok: false, error: 'harness error: ' + m.error };
      // terminate first: aborted fetch bodies may keep the worker alive
      worker.terminate().finally(() => emit(out, 0));
    }
  });
  worker.on('error', (e) => {
    if (finished) return;
    finished = true;
    clearTimeout(timer);
    emit({ scenario, url, ok: false, error: 'harness worker crashed: ' + String(e?.stack || e) }, 0);
  });
  worker.on('exit', (code) => {
    if (finished) return;
    finished = true;
    clearTimeout(timer);
    emit({ scenario, url, ok: false, error: `harness worker exited early (code ${code})`, phases: partial.phases }, 0);
  });
}

// ---------------------------------------------------------------- worker thread

function errInfo(e) {
  if (e === undefined || e === null) return { error: null };
  const info = { error: typeof e?.message === 'string' ? e.message : String(e), errorName: e?.name ?? null };
  if (e?.cause) info.errorCause = String(e.cause?.code ? `${e.cause.code}: ${e.cause.message}` : e.cause);
  return info;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const round = (x) => (x == null ? null : Math.round(x * 100) / 100);

async function workerThread() {
  const { scenario, url, args } = workerData;
  // Rejections nobody awaited. An abort always produces one (the client's Channel.ready
  // rejects with AbortError once we stop iterating): those go to unhandledAborts.
  const unhandled = [];
  const unhandledAborts = [];
  process.on('unhandledRejection', (e) =>
    (e?.name === 'AbortError' ? unhandledAborts : unhandled).push(String(e?.message ?? e))
  );
  process.on('uncaughtException', (e) => unhandled.push('uncaught: ' + String(e?.message ?? e)));

  const { streamFlow, runFlow } = await import('genkit/beta/client');
  const post = (m) => parentPort.postMessage(m);
  const headers = args.headers;

  // One streamFlow call. Reads chunks via the client's `stream` async iterator (like a
  // user would), never awaits `streamId` directly (it never settles if fetch rejects).
  async function streamCall(phaseName, opts, { stopAfter = Infinity, delayMs = 0, progress = true, times = false } = {}) {
    const t0 = performance.now();
    const ac = opts.abortController;
    const r = streamFlow({
      url: opts.url ?? url,
      input: opts.input,
      init: opts.init,
      streamId: opts.streamId,
      headers,
      abortSignal: ac?.signal,
    });
    const res = { streamId: undefined, chunks: [], output: null, error: null, timings: {} };
    if (times) res.chunkTimesMs = [];
    r.streamId.then((id) => {
      res.streamId = id;
      res.timings.streamIdMs = round(performance.now() - t0);
      if (progress) post({ type: 'streamId', phase: phaseName, value: id });
    });
    let outcome = null; // settled state of r.output
    const outputSettled = r.output.then(
      (v) => (outcome = { ok: true, value: v }),
      (e) => (outcome = { ok: false, e })
    );
    const it = r.stream[Symbol.asyncIterator]();
    let streamErr = null;
    try {
      while (res.chunks.length < stopAfter) {
        const { value, done } = await it.next();
        if (done) break;
        const t = performance.now() - t0;
        if (res.chunks.length === 0) res.timings.firstChunkMs = round(t);
        res.timings.lastChunkMs = round(t);
        res.chunks.push(value);
        if (times) res.chunkTimesMs.push(round(t));
        if (progress) post({ type: 'chunk', phase: phaseName, value });
        if (delayMs > 0) await sleep(delayMs);
      }
    } catch (e) {
      streamErr = e;
      // Channel.error() makes next() throw even when chunks are still buffered, so
      // chunks that arrived with (or before) the error frame but were not yet read are
      // never delivered. Peek at the client's Channel buffer to record them.
      const buf = r.stream?.buffer;
      if (Array.isArray(buf)) res.unreadOnError = buf.filter((v) => typeof v !== 'symbol');
    }
    if (res.chunks.length >= stopAfter && ac) {
      await Promise.resolve(); // let an already-settled output record itself first
      res.aborted = outcome === null; // false if the run had already ended
      ac.abort();
    }
    await outputSettled;
    res.timings.totalMs = round(performance.now() - t0);
    if (res.streamId === undefined) res.streamId = null; // header never seen (fetch rejected)
    if (outcome.ok) {
      res.ok = true;
      res.output = outcome.value === undefined ? null : outcome.value;
      if (outcome.value === undefined) res.outputUndefined = true;
    } else {
      res.ok = false;
      Object.assign(res, errInfo(outcome.e));
      if (streamErr && streamErr !== outcome.e) res.streamError = errInfo(streamErr).error;
    }
    if (!times) delete res.chunkTimesMs;
    return res;
  }

  let result;
  const times = !!args.chunk_times;
  switch (scenario) {
    case 'run':
    case 'slow': {
      const delayMs = scenario === 'slow' ? args.delay_ms ?? 100 : 0;
      const r = await streamCall('main', { input: args.input, init: args.init }, { delayMs, times });
      result = { ...r, ...(scenario === 'slow' ? { readDelayMs: delayMs } : {}) };
      break;
    }
    case 'reconnect': {
      result = await streamCall('main', { streamId: args.stream_id }, { times });
      result.requestedStreamId = args.stream_id;
      break;
    }
    case 'disconnect-reconnect': {
      const k = args.k ?? 1;
      const live = await streamCall(
        'live',
        { input: args.input, init: args.init, abortController: new AbortController() },
        { stopAfter: k, times }
      );
      if (!live.streamId) {
        result = { ok: false, streamId: null, chunks: [], output: null, error: 'no stream id from live run', live };
        break;
      }
      if (args.reconnect_delay_ms) await sleep(args.reconnect_delay_ms);
      // reconnect_url: reconnect through another server (another replica of the same log).
      const rc = await streamCall('reconnect', { streamId: live.streamId, url: args.reconnect_url }, { times });
      result = {
        ok: rc.ok,
        streamId: live.streamId,
        reconnectStreamId: rc.streamId, // null when the server does not echo the header (express, Go)
        chunks: rc.chunks,
        output: rc.output,
        ...errInfo(rc.ok ? null : { message: rc.error, name: rc.errorName, cause: rc.errorCause }),
        timings: rc.timings,
        ...(rc.unreadOnError ? { unreadOnError: rc.unreadOnError } : {}),
        live,
        reconnect: rc,
      };
      break;
    }
    case 'runflow': {
      const t0 = performance.now();
      try {
        const out = await runFlow({ url, input: args.input, init: args.init, headers });
        result = { ok: true, streamId: null, chunks: [], output: out === undefined ? null : out, error: null };
        if (out === undefined) result.outputUndefined = true;
      } catch (e) {
        result = { ok: false, streamId: null, chunks: [], output: null, ...errInfo(e) };
      }
      result.timings = { totalMs: round(performance.now() - t0) };
      break;
    }
    case 'bench': {
      const count = args.count ?? 10000;
      const input = args.input ?? { count, delay_ms: 0 };
      const runs = [];
      // Untimed warm-up of fetch/undici (~30 ms on the first request of a process):
      // a reconnect to an unknown id, i.e. a 204 with no side effects.
      if (args.warmup !== false) {
        await streamCall('warmup', { streamId: 'bench-warmup-unknown-id' }, { progress: false });
      }
      for (let i = 0; i < (args.runs ?? 1); i++) {
        const live = await streamCall('live', { input }, { progress: false });
        const rc = live.streamId
          ? await streamCall('replay', { streamId: live.streamId }, { progress: false })
          : null;
        const rate = (r) => (r && r.timings.totalMs > 0 ? Math.round(r.chunks.length / (r.timings.totalMs / 1000)) : null);
        const same =
          rc && rc.chunks.length === live.chunks.length && rc.chunks.every((c, j) => c === live.chunks[j]);
        runs.push({
          streamId: live.streamId,
          live: {
            chunks: live.chunks.length,
            ms: live.timings.totalMs,
            firstChunkMs: live.timings.firstChunkMs ?? null,
            chunksPerSec: rate(live),
            ok: live.ok,
            output: live.output,
            error: live.error,
          },
          replay: rc && {
            chunks: rc.chunks.length,
            ms: rc.timings.totalMs,
            firstChunkMs: rc.timings.firstChunkMs ?? null,
            chunksPerSec: rate(rc),
            ok: rc.ok,
            output: rc.output,
            error: rc.error,
            sameChunksAsLive: same,
          },
        });
      }
      const median = (xs) => {
        const s = xs.filter((x) => x != null).sort((a, b) => a - b);
        return s.length ? s[Math.floor((s.length - 1) / 2)] : null;
      };
      const last = runs.at(-1);
      result = {
        ok: runs.every((r) => r.live.ok && r.replay?.ok && r.replay?.sameChunksAsLive),
        streamId: last.streamId,
        chunks: [],
        output: last.live.output,
        error: last.live.error ?? last.replay?.error ?? null,
        count,
        liveChunksPerSec: median(runs.map((r) => r.live.chunksPerSec)),
        replayChunksPerSec: median(runs.map((r) => r.replay?.chunksPerSec)),
        runs,
      };
      break;
    }
  }
  post({ type: 'result', result: { scenario, url, ...result, unhandled, unhandledAborts, timedOut: false } });
}
