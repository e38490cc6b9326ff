#!/usr/bin/env bash
# Build the Python package (abi3 wheel) into a fresh virtual environment and run its tests.
# `.ci/run` runs this after `cargo test --release`; set MARLIN_PY_VENV to reuse a venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${MARLIN_PY_VENV:-$(mktemp -d)/venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check maturin numpy pytest "ray[data]"
rm -rf "$venv/wheels"
# With the Vulkan device (its test runs on Mesa's lavapipe where no GPU is present) and the
# CUDA engine's code (the features `cargo test` builds, so the compiled tree is shared);
# MARLIN_PY_FEATURES picks others (e.g. "vulkan cuda").
"$venv/bin/maturin" build --release --quiet -m "$here/Cargo.toml" -o "$venv/wheels" --features "${MARLIN_PY_FEATURES:-vulkan cuda-engine}"
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$venv"/wheels/marlin_rs-*.whl
# From outside the source tree, so the installed package (with its compiled module) is tested.
cd "$venv" && "$venv/bin/python" -m pytest -q -rs "$here/tests"
