#!/usr/bin/env node
// Summarises a vitest JSON report of the conformance run.
//
//   node summarize.mjs out/conformance.json [--known-failures FILE] [--expect-run N]
//
// Prints a JSON line {"passed","failed","skipped","total","failedTests":[...],...} and then a
// plain closing line "conformance: N passed, N failed, N skipped".
// Test names are "Describe > Sub-describe > test title" (the same as the JUnit <testcase name>).
// Exit status: 0 when nothing failed, or when every failure is listed in --known-failures
// (one test name per line, '#' comments allowed); 1 otherwise, and also when the number of
// tests that ran differs from --expect-run (default 332, the count for suite 0.3.6).
import { readFileSync } from "node:fs"

const args = process.argv.slice(2)
let report
let knownFile
let expectRun = 332
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--known-failures") knownFile = args[++i]
  else if (args[i] === "--expect-run") expectRun = Number(args[++i])
  else report = args[i]
}
if (!report) {
  console.error("usage: node summarize.mjs REPORT.json [--known-failures FILE] [--expect-run N]")
  process.exit(2)
}

let data
try {
  data = JSON.parse(readFileSync(report, "utf8"))
} catch (err) {
  console.error(`cannot read ${report}: ${err.message}`)
  console.log("conformance: 0 passed, 1 failed")
  process.exit(1)
}

const tests = data.testResults.flatMap((file) =>
  file.assertionResults.map((t) => ({
    name: [...t.ancestorTitles, t.title].join(" > "),
    status: t.status,
    ms: Math.round(t.duration ?? 0),
    message: (t.failureMessages ?? [])[0]?.split("\n")[0],
  }))
)
// A file that failed to load (e.g. STREAM_URL unset) has no assertions but a message.
const loadErrors = data.testResults.filter((f) => f.status === "failed" && f.assertionResults.length === 0)

const failed = tests.filter((t) => t.status === "failed")
const passed = tests.filter((t) => t.status === "passed").length
const skipped = tests.filter((t) => t.status !== "passed" && t.status !== "failed").length
const known = knownFile
  ? new Set(
      readFileSync(knownFile, "utf8")
        .split("\n")
        .map((l) => l.replace(/#.*/, "").trim())
        .filter(Boolean)
    )
  : new Set()
const unexpected = failed.filter((t) => !known.has(t.name))
const fixedKnown = [...known].filter((n) => tests.some((t) => t.name === n && t.status === "passed"))
const ran = passed + failed.length

console.log(
  JSON.stringify({
    passed,
    failed: failed.length,
    skipped,
    total: tests.length,
    ran,
    expectRun,
    unexpectedFailures: unexpected.length,
    failedTests: failed.map((t) => ({ name: t.name, ms: t.ms, message: t.message })),
    nowPassingKnownFailures: fixedKnown,
    loadErrors: loadErrors.map((f) => f.message),
  })
)
console.log(`conformance: ${passed} passed, ${failed.length + loadErrors.length} failed, ${skipped} skipped`)

const ok = unexpected.length === 0 && loadErrors.length === 0 && ran === expectRun
process.exit(ok ? 0 : 1)
