#!/usr/bin/env bash
# Builds the web UI (webui/ui: TypeScript bundled by Vite) into webui/ui/dist, which
# webui/build.rs embeds in the enspeed binary. Does nothing when no file under webui/ui
# changed since the last build (a hash of them is kept in dist/.inputs). Output on stderr only,
# so scripts/setup.sh keeps its stdout for the target directory.
set -euo pipefail
exec 1>&2
root="$(cd "$(dirname "$0")/.." && pwd)"
ui="$root/webui/ui"
cd "$ui"

inputs() {
    find . \( -path ./node_modules -o -path ./dist \) -prune -o -type f -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}
want="$(inputs)"
if [ -f dist/index.html ] && [ "$(cat dist/.inputs 2>/dev/null)" = "$want" ]; then
    exit 0
fi

command -v node >/dev/null 2>&1 || { echo "build-ui: node is missing: run scripts/setup.sh" >&2; exit 1; }
# Vite 8 needs Node 20.19 or newer.
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' \
    || { echo "build-ui: Node $(node --version) is too old: Vite needs 20.19 or newer" >&2; exit 1; }
"$root/scripts/npm-ci.sh" "$ui"
echo "build-ui: building the web UI into webui/ui/dist" >&2
npx --no-install tsc --noEmit -p .
npx --no-install vite build --logLevel warn
echo "$want" > dist/.inputs
