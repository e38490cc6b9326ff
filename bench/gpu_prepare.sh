#!/usr/bin/env bash
# Prepares what bench/gpu.sh needs on a GPU machine, on any Linux machine (no GPU or CUDA
# needed to build: burn loads the driver and NVRTC at run time):
#   .gpu/marlin.xz     the stripped `--features cuda` binary, xz-compressed (61 MB -> 14 MB: the
#                      working tree and .gpu travel together under the device's 64 MiB limit)
#   .gpu/suite.xz      the integration tests built with `--features cuda` (the `gpu::` parity
#                      tests against the committed peer fixtures), stripped and compressed
#   .gpu/pydeps/       marlin_pytorch and einops, unpacked from their wheels (pure Python), for
#                      a machine with torch but no package registry; bench/gpu.sh puts them on
#                      PYTHONPATH
#   .gpu/paths         the paths the test binary was built with; .gpu/samples/ the shared videos;
#   .gpu/lib/          libgloo and its libraries (the binary opens them for CPU data-parallel
#                      runs, where the build found libgloo-dev)
# .gpu/ is git-ignored: copy it beside the checkout on the GPU machine.
# A first build takes about 20 minutes on 2 cores (two link steps of burn's CUDA backend).
#
#   bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target-cuda}
mkdir -p .gpu/pydeps
cargo build --release --features cuda --bin marlin
suite=$(cargo test --release --features cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "suite" and m.get("executable"):
        print(m["executable"])')
rm -f .gpu/*.gz
for pair in "$CARGO_TARGET_DIR/release/marlin:marlin" "$suite:suite"; do
  src=${pair%%:*} name=${pair##*:}
  cp "$src" ".gpu/$name" && strip ".gpu/$name" && xz -9 -T2 -f ".gpu/$name"
done
# The paths the test binary was built with (CARGO_MANIFEST_DIR, CARGO_BIN_EXE_marlin):
# bench/gpu.sh links them to the checkout there.
echo "$PWD $(cd "$CARGO_TARGET_DIR" && pwd)/release/marlin" > .gpu/paths
# The shared sample videos (not in the repository: their license), for the suite's extract test.
samples=${MARLIN_SAMPLES:-../shared/samples}
[ -d "$samples" ] && mkdir -p .gpu/samples && cp "$samples"/*.mp4 .gpu/samples/
# Shared libraries that a GPU machine may lack: libgloo and what it links, which the binary's
# Gloo shim opens for CPU data-parallel training (where this machine has libgloo-dev);
# bench/gpu.sh puts .gpu/lib on LD_LIBRARY_PATH.
mkdir -p .gpu/lib
gloo=$(ldconfig -p | awk '$1 == "libgloo.so.0" {print $NF; exit}')
if [ -n "$gloo" ]; then
  { echo "$gloo"; ldd "$gloo" | awk '$3 ~ /^\// && $1 ~ /^lib(hiredis|ibverbs|nl-3|nl-route-3)\./ {print $3}'; } \
    | xargs -r cp -L -t .gpu/lib/
fi
wheels=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$wheels" marlin-pytorch==0.3.4 einops
for w in "$wheels"/*.whl; do
  python3 -m zipfile -e "$w" .gpu/pydeps/
done
rm -rf "$wheels"
du -sh .gpu/*.xz .gpu/pydeps .gpu
