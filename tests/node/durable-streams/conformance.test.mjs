// Official Durable Streams server conformance suite (npm @durable-streams/server-conformance-tests 0.3.6)
// run against an external server. The package's own CLI finds no test file under vitest 4.1,
// so the suite is registered programmatically here.
//
//   STREAM_URL=http://127.0.0.1:PORT npx vitest run
//
// STREAM_URL            server base URL; streams live at {STREAM_URL}/v1/stream/<name> (required)
// LONG_POLL_TIMEOUT_MS  the server's long-poll timeout (default 500); only widens 5 tests' timeouts
// CONFORMANCE_SUBSCRIPTIONS=1  also run the 6 opt-in reserved-subscription (__ds) tests
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const raw = process.env.STREAM_URL ?? process.env.CONFORMANCE_TEST_URL
if (!raw) {
  throw new Error("Set STREAM_URL to the server base URL, e.g. STREAM_URL=http://127.0.0.1:4437")
}

runConformanceTests({
  baseUrl: raw.replace(/\/+$/, ""), // the suite appends "/v1/stream/..." itself
  longPollTimeoutMs: Number(process.env.LONG_POLL_TIMEOUT_MS ?? 500),
  subscriptions: process.env.CONFORMANCE_SUBSCRIPTIONS === "1",
})
