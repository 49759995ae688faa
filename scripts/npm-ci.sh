#!/usr/bin/env bash
# Installs the npm packages of the project folder DIR exactly as its package-lock.json says
# (npm ci), unless its node_modules already holds that lock's packages. All output on stderr.
set -euo pipefail
exec 1>&2
dir="${1:?usage: scripts/npm-ci.sh DIR}"
cd "$dir"
command -v npm >/dev/null 2>&1 || { echo "npm-ci: npm is missing: run scripts/setup.sh" >&2; exit 1; }
lock="$(sha256sum package-lock.json | cut -d' ' -f1)"
stamp=node_modules/.enspeed-lock
if [ "$(cat "$stamp" 2>/dev/null)" != "$lock" ]; then
    echo "npm-ci: installing the packages of $dir" >&2
    npm ci --no-audit --no-fund --loglevel=error
    echo "$lock" > "$stamp"
fi
