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
    // No polyfill script: the console's chunk is loaded on demand by a modern browser.
    modulePreload: { polyfill: false },
    // The console chunk (noVNC and xterm.js, about 520 kB) loads only when a console opens.
    chunkSizeWarningLimit: 600,
  },
});
