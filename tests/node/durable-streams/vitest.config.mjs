import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    // Only the conformance runner; client-scenarios.mjs is a plain node script.
    include: ["conformance.test.mjs"],
    // Keep the suite's own per-test timeouts (5 s default, 30-60 s where it sets them).
    testTimeout: 5000,
    // Never re-run a failing test: conformance results must be deterministic.
    retry: 0,
  },
})
