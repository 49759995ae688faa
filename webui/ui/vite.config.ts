// The UI is built into dist/ and embedded in the enspeed binary (webui/build.rs), which
// serves dist/assets/* as immutable and every other path as index.html.
import { defineConfig } from "vite";

export default defineConfig({
  base: "/",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    assetsDir: "assets",
    target: "es2022",
    sourcemap: false,
    // One entry chunk: nothing to preload, and no polyfill script.
    modulePreload: { polyfill: false },
  },
});
