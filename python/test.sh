#!/usr/bin/env bash
# Build the Python package (abi3 wheel) into a fresh virtual environment and run its tests.
# `.ci/run` runs this after `cargo test --release`; set MARLIN_PY_VENV to reuse a venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${MARLIN_PY_VENV:-$(mktemp -d)/venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check maturin numpy pytest "ray[data]"
rm -rf "$venv/wheels"
"$venv/bin/maturin" build --release --quiet -m "$here/Cargo.toml" -o "$venv/wheels"
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$venv"/wheels/marlin_rs-*.whl
# From outside the source tree, so the installed package (with its compiled module) is tested.
cd "$venv" && "$venv/bin/python" -m pytest -q -rs "$here/tests"
