#!/usr/bin/env node
// End-to-end scenarios with the official TypeScript client (@durable-streams/client) against a
// Durable Streams server.
//
//   node client-scenarios.mjs BASE_URL [--only name1,name2] [--timeout-ms 20000]
//
// Streams are created under {BASE_URL}/v1/stream/client-<scenario>-<unique>.
// Prints one JSON line per scenario: {"scenario","ok","ms","details"} or {...,"ok":false,"error"},
// then a closing line "client-scenarios: N passed, N failed". Exit status 1 if any scenario failed.
import {
  DurableStream,
  IdempotentProducer,
  StaleEpochError,
  stream,
} from "@durable-streams/client"

// ---------------------------------------------------------------- arguments
const args = process.argv.slice(2)
let base = process.env.STREAM_URL
let only
let timeoutMs = 20000
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--only") only = new Set(args[++i].split(","))
  else if (args[i] === "--timeout-ms") timeoutMs = Number(args[++i])
  else base = args[i]
}
if (!base) {
  console.error("usage: node client-scenarios.mjs BASE_URL [--only name,...] [--timeout-ms MS]")
  process.exit(2)
}
base = base.replace(/\/+$/, "")
const runId = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`
const streamUrl = (name) => `${base}/v1/stream/client-${name}-${runId}`

// ---------------------------------------------------------------- helpers
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const OFFSET_RE = /^\d+_\d+$/

class Check extends Error {}
function check(cond, message, extra) {
  if (!cond) throw new Check(extra === undefined ? message : `${message}: ${JSON.stringify(extra)}`)
}
function eq(actual, expected, what) {
  const a = JSON.stringify(actual)
  const e = JSON.stringify(expected)
  check(a === e, `${what}: expected ${e}, got ${a}`)
}
function withTimeout(promise, ms, what) {
  let t
  return Promise.race([
    promise,
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Check(`timeout after ${ms} ms: ${what}`)), ms)
    }),
  ]).finally(() => clearTimeout(t))
}
async function catchUpText(url, offset = "-1") {
  const res = await stream({ url, offset, live: false })
  const text = await res.text()
  return { text, offset: res.offset, upToDate: res.upToDate, streamClosed: res.streamClosed }
}
async function catchUpJson(url, offset = "-1") {
  const res = await stream({ url, offset, live: false })
  const items = await res.json()
  return { items, offset: res.offset, upToDate: res.upToDate, streamClosed: res.streamClosed }
}
async function catchUpBytes(url, offset = "-1") {
  const res = await stream({ url, offset, live: false })
  const bytes = await res.body()
  return { bytes, offset: res.offset, upToDate: res.upToDate, streamClosed: res.streamClosed }
}
function errInfo(e) {
  return { name: e?.constructor?.name, code: e?.code, status: e?.status, message: String(e?.message ?? e) }
}

// ---------------------------------------------------------------- scenarios
const scenarios = {}

scenarios["create"] = async () => {
  const url = streamUrl("create")
  const h = await DurableStream.create({ url, contentType: "text/plain", body: "hello " })
  const head = await h.head()
  check(head.exists, "HEAD after create: exists")
  eq(head.contentType, "text/plain", "HEAD content-type")
  check(OFFSET_RE.test(head.offset ?? ""), "HEAD offset format", head.offset)
  eq(head.streamClosed, false, "HEAD streamClosed")

  // Same configuration again: idempotent (server answers 200).
  await DurableStream.create({ url, contentType: "text/plain" })
  // Different configuration: conflict.
  let conflict
  try {
    await DurableStream.create({ url, contentType: "application/json" })
  } catch (e) {
    conflict = errInfo(e)
  }
  check(conflict, "create with a different content type must fail")

  // JSON stream with a TTL, empty initial body.
  const jurl = streamUrl("create-json")
  const j = await DurableStream.create({ url: jurl, contentType: "application/json", ttlSeconds: 3600 })
  const jhead = await j.head()
  eq(jhead.contentType, "application/json", "JSON HEAD content-type")
  const empty = await catchUpJson(jurl)
  eq(empty.items, [], "JSON empty read")
  eq(empty.offset, jhead.offset, "empty read offset == HEAD offset")

  const missing = await DurableStream.head({ url: streamUrl("never-created") })
  eq(missing.exists, false, "HEAD of a missing stream")
  return { tail: head.offset, conflict }
}

scenarios["append"] = async () => {
  const url = streamUrl("append")
  const h = await DurableStream.create({ url, contentType: "text/plain" })
  const offsets = [(await h.head()).offset]
  for (const part of ["a", "bb", "ccc"]) {
    await h.append(part)
    offsets.push((await h.head()).offset)
  }
  for (let i = 1; i < offsets.length; i++) check(offsets[i] > offsets[i - 1], "offsets strictly increase", offsets)

  // Overlapping appends are coalesced by the client into fewer POSTs; order must be preserved.
  const burst = Array.from({ length: 20 }, (_, i) => `<${i}>`)
  await Promise.all(burst.map((p) => h.append(p)))
  const { text } = await catchUpText(url)
  eq(text, "abbccc" + burst.join(""), "text after appends")

  // JSON: each append(x) is one message; an array passed as one value stays one message.
  const jurl = streamUrl("append-json")
  const j = await DurableStream.create({ url: jurl, contentType: "application/json" })
  const msgs = [{ n: 1 }, { n: 2, s: "two" }, [1, 2, 3], "str", 42, null]
  for (const m of msgs) await j.append(JSON.stringify(m))
  const { items } = await catchUpJson(jurl)
  eq(items, msgs, "JSON items")

  // Binary bytes round-trip exactly.
  const burl = streamUrl("append-bin")
  const b = await DurableStream.create({ url: burl, contentType: "application/octet-stream" })
  const bin = Uint8Array.from({ length: 256 }, (_, i) => i)
  await b.append(bin)
  const got = await catchUpBytes(burl)
  eq(Array.from(got.bytes), Array.from(bin), "binary bytes")
  return { offsets, jsonItems: items.length, binaryBytes: got.bytes.length }
}

scenarios["read-from-start"] = async () => {
  const url = streamUrl("read")
  const h = await DurableStream.create({ url, contentType: "text/plain", body: "line1\n" })
  await h.append("line2\n")
  await h.append("line3\n")
  const head = await h.head()
  const r = await catchUpText(url, "-1")
  eq(r.text, "line1\nline2\nline3\n", "text from -1")
  eq(r.upToDate, true, "upToDate")
  eq(r.offset, head.offset, "read offset == HEAD offset")
  // Omitting the offset means -1 as well.
  const r2 = await stream({ url, live: false })
  eq(await r2.text(), "line1\nline2\nline3\n", "text with no offset")
  return { offset: r.offset }
}

scenarios["resume"] = async () => {
  const url = streamUrl("resume")
  const h = await DurableStream.create({ url, contentType: "text/plain" })
  await h.append("one;")
  const first = await catchUpText(url)
  eq(first.text, "one;", "first read")
  const saved = first.offset // checkpoint
  await h.append("two;")
  await h.append("three;")
  // A fresh handle (as after a process restart) resumes from the checkpoint.
  const fresh = new DurableStream({ url })
  const res = await fresh.stream({ offset: saved, live: false })
  const rest = await res.text()
  eq(rest, "two;three;", "resumed text")
  const atTail = await catchUpText(url, res.offset)
  eq(atTail.text, "", "read at the tail is empty")
  eq(atTail.upToDate, true, "read at the tail is upToDate")
  eq(atTail.offset, res.offset, "offset at the tail is unchanged")
  const now = await catchUpText(url, "now")
  eq(now.text, "", "offset=now is empty")
  eq(now.offset, res.offset, "offset=now gives the tail")
  return { saved, tail: res.offset }
}

// Follow a stream live while a writer appends (with pauses longer than the server's long-poll
// timeout, so timeouts / keep-alives happen), then close it; the follower must see every message
// once, in order, then streamClosed, and end by itself.
function liveScenario(mode, contentType) {
  return async () => {
    const kind = contentType.split("/")[1]
    const url = streamUrl(`live-${mode}-${kind}`)
    const isJson = contentType === "application/json"
    const enc = (i) => (isJson ? JSON.stringify({ i }) : `m${i};`)
    const h = await DurableStream.create({ url, contentType, body: isJson ? "[]" : undefined })
    await h.append(enc(0))
    // Resume-style start: follow from the offset after message 0.
    const saved = (await catchUpBytes(url)).offset

    // Record every read request the client makes (mode, status, content-type).
    const requests = []
    const recordingFetch = async (input, init) => {
      const r = await fetch(input, init)
      const u = new URL(typeof input === "string" || input instanceof URL ? input : input.url)
      requests.push({ live: u.searchParams.get("live"), status: r.status, type: r.headers.get("content-type") })
      return r
    }
    const res = await stream({ url, offset: saved, live: mode, fetch: recordingFetch })
    const received = []
    const batches = []
    let sawClosed = false
    const onMeta = (b) => {
      batches.push({ offset: b.offset, upToDate: b.upToDate, streamClosed: b.streamClosed })
      if (b.streamClosed) sawClosed = true
    }
    if (isJson) {
      res.subscribeJson((b) => {
        received.push(...b.items.map((x) => x.i))
        onMeta(b)
      })
    } else {
      const dec = new TextDecoder()
      let buf = ""
      res.subscribeBytes((b) => {
        buf += dec.decode(b.data, { stream: true })
        received.splice(0, received.length, ...(buf.match(/m(\d+);/g) ?? []).map((s) => Number(s.slice(1, -1))))
        onMeta(b)
      })
    }

    const plan = [80, 80, 700, 50, 1200] // ms before appends 1..5; 700/1200 exceed a 500 ms long-poll
    for (let i = 0; i < plan.length; i++) {
      await sleep(plan[i])
      await h.append(enc(i + 1))
    }
    await withTimeout(
      (async () => {
        while (received.length < plan.length) await sleep(20)
      })(),
      5000,
      `follower to receive ${plan.length} live messages (got ${JSON.stringify(received)})`
    )
    const closeResult = await h.close()
    await withTimeout(res.closed, 5000, "follower session to end after close")
    eq(received, [1, 2, 3, 4, 5], "messages received live")
    // Over SSE the client ends the session on the final {"streamClosed":true} control without
    // handing subscribers an empty batch, so only the session-level flag is required.
    eq(res.streamClosed, true, "session streamClosed")
    // The client silently falls back from SSE to long-poll after repeated short SSE connections;
    // make sure the requested mode was really used.
    const liveReqs = requests.filter((r) => r.live)
    check(liveReqs.length > 0, "no live request was made", requests)
    check(liveReqs.every((r) => r.live === mode), `all live requests use ${mode}`, requests)
    if (mode === "sse")
      check(liveReqs.every((r) => r.status === 200 && r.type === "text/event-stream"), "SSE responses", requests)
    eq(res.offset, closeResult.finalOffset, "follower offset == final offset")
    for (let i = 1; i < batches.length; i++)
      check(batches[i].offset >= batches[i - 1].offset, "batch offsets never go back", batches)
    return {
      mode,
      contentType,
      batches: batches.length,
      closedSeenInBatch: sawClosed,
      requests: requests.length,
      sseConnections: liveReqs.filter((r) => r.live === "sse").length,
      longPoll204s: liveReqs.filter((r) => r.live === "long-poll" && r.status === 204).length,
      finalOffset: closeResult.finalOffset,
    }
  }
}
scenarios["live-sse-json"] = liveScenario("sse", "application/json")
scenarios["live-sse-text"] = liveScenario("sse", "text/plain")
scenarios["live-sse-binary"] = liveScenario("sse", "application/octet-stream")
scenarios["live-long-poll-text"] = liveScenario("long-poll", "text/plain")
scenarios["live-long-poll-json"] = liveScenario("long-poll", "application/json")

// Idempotent producer: pipelined batches, responses lost after the server committed them
// (the request is retried verbatim), manual replay, sequence gap, zombie fencing, auto-claim,
// and an idempotent close whose response is lost too.
scenarios["idempotent-producer"] = async () => {
  const url = streamUrl("producer")
  const h = await DurableStream.create({ url, contentType: "application/json" })
  const pid = `producer-${runId}`
  const stats = { posts: 0, dropped: 0 }
  // fetch that loses the response of the requests selected by `drop(n, headers)` once, then
  // re-sends the identical request (same Producer-Id/Epoch/Seq, same body): the server must
  // de-duplicate it.
  const lossyFetch = (drop) => async (input, init) => {
    const n = ++stats.posts
    const res = await fetch(input, init)
    if (drop(n, new Headers(init?.headers))) {
      stats.dropped++
      await res.arrayBuffer().catch(() => {})
      return fetch(input, init)
    }
    return res
  }
  const errors = []
  const p1 = new IdempotentProducer(h, pid, {
    epoch: 0,
    maxBatchBytes: 1, // one message per batch, so seqs 0..9
    maxInFlight: 5,
    lingerMs: 0,
    fetch: lossyFetch((n) => n === 2 || n === 5 || n === 9),
    onError: (e) => errors.push(errInfo(e)),
  })
  for (let i = 0; i < 10; i++) p1.append(JSON.stringify({ m: i }))
  await p1.flush()
  eq(errors, [], "producer errors")
  eq(p1.nextSeq, 10, "p1 nextSeq")
  let items = (await catchUpJson(url)).items
  eq(
    items.map((x) => x.m),
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    "each message exactly once, in order, despite retried requests"
  )

  // Manual replay of the last batch: 204 duplicate, Producer-Seq = highest accepted seq.
  const replay = await fetch(url, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      "producer-id": pid,
      "producer-epoch": "0",
      "producer-seq": "9",
    },
    body: JSON.stringify([{ m: 9 }]),
  })
  eq(replay.status, 204, "replayed batch status")
  eq(replay.headers.get("producer-seq"), "9", "replayed Producer-Seq")
  const older = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", "producer-id": pid, "producer-epoch": "0", "producer-seq": "3" },
    body: JSON.stringify([{ m: "stale-retry" }]),
  })
  eq(older.status, 204, "older duplicate status")
  eq(older.headers.get("producer-seq"), "9", "older duplicate Producer-Seq is the highest accepted")
  const gap = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", "producer-id": pid, "producer-epoch": "0", "producer-seq": "15" },
    body: JSON.stringify([{ m: "gap" }]),
  })
  eq(gap.status, 409, "sequence gap status")
  eq(gap.headers.get("producer-expected-seq"), "10", "Producer-Expected-Seq")

  // Zombie fencing: a new epoch takes over; the old producer gets 403 (StaleEpochError).
  const p2 = new IdempotentProducer(h, pid, { epoch: 1, lingerMs: 0 })
  p2.append(JSON.stringify({ m: 10 }))
  await p2.flush()
  const zombieErrors = []
  const p1b = new IdempotentProducer(h, pid, { epoch: 0, lingerMs: 0, onError: (e) => zombieErrors.push(e) })
  p1b.append(JSON.stringify({ m: "zombie" }))
  await p1b.flush().catch((e) => zombieErrors.push(e))
  check(zombieErrors.some((e) => e instanceof StaleEpochError), "stale epoch is fenced", zombieErrors.map(errInfo))
  const fencedEpoch = zombieErrors.find((e) => e instanceof StaleEpochError)?.currentEpoch
  eq(fencedEpoch, 1, "StaleEpochError.currentEpoch")

  // Auto-claim: starts at epoch 0, is fenced, bumps to current+1 and succeeds.
  const p3 = new IdempotentProducer(h, pid, { epoch: 0, autoClaim: true, lingerMs: 0, })
  p3.append(JSON.stringify({ m: 11 }))
  await p3.flush()
  eq(p3.epoch, 2, "auto-claimed epoch")

  // Close with a final message; its response is lost once and the close is re-sent verbatim.
  const p4 = new IdempotentProducer(h, pid, {
    epoch: 2,
    lingerMs: 0,
    fetch: lossyFetch((n, headers) => headers.get("stream-closed") === "true"),
  })
  // p4 continues epoch 2 after p3's seq 0 -> send seq 1 by appending first.
  p4.append(JSON.stringify({ m: "dup-of-p3-seq0" })) // seq 0 of epoch 2: a duplicate, ignored
  await p4.flush()
  const closeRes = await p4.close(JSON.stringify({ m: 12 }))
  const head = await h.head()
  eq(head.streamClosed, true, "stream closed")
  eq(head.offset, closeRes.finalOffset, "final offset")

  const final = await catchUpJson(url)
  items = final.items.map((x) => x.m)
  eq(items, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "final content")
  eq(final.streamClosed, true, "read reports streamClosed")

  // Appending after close fails; a plain close is idempotent.
  let afterClose
  try {
    await h.append(JSON.stringify({ m: "late" }))
  } catch (e) {
    afterClose = errInfo(e)
  }
  check(afterClose, "append after close must fail")
  const again = await h.close()
  eq(again.finalOffset, closeRes.finalOffset, "repeated close keeps the final offset")
  return { posts: stats.posts, droppedResponses: stats.dropped, finalOffset: closeRes.finalOffset, afterClose }
}

// ---------------------------------------------------------------- main
// The client retries connection errors forever, so fail fast if nothing listens at BASE_URL.
try {
  await fetch(`${base}/v1/stream/client-probe-${runId}`, { method: "HEAD", signal: AbortSignal.timeout(5000) })
} catch (e) {
  console.log(JSON.stringify({ scenario: "probe", ok: false, error: `server unreachable: ${errInfo(e.cause ?? e).message}` }))
  console.log("client-scenarios: 0 passed, 1 failed")
  process.exit(1)
}
let failed = 0
let passed = 0
for (const [name, fn] of Object.entries(scenarios)) {
  if (only && !only.has(name)) continue
  const t0 = performance.now()
  try {
    const details = await withTimeout(fn(), timeoutMs, name)
    passed++
    console.log(JSON.stringify({ scenario: name, ok: true, ms: Math.round(performance.now() - t0), details }))
  } catch (e) {
    failed++
    console.log(
      JSON.stringify({
        scenario: name,
        ok: false,
        ms: Math.round(performance.now() - t0),
        error: e instanceof Check ? e.message : errInfo(e),
        stack: e instanceof Check ? undefined : String(e?.stack ?? "").split("\n").slice(0, 4).join(" | "),
      })
    )
  }
}
console.log(`client-scenarios: ${passed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
