// Runs Azurite's blob service (its main.js, the first argument) with the periodic garbage
// collection of unreferenced blob data postponed past any test session; other arguments go
// to Azurite unchanged. Usage: node azurite_no_gc.js <azurite>/dist/src/blob/main.js --silent ...
//
// Why: Azurite (3.37, in-memory or on disk) runs a mark-and-sweep 10 minutes after it
// starts and every 10 minutes after that. The sweep removes each unreferenced extent with
// its own findAndRemove, and each removal rebuilds the extents' index by sorting them all:
// quadratic in what the suite has deleted or overwritten. It runs on the server's only
// thread, so the server answers nothing until it ends: at the suite's end that was more
// than 84 s (the requests of a CI run timed out 8 times in a row), seen with an inspector's
// stack in deleteExtents -> findAndRemove -> ensureAllIndexes. The collection only frees
// memory (the tests never need it), so the tests' server does not run it.
"use strict";
const path = require("path");

const main = process.argv[2];
if (!main || !main.endsWith("main.js")) {
  console.error("usage: node azurite_no_gc.js <azurite>/dist/src/blob/main.js [azurite args]");
  process.exit(2);
}
const constants = require(path.join(path.dirname(main), "utils", "constants.js"));
if (typeof constants.DEFAULT_GC_INTERVAL_MS !== "number") {
  // A newer Azurite moved it: fail loudly rather than run with the stalls back.
  console.error(`azurite_no_gc.js: no DEFAULT_GC_INTERVAL_MS in ${main}'s utils/constants.js`);
  process.exit(2);
}
// The longest delay setTimeout honours (2^31 - 1 ms, about 24.8 days); a longer one would
// fire at once. BlobGCManager reads this default when the server is built.
constants.DEFAULT_GC_INTERVAL_MS = 2 ** 31 - 1;
// Azurite parses its options from process.argv as if it had been started directly.
process.argv.splice(1, 2, main);
require(main);
