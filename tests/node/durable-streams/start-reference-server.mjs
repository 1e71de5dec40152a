#!/usr/bin/env node
// Starts the Durable Streams reference server (@durable-streams/server) on 127.0.0.1.
// Used only as a benchmark peer and to validate this harness; streamkeep does not depend on it.
//
//   node start-reference-server.mjs [PORT] [--file | --data-dir DIR] [--long-poll-ms MS] [--host HOST]
//
//   PORT             default 4437 (0 = pick a free port; the chosen URL is printed)
//   --file           file-backed mode in a fresh temporary directory (removed on exit)
//   --data-dir DIR   file-backed mode in DIR (kept on exit); omit both for in-memory mode
//   --long-poll-ms   long-poll / SSE wait timeout, default 500 (the conformance suite needs << 5000)
//
// Prints one JSON line {"ready":true,"url":...,"mode":...} on stdout once listening.
// Stops cleanly on SIGINT / SIGTERM.
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { DurableStreamTestServer } from "@durable-streams/server"

function usage(msg) {
  if (msg) console.error(`error: ${msg}`)
  console.error(
    "usage: node start-reference-server.mjs [PORT] [--file | --data-dir DIR] [--long-poll-ms MS] [--host HOST]"
  )
  process.exit(2)
}

let port = 4437
let host = "127.0.0.1"
let longPollTimeout = 500
let dataDir
let tempDir = false
const args = process.argv.slice(2)
for (let i = 0; i < args.length; i++) {
  const a = args[i]
  if (a === "--file") tempDir = true
  else if (a === "--data-dir") dataDir = args[++i] ?? usage("--data-dir needs a value")
  else if (a === "--long-poll-ms") longPollTimeout = Number(args[++i])
  else if (a === "--host") host = args[++i] ?? usage("--host needs a value")
  else if (a === "-h" || a === "--help") usage()
  else if (/^\d+$/.test(a)) port = Number(a)
  else usage(`unknown argument ${a}`)
}
if (!Number.isFinite(longPollTimeout) || longPollTimeout <= 0) usage("bad --long-poll-ms")
if (tempDir && dataDir) usage("--file and --data-dir are exclusive")
if (tempDir) dataDir = mkdtempSync(join(tmpdir(), "ds-ref-"))

const server = new DurableStreamTestServer({
  port,
  host,
  longPollTimeout,
  ...(dataDir ? { dataDir } : {}),
})
const url = await server.start()
console.log(
  JSON.stringify({ ready: true, url, mode: dataDir ? "file" : "memory", dataDir, longPollTimeout, pid: process.pid })
)

let stopping = false
async function shutdown(signal) {
  if (stopping) return
  stopping = true
  try {
    await server.stop()
  } catch (err) {
    console.error(`stop failed: ${err}`)
  }
  if (tempDir) rmSync(dataDir, { recursive: true, force: true })
  console.error(`reference server stopped (${signal})`)
  process.exit(0)
}
process.on("SIGINT", () => shutdown("SIGINT"))
process.on("SIGTERM", () => shutdown("SIGTERM"))
