// Bundle src/main.js with @arcgis/core into dist/ and put the SDK's assets next to it (no CDN).
import { build } from "esbuild";
import { cpSync, mkdirSync, rmSync, symlinkSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist);
await build({
  entryPoints: [join(here, "src", "main.js")], bundle: true, splitting: true, format: "esm",
  outdir: dist, minify: true, target: "es2022", logLevel: "warning",
  loader: { ".wasm": "file" },
});
cpSync(join(here, "src", "index.html"), join(dist, "index.html"));
symlinkSync(join(here, "node_modules", "@arcgis", "core", "assets"), join(dist, "assets"));
