#!/usr/bin/env bash
# drill-installer.sh: Debian's own graphical installer (its netboot CD) in a blank VM's
# graphical console, in the test host: its first screen over RFB, keys and the pointer
# (tests/testhost/enspeed-installer.sh, run by the testhost test of that name). Not in
# ./test.sh: it keeps one of the two cores busy for about 220 s.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release --workspace --bins
image/testguest/build.sh >/dev/null
image/testhost/build.sh
cargo test --release -p enspeed-tests --test testhost -- --ignored --exact \
    debian_s_graphical_installer_shows_its_first_screen_and_takes_keys_and_the_pointer
