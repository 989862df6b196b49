// Prints the size of the client bundled, minified and gzipped (the budget: 15 KB).
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const out = await build({
  entryPoints: [new URL("../src/index.ts", import.meta.url).pathname],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  write: false,
});
const code = out.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 }).length;
const kb = (n) => (n / 1024).toFixed(2) + " KB";
console.log(`minified: ${kb(code.length)}  minified+gzip: ${kb(gz)}  (budget 15 KB)`);
if (gz > 15 * 1024) {
  console.error("over budget");
  process.exit(1);
}
