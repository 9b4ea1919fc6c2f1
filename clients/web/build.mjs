// Builds the package: ESM bundles for the page API, the worker and the
// React hook, the SQLite WebAssembly next to the worker, and the types.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist");
const common = { bundle: true, format: "esm", target: "es2022", sourcemap: true, logLevel: "warning" };
await build({ ...common, entryPoints: ["src/index.ts"], outfile: "dist/index.js", platform: "browser" });
await build({ ...common, entryPoints: ["src/react.ts"], outfile: "dist/react.js", platform: "browser", external: ["react", "./index.js"] });
await build({ ...common, entryPoints: ["src/worker.ts"], outfile: "dist/worker.js", platform: "browser" });
const wasm = "node_modules/@sqlite.org/sqlite-wasm/dist/";
copyFileSync(wasm + "sqlite3.wasm", "dist/sqlite3.wasm");
// Plain per-file ESM of the sources, for the unit tests in Node.
const { readdirSync } = await import("node:fs");
const sources = readdirSync("src", { recursive: true }).filter((f) => f.endsWith(".ts")).map((f) => "src/" + f);
rmSync("build", { recursive: true, force: true });
await build({ entryPoints: sources, outdir: "build/node", format: "esm", platform: "node", target: "es2022", logLevel: "warning" });
execFileSync("npx", ["tsc", "-p", "."], { stdio: "inherit" });
console.log("built dist/");
