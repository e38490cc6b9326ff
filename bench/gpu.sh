#!/usr/bin/env bash
# Everything a GPU machine is needed for, in one call, after bench/gpu_prepare.sh (its .gpu/
# beside the checkout): parity of the CUDA backend, then marlin-rs and marlin-pytorch side by
# side on the same GPU. One log: $OUT/gpu.log (or ./gpu.log).
#
#   OUT=/tmp/out bash bench/gpu.sh [SECTION...]
#
# Sections (all by default, in this order; each command has a time limit so one hang cannot
# eat the rest):
#   engine    the CUDA engine (issue 40), sized for one call of at most 8 minutes
#             (BUDGET_S=470): each kernel alone against numpy (bench/cuda_kernels.py, CuPy);
#             the engine's features against the peer's fixtures in fp32/tf32/bf16 and each
#             attention kernel against the host twin (`suite gpu::cuda::engine`); ViT-B
#             extract_features at batch 64, ours and the peer's modes in alternating rounds
#             (ROUNDS, default 2) with NVML's peak memory for both (bench/gpu_peak.py); the first
#             `marlin extract` of one 10-second video with a cold and a warm kernel cache
#             beside the peer's first extract_video; a per-step profile; ViT-L if time is left.
#             Writes $OUT/gpu-<date>-<gpu>.json (bench/gpu_results.py) for bench/results/.
#   pretrain  the training engine's step on CUDA (issue 41), sized for one call of at most 8
#             minutes (BUDGET_S=470): its parity against the peer's step and the host twin in
#             fp32 and tf32, and the bf16 steps (cuDNN's fused attention and the CUDA-core
#             kernels) against their bf16 host twins (`suite gpu::cuda::train_engine`; the
#             kernels alone are in the engine section's harness), then ViT-B pretraining steps
#             at batch 16 and 64, ours (the engine in TRAIN_PRECISIONS, default bf16 tf32 fp32)
#             and the peer's (bf16 autocast, tf32) in alternating rounds (TRAIN_ROUNDS, default
#             1) with NVML's peaks. Writes "pretrain_vitb" into $OUT/gpu-<date>-<gpu>.json.
#   finetune  ViT-B fine-tuning steps (the encoder on whole clips, a 40-label head, BCE, Adam)
#             at batch 8 and 16 (FINETUNE_BATCHES: the peer keeps every attention matrix for
#             its backward, about 3 GB a clip in fp32), ours (the engine in TRAIN_PRECISIONS)
#             and the peer's (bf16 autocast, tf32), with NVML's peaks; its parity against the host twin
#             runs in the pretrain section's test (`gpu::cuda::train_engine`). About 4 minutes.
#             Writes "finetune_vitb" into $OUT/gpu-<date>-<gpu>.json.
#   parity    `suite gpu::` (features of the tiny fixtures and of the released width against
#             the peer's fixtures and the CPU backend, keep_seq and pooled, fp32/tf32/bf16; one
#             pretraining step against the peer's), the face parser's label map on CUDA vs the
#             CPU, and the out-of-memory message at an impossible batch size (8192)
#   features  ViT-B extract_features, batch 64, burn's CUDA path (MARLIN_ENGINE=burn): ours in
#             fp32/tf32/bf16, the peer in fp32, TF32, bf16 autocast and bf16 autocast with
#             F.scaled_dot_product_attention; peak memory
#   train     the pretraining step (critic + generator), batch 16 and 64, ours and the peer's
#             in each precision; peak memory
#   e2e       `marlin extract` of E2E_VIDEOS (500) ten-second 224x224 videos (frame folders)
#             against a loop of the peer's extract_video on the same GPU, videos/s, the two
#             outputs compared; `--crop-face` on 720p videos (ours: the peer's crop_face needs
#             FaceXZoo from the network)
#   large     ViT-L extract_features, batch 64, both sides
#   profile   the engine's forward step by step (ms and TFLOP/s of each step kind), each precision
#   unfused   burn's path: parity and speed with its unfused attention instead of its flash kernel
#   step      the pretraining-step parity test alone, with whatever time is left
#   curve     the bf16 loss curve (issue 41): `marlin prepare` of the shared samples (.gpu/samples,
#             on the CPU), a dataset of 320 entries over them (bench/curve_data.py), then ViT-B
#             `marlin pretrain --step engine` for CURVE_EPOCHS (20) epochs of 10 steps at batch 16
#             (base LR 1.5e-3, 2 warm-up epochs, so that the loss moves), fp32 then bf16, same
#             seed; bench/loss_curve.py compares the two metrics.csv (each epoch's train loss
#             within 5%) and writes $OUT/curve.svg, $OUT/curve-fp32.csv, $OUT/curve-bf16.csv.
#   ddp       data-parallel pretraining at world size 1 under torchrun's variables: NCCL's id
#             exchange and all-reduce on the GPU, the weights against a plain run's (1e-5), on
#             burn's step and on the training engine's (its gradients averaged in place on the
#             device by NCCL on its own stream: one bucket, then each layer on its own with
#             --bucket-mb 0)
# burn compiles its kernels with NVRTC and autotunes them on first use: every timing below
# comes after an untimed first pass.
#
# Sizing: everything takes about 25-30 minutes on one H100/H200 (estimate). Under a 10-minute
# limit per call, run it in parts, most important first: `parity features` (about 8 min),
# then `train` (TRAIN_BATCHES="16" to halve it), then `e2e` (E2E_VIDEOS=200 to shorten it),
# `large`, `profile`. WORK (/tmp/marlin-gpu) keeps the generated videos between calls.
# BUDGET_S=N caps the whole call at N seconds (each command gets what is left, at most its own
# limit; PARITY_LIMIT caps the parity suite): the log always ends inside the call's limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
PY=${PY:-python3}
work=${WORK:-/tmp/marlin-gpu}
mkdir -p "$work"
for b in marlin suite; do
  if [ -f ".gpu/$b.xz" ]; then xz -dc ".gpu/$b.xz" > "$work/$b"; else gunzip -c ".gpu/$b.gz" > "$work/$b"; fi
  chmod +x "$work/$b"
done
BIN=$work/marlin
export PYTHONPATH=$PWD/.gpu/pydeps${PYTHONPATH:+:$PYTHONPATH}
export MARLIN_REPO_DIR=$PWD
# The test binary keeps the paths it was built with (CARGO_MANIFEST_DIR, CARGO_BIN_EXE_marlin;
# bench/gpu_prepare.sh writes them to .gpu/paths): make them point at this checkout.
if [ -f .gpu/paths ]; then
  read -r built_repo built_bin < .gpu/paths
  if [ "$built_repo" != "$PWD" ] && [ ! -e "$built_repo" ]; then
    mkdir -p "$(dirname "$built_repo")" && ln -s "$PWD" "$built_repo"
  fi
  mkdir -p "$(dirname "$built_bin")" && cp "$BIN" "$built_bin"
fi
# NVRTC (burn compiles its kernels at run time) and NCCL: the CUDA toolkit's, else the ones
# PyTorch's wheels carry.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $($PY -c 'import glob, os, nvidia; print(" ".join(sorted({os.path.dirname(f) for p in nvidia.__path__ for f in glob.glob(p + "/**/libnvrtc.so*", recursive=True) + glob.glob(p + "/**/libnccl.so*", recursive=True)})))' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
[ -d .gpu/samples ] && export MARLIN_SAMPLES=$PWD/.gpu/samples
# The engine compiles its kernels from this checkout's .cu files (a kernel fix needs no Rust
# rebuild) into a cache that lasts the machine's session.
export MARLIN_CUDA_SOURCES=$PWD/src/kernels/cuda
export MARLIN_KERNEL_CACHE=$work/kernel-cache
# Libraries the binary opens that the GPU machine may lack (Gloo, for CPU data-parallel runs).
[ -d .gpu/lib ] && export LD_LIBRARY_PATH=$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# PEER=0 leaves out marlin-pytorch's runs (they were taken in an earlier call); SUITE_SKIP names
# parity tests to leave out (`--skip` filters of the test binary, space-separated).
peer() { [ "${PEER:-1}" = 1 ]; }
sections=${*:-engine pretrain finetune parity ddp features train e2e large unfused step profile}
# BUDGET_S: seconds for the whole call; each command gets what is left of it (at most its own
# limit), and a command with under 20 s left is skipped with a line, so the log always ends.
deadline=$(( $(date +%s) + ${BUDGET_S:-86400} ))
run() {
  local limit=$1
  shift
  local left=$(( deadline - $(date +%s) ))
  if (( left < 20 )); then
    echo "(skipped, budget spent: $*)"
    return 124
  fi
  (( left < limit )) && limit=$left
  echo "\$ $*"
  local t0
  t0=$(date +%s%N)
  timeout "$limit" "$@"
  local rc=$?
  echo "(exit $rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms)"
  return $rc
}
has() { [[ " $sections " == *" $1 "* ]]; }

echo "== machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'); $(nproc) cores; $(date -u +%FT%TZ)"
echo "== marlin-rs $(git rev-parse --short HEAD 2>/dev/null); torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)')"
echo "== libraries: nvrtc $(ldconfig -p 2>/dev/null | grep -c libnvrtc) in ldconfig, LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}; ffmpeg: $(command -v ffmpeg || echo none)"

if has engine; then
  echo "== engine: each kernel alone against numpy (bench/cuda_kernels.py: CuPy, fresh random inputs)"
  run 150 "$PY" bench/cuda_kernels.py
  echo "== engine: features against the peer's fixtures in each precision; each attention kernel against the host twin"
  run 200 "$work/suite" gpu::cuda::engine --test-threads 1 --nocapture
  echo "== engine: ViT-B extract_features, batch 64, ours and the peer's in alternating rounds (clips/s; NVML peak above the idle GPU)"
  for round in $(seq "${ROUNDS:-2}"); do
    for p in bf16 tf32 fp32; do
      echo "@@ extract_vitb_b64 ours $p"
      run 90 "$PY" bench/gpu_peak.py -- "$BIN" bench --device cuda --batch-size 64 --iters 10 --precision "$p"
      if peer; then
        echo "@@ extract_vitb_b64 peer $p"
        run 120 "$PY" bench/gpu_peak.py -- "$PY" bench/peer_features.py --device cuda --batch-size 64 --iters 10 --precision "$p"
      fi
    done
    if peer; then
      echo "@@ extract_vitb_b64 peer bf16_sdpa"
      run 120 "$PY" bench/gpu_peak.py -- "$PY" bench/peer_features.py --device cuda --batch-size 64 --iters 10 --precision bf16 --sdpa
    fi
  done
  echo "== engine: the first extract of one 10-second video (300 frames, a frame folder): cold kernel cache, warm, and the peer's"
  one=$work/one10s
  [ -d "$one" ] || run 120 "$PY" bench/make_frame_videos.py "$one" --videos 1 --frames 300
  [ -f "$work/w.pt" ] || run 120 "$PY" bench/peer_extract.py --save-weights "$work/w.pt"
  rm -rf "$work/kcache-first" "$work/first-ours" "$work/first-peer"
  for state in cold warm; do
    echo "@@ first ours $state"
    run 120 env MARLIN_KERNEL_CACHE="$work/kcache-first" "$BIN" extract "$one/v0000" --out "$work/first-ours" \
      --weights "$work/w.pt" --device cuda --precision bf16 --batch-size 16 --overwrite --quiet
  done
  if peer; then
    echo "@@ first peer -"
    run 180 "$PY" bench/peer_extract_folders.py --weights "$work/w.pt" --root "$one" --out "$work/first-peer" \
      --device cuda --precision bf16
  fi
  echo "== engine: one forward step by step (device time per step kind), batch 64"
  for p in bf16 tf32; do
    run 90 "$BIN" bench --device cuda --batch-size 64 --iters 1 --profile --precision "$p"
  done
  echo "== engine: ViT-L extract_features, batch 64 (one round)"
  for p in bf16 tf32; do
    echo "@@ extract_vitl_b64 ours $p"
    run 120 "$PY" bench/gpu_peak.py -- "$BIN" bench --model marlin_vit_large_ytf --device cuda --batch-size 64 --iters 5 --precision "$p"
  done
  if peer; then
    for m in "bf16 --sdpa" tf32; do
      echo "@@ extract_vitl_b64 peer ${m/ --sdpa/_sdpa}"
      run 150 "$PY" bench/gpu_peak.py -- "$PY" bench/peer_features.py --model marlin_vit_large_ytf --device cuda --batch-size 64 --iters 5 --precision $m
    done
  fi
  "$PY" bench/gpu_results.py "$OUT/gpu.log" --out "$OUT"
fi

if has pretrain; then
  echo "== pretrain: the training engine's step on the GPU against the peer's step and the host twin"
  run 200 "$work/suite" gpu::cuda::train_engine --test-threads 1 --nocapture
  echo "== pretrain: ViT-B pretraining step, ours (the engine) and the peer's in alternating rounds (samples/s; NVML peak above the idle GPU)"
  for round in $(seq "${TRAIN_ROUNDS:-1}"); do
    for b in ${TRAIN_BATCHES:-16 64}; do
      for p in ${TRAIN_PRECISIONS:-bf16 tf32 fp32}; do
        echo "@@ pretrain_vitb_b$b ours $p"
        run 120 "$PY" bench/gpu_peak.py -- "$BIN" bench --train --train-engine --device cuda --batch-size "$b" --iters 5 --precision "$p"
      done
      if peer; then
        for p in bf16 tf32; do
          echo "@@ pretrain_vitb_b$b peer $p"
          run 150 "$PY" bench/gpu_peak.py -- "$PY" bench/peer_pretrain_step.py --device cuda --batch "$b" --iters 5 --precision "$p"
        done
      fi
    done
  done
  "$PY" bench/gpu_results.py "$OUT/gpu.log" --out "$OUT"
fi

if has finetune; then
  echo "== finetune: ViT-B fine-tuning step, ours (the engine) and the peer's (samples/s; NVML peak above the idle GPU)"
  for b in ${FINETUNE_BATCHES:-8 16}; do
    for p in ${TRAIN_PRECISIONS:-bf16 tf32 fp32}; do
      echo "@@ finetune_vitb_b$b ours $p"
      run 120 "$PY" bench/gpu_peak.py -- "$BIN" bench --finetune --train-engine --device cuda --batch-size "$b" --iters 5 --precision "$p"
    done
    if peer; then
      for p in bf16 tf32; do
        echo "@@ finetune_vitb_b$b peer $p"
        run 150 "$PY" bench/gpu_peak.py -- "$PY" bench/peer_finetune_step.py --device cuda --batch "$b" --iters 5 --precision "$p"
      done
    fi
  done
  "$PY" bench/gpu_results.py "$OUT/gpu.log" --out "$OUT"
fi

if has parity; then
  echo "== parity: CUDA against the peer's fixtures and the CPU backend"
  skip=()
  command -v ffmpeg > /dev/null || { skip=(--skip extract_of_the_samples); echo "(no ffmpeg here: extract_of_the_samples_equals_the_cpu not run)"; }
  for t in ${SUITE_SKIP:-}; do skip+=(--skip "$t"); done
  run "${PARITY_LIMIT:-420}" "$work/suite" gpu:: --test-threads 1 --nocapture "${skip[@]}"
  echo "== parity: face parser label map, CUDA (burn's ops) vs CPU (host kernels)"
  face=tests/fixtures/face/astronaut256.png
  run 120 "$BIN" parse "$face" --save-map "$work/cpu.npy" &&
    run 120 "$BIN" parse "$face" --device cuda --save-map "$work/cuda.npy" &&
    "$PY" -c "import numpy as np, sys; a, b = np.load(sys.argv[1]), np.load(sys.argv[2]); print(f'label maps: {(a != b).sum()} of {a.size} pixels differ')" "$work/cpu.npy" "$work/cuda.npy"
  echo "== errors: an impossible batch size is one line"
  run 120 "$BIN" bench --device cuda --batch-size 8192 --iters 1
fi

if has features; then
  echo "== features: ViT-B extract_features, batch 64 (clips/s), burn's CUDA path (MARLIN_ENGINE=burn; the engine: section engine)"
  for p in fp32 tf32 bf16; do
    run 240 env MARLIN_ENGINE=burn "$BIN" bench --device cuda --batch-size 64 --iters 5 --precision "$p"
  done
  if peer; then
    for p in fp32 tf32 bf16; do
      run 240 "$PY" bench/peer_features.py --device cuda --batch-size 64 --iters 5 --precision "$p"
    done
    run 240 "$PY" bench/peer_features.py --device cuda --batch-size 64 --iters 5 --precision bf16 --sdpa
  fi
fi

if has train; then
  echo "== train: pretraining step (critic + generator), ViT-B (samples/s)"
  for b in ${TRAIN_BATCHES:-16 64}; do
    for p in fp32 tf32 bf16; do
      run 300 "$BIN" bench --train --device cuda --batch-size "$b" --iters 5 --precision "$p"
      peer && run 300 "$PY" bench/peer_pretrain_step.py --device cuda --batch "$b" --iters 5 --precision "$p"
    done
  done
fi

if has e2e; then
  n=${E2E_VIDEOS:-500}
  echo "== e2e: $n ten-second 224x224 videos (300 frames each, frame folders of JPEGs)"
  videos=$work/videos224
  [ -d "$videos" ] || run 600 "$PY" bench/make_frame_videos.py "$videos" --videos "$n" --frames 300
  run 120 "$PY" bench/peer_extract.py --save-weights "$work/w.pt"
  # Warm-up on three videos (untimed): NVRTC compiles burn's kernels and autotune picks them;
  # both are cached on disk for the timed run, as on a user's second job.
  for p in ${E2E_PRECISIONS:-tf32 bf16}; do
    rm -rf "$work/ours-$p" "$work/peer-$p" "$work/warm-out"
    run 300 "$BIN" extract "$videos/v0000" "$videos/v0001" "$videos/v0002" --out "$work/warm-out" --weights "$work/w.pt" --device cuda \
      --batch-size 64 --precision "$p" --quiet
    run 600 "$BIN" extract "$videos" --out "$work/ours-$p" --weights "$work/w.pt" --device cuda \
      --batch-size 64 --precision "$p" --quiet
    run 900 "$PY" bench/peer_extract_folders.py --weights "$work/w.pt" --root "$videos" \
      --out "$work/peer-$p" --device cuda --precision "$p"
    "$PY" - "$work/ours-$p" "$work/peer-$p" <<'PYEOF'
import numpy as np, os, sys
a, b = sys.argv[1], sys.argv[2]
names = sorted(f for f in os.listdir(b) if f.endswith(".npy"))
worst, shapes = 0.0, 0
for f in names:
    x, y = np.load(os.path.join(a, f)), np.load(os.path.join(b, f))
    shapes += x.shape != y.shape
    if x.shape == y.shape:
        worst = max(worst, float(np.abs(x - y).max()))
print(f"outputs: {len(names)} videos, {shapes} with other shapes, max abs diff ours vs peer {worst:.3e}")
PYEOF
  done
  echo "== e2e: --crop-face on 720p videos (ours)"
  hd=$work/videos720
  [ -d "$hd" ] || run 600 "$PY" bench/make_frame_videos.py "$hd" --videos "${E2E_HD_VIDEOS:-20}" --frames 300 --hd --face tests/fixtures/face/astronaut256.png
  run 600 "$BIN" extract "$hd" --out "$work/ours-hd" --weights "$work/w.pt" --device cuda \
    --batch-size 64 --crop-face --quiet
fi

if has large; then
  echo "== large: ViT-L extract_features, batch 64 (clips/s)"
  for p in fp32 tf32 bf16; do
    run 300 "$BIN" bench --model marlin_vit_large_ytf --device cuda --batch-size 64 --iters 3 --precision "$p"
  done
  for p in fp32 tf32 bf16; do
    run 300 "$PY" bench/peer_features.py --model marlin_vit_large_ytf --device cuda --batch-size 64 --iters 3 --precision "$p"
  done
  run 300 "$PY" bench/peer_features.py --model marlin_vit_large_ytf --device cuda --batch-size 64 --iters 3 --precision bf16 --sdpa
fi

if has curve; then
  echo "== curve: ViT-B pretraining on the shared samples, the engine in fp32 and in bf16 (loss curves)"
  d=$work/curve
  rm -rf "$d" && mkdir -p "$d"
  if [ -d .gpu/samples ]; then
    run 180 "$BIN" prepare .gpu/samples/*.mp4 --out "$d/prep" --parser template --val-ratio 0.25 \
      --detect-every 5 --quiet &&
      "$PY" bench/curve_data.py "$d/prep" "$d/data" 320 &&
      "$BIN" config marlin_vit_base_ytf |
      sed -e 's/^  base: 0.00015$/  base: 0.0015/' -e 's/^  warmup_epochs: 40$/  warmup_epochs: 2/' > "$d/vitb.yaml"
    for p in fp32 bf16; do
      echo "@@ curve $p -"
      run 300 "$BIN" pretrain --config "$d/vitb.yaml" --data "$d/data" --out "$d/$p" \
        --epochs "${CURVE_EPOCHS:-20}" --steps-per-epoch 10 --batch-size 16 --val-clips 8 \
        --device cuda --step engine --precision "$p" --quiet
      cp "$d/$p/metrics.csv" "$OUT/curve-$p.csv" 2>/dev/null
    done
    "$PY" bench/loss_curve.py "$OUT/curve-fp32.csv" "$OUT/curve-bf16.csv" --svg "$OUT/curve.svg"
  else
    echo "(no .gpu/samples: run bench/gpu_prepare.sh where the shared samples are)"
  fi
fi

if has ddp; then
  echo "== ddp: pretraining at world size 1 with NCCL vs a plain run (tiny_smoke, 2 epochs)"
  d=$work/ddp
  rm -rf "$d" && mkdir -p "$d"
  "$PY" - "$d/data" <<'PYEOF'
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(0)
for split, names in [("train", ["a/0", "a/1", "a/2", "a/3"]), ("val", ["b/0"])]:
    for n in names:
        os.makedirs(f"{root}/crop_images_DB/{n}", exist_ok=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f"{root}/crop_images_DB/{n}/{i:03d}.jpg")
    with open(f"{root}/{split}_set.csv", "w") as f:
        f.write("path,len\n" + "".join(f"{n},20\n" for n in names))
PYEOF
  "$BIN" config tiny_smoke | sed 's/mask_strategy: fasking/mask_strategy: random/' > "$d/tiny.yaml"
  nccl=$("$PY" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
  echo "NCCL: ${nccl:-system}"
  # burn's step (--step auto on CUDA) and the training engine's CUDA step (one bucket; each
  # layer's gradients on their own: engine-layers).
  for v in auto engine engine-layers; do
  step=${v%-layers}; extra=()
  if [ "$v" = engine-layers ]; then extra=(--bucket-mb 0); fi
  args=(pretrain --config "$d/tiny.yaml" --data "$d/data" --epochs 2 --batch-size 2 --device cuda --quiet --step "$step")
  echo "@@ ddp $v -"
  [ -f "$d/plain_$step/model.safetensors" ] || run 300 "$BIN" "${args[@]}" --out "$d/plain_$step"
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 MARLIN_NCCL_LIBRARY=$nccl \
    run 300 "$BIN" "${args[@]}" "${extra[@]}" --out "$d/nccl_$v" --dist-timeout 120
  "$PY" - "$d/plain_$step/model.safetensors" "$d/nccl_$v/model.safetensors" "$v" <<'PYEOF'
import json, struct, sys
import numpy as np
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    return {k: np.frombuffer(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], dtype=np.float32)
            for k, v in h.items() if k != "__metadata__" and v["dtype"] == "F32"}
a, b = load(sys.argv[1]), load(sys.argv[2])
worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
print(f"ddp ({sys.argv[3]}): {len(a)} tensors, max abs diff plain vs NCCL world 1: {worst:.3e} ({'ok' if worst <= 1e-5 else 'FAIL'})")
print(f"parity ddp_world1_{sys.argv[3]} {worst:.3e}")
PYEOF
  done
fi

if has unfused; then
  echo "== unfused: burn's unfused attention instead of its flash kernel (parity, then speed)"
  run 300 env MARLIN_FLASH_ATTENTION=0 "$work/suite" gpu::cuda::features --test-threads 1 --nocapture
  for p in tf32 bf16; do
    run 240 env MARLIN_ENGINE=burn MARLIN_FLASH_ATTENTION=0 "$BIN" bench --device cuda --batch-size 64 --iters 5 --precision "$p"
  done
fi

if has step; then
  echo "== step: the pretraining-step parity test alone (every precision), with what is left"
  run 600 "$work/suite" gpu::cuda::a_pretraining_step --test-threads 1 --nocapture
fi

if has profile; then
  echo "== profile: one ViT-B block, batch 64"
  for p in fp32 tf32 bf16; do
    run 300 "$BIN" bench --device cuda --batch-size 64 --iters 1 --profile --precision "$p"
  done
fi
echo "== done $(date -u +%FT%TZ)"
