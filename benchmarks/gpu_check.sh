#!/usr/bin/env bash
# GPU check (issue 15): the CUDA paths in one run, under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh                    # on a machine with a CUDA GPU
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # the same commands on the CPU, small and quick
#
# Checks, one summary line each at the end (PASS / FAIL / SKIP):
#   1. the CUDA-marked tests (pytest -m cuda: backbone on CUDA vs CPU, SDPA with a bias that
#      needs gradients vs the explicit softmax, a bf16 autocast training step, maps on CUDA vs CPU);
#   2. bf16 pretraining steps (`smartformer pretrain ... train.precision=bf16`): every loss term finite,
#      the reconstruction loss falling (the distillation terms rise towards ln K early on);
#   3. a 2-process NCCL run (torchrun --nproc_per_node 2); NCCL refuses two ranks on one GPU
#      ("Duplicate GPU detected"), in which case it runs 1 process and says so;
#   4. benchmarks/backbone.py and benchmarks/attention_speed.py with --device cuda.
# Environment: PYTHON (default .venv/bin/python, else python), GPU_CHECK_OUT (a folder kept
# afterwards for the logs and JSON results; default a temporary one, removed unless a check
# failed). Data: phantoms written here; the attention benchmark uses
# ../shared/data/chest/elastix_00.nii.gz when present, else a phantom of the same size.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DRY=${GPU_CHECK_DRY:-0}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY=()
FAILED=0

note() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
record() {  # record STATUS "check: detail"
    SUMMARY+=("$1 $2")
    [ "$1" = FAIL ] && FAILED=1
    note "$1 $2"
}

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; ROI=32; STEPS=8; PRESET_BENCH=tiny; SIZES="32"; REPEATS=1
    PHANTOM_SHAPE="64 64 48"; PHANTOM_SPACING="4 4 4"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    DEVICE=cuda; ROI=64; STEPS=100; PRESET_BENCH=base; SIZES="64 96"; REPEATS=3
    PHANTOM_SHAPE="128 128 96"; PHANTOM_SPACING="2.5 2.5 2.5"
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device visible to torch (set GPU_CHECK_DRY=1 for the CPU dry run)"; exit 2
    fi
fi
note "device $DEVICE, output in $OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

# Shared data: a few phantom CTs.
"$PY" -m smartformer data phantom --out "$OUT/phantoms" -n 4 --seed 3 --shape $PHANTOM_SHAPE \
    --spacing $PHANTOM_SPACING --no-progress > "$OUT/phantoms.log" 2>&1 || { cat "$OUT/phantoms.log"; exit 1; }

# Config overrides come last on the command line (after every --option).
OVERRIDES=("data.roi=[$ROI,$ROI,$ROI]" data.batch_size=2 data.num_workers=2 "data.cache_dir=$OUT/cache"
           train.log_every=1 train.snapshot_every=1000000 optim.warmup_steps=5 masking.warmup_steps=0)

# 1. CUDA-marked tests.
"$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider > "$OUT/1_cuda_tests.log" 2>&1
rc=$?
line=$(grep -E "passed|failed|skipped|error" "$OUT/1_cuda_tests.log" | tail -1)
if [ $rc -eq 0 ] && ! grep -q "passed" <<< "$line"; then
    record SKIP "1 cuda tests: $line (no CUDA device)"
elif [ $rc -eq 0 ]; then
    record PASS "1 cuda tests: $line"
else
    record FAIL "1 cuda tests: ${line:-pytest exit $rc} (see $OUT/1_cuda_tests.log)"
fi

# 2. bf16 pretraining: loss finite and falling.
timeout 240 "$PY" -m smartformer pretrain --data "$OUT/phantoms" --out "$OUT/bf16" --no-progress \
    "${OVERRIDES[@]}" train.device=$DEVICE train.precision=bf16 train.max_steps=$STEPS > "$OUT/2_bf16.log" 2>&1
rc=$?
verdict=$("$PY" - "$OUT/bf16/metrics.jsonl" "$DRY" <<'EOF'
import json, math, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
except OSError as exc:
    print(f"FAIL no metrics ({exc})"); sys.exit()
losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
if not losses:
    print("FAIL no loss rows"); sys.exit()
terms = [v for r in rows for k, v in r.items() if k.startswith("loss") and isinstance(v, (int, float))]
finite = all(math.isfinite(v) for v in terms)
# Falling: the reconstruction loss, whose target is fixed. The distillation terms chase a teacher
# whose temperature warms up and whose centre moves, and rise towards ln K in early steps.
recon = [r["loss_recon"] for r in rows if isinstance(r.get("loss_recon"), (int, float))] or losses
third = max(1, len(recon) // 3)
first, last = sum(recon[:third]) / third, sum(recon[-third:]) / third
falling = last < first
dry = sys.argv[2] == "1"
ok = finite and (falling or dry)
print(f"{'PASS' if ok else 'FAIL'} {len(losses)} steps, every loss term finite: {finite}; reconstruction loss "
      f"{first:.4f} (first third) -> {last:.4f} (last third): {'falling' if falling else 'not falling'}"
      f"{' (not required in the dry run)' if dry and not falling else ''}; total loss {losses[0]:.4f} -> {losses[-1]:.4f}")
EOF
)
if [ $rc -ne 0 ]; then
    record FAIL "2 bf16 pretraining: exit $rc, $(tail -1 "$OUT/2_bf16.log") (see $OUT/2_bf16.log)"
else
    record "${verdict%% *}" "2 bf16 pretraining: ${verdict#* }"
fi

# 3. Two processes (NCCL on CUDA, gloo on the CPU); one GPU: both ranks on cuda:0.
NGPU=0
[ "$DEVICE" = cuda ] && NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
DDP_DEVICE=$DEVICE
[ "$DEVICE" = cuda ] && [ "$NGPU" -lt 2 ] && DDP_DEVICE=cuda:0
backend=$([ "$DEVICE" = cuda ] && echo nccl || echo gloo)
ddp() {  # ddp NPROC TAG
    timeout 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$1" -m smartformer pretrain \
        --data "$OUT/phantoms" --out "$OUT/ddp$1" --no-progress "${OVERRIDES[@]}" train.device=$DDP_DEVICE \
        train.max_steps=4 train.checkpoint_every=2 > "$OUT/3_ddp$1.log" 2>&1
}
if ddp 2; then
    record PASS "3 2-process $backend run: 4 steps, replicas in sync at each checkpoint ($DDP_DEVICE)"
elif grep -qiE "duplicate GPU|same (GPU|device)|invalid usage" "$OUT/3_ddp2.log"; then
    if ddp 1; then
        record PASS "3 NCCL refused 2 ranks on one GPU ($(grep -oiE 'duplicate GPU[^.]*' "$OUT/3_ddp2.log" | head -1)); ran 1 process under torchrun instead: 4 steps OK"
    else
        record FAIL "3 NCCL refused 2 ranks on one GPU, and the 1-process torchrun run failed too (see $OUT/3_ddp1.log)"
    fi
else
    record FAIL "3 2-process $backend run: $(grep -E 'Error|error' "$OUT/3_ddp2.log" | tail -1) (see $OUT/3_ddp2.log)"
fi

# 4. Benchmarks on the device.
if [ "$DRY" = 1 ]; then BB_EXTRA=(--no-checkpointing); else BB_EXTRA=(); fi
if timeout 240 "$PY" benchmarks/backbone.py --preset $PRESET_BENCH --sizes $SIZES --batch 2 --repeats $REPEATS \
        --device $DEVICE --no-memory "${BB_EXTRA[@]}" --json "$OUT/backbone.json" > "$OUT/4_backbone.log" 2>&1; then
    record PASS "4a backbone benchmark: $("$PY" - "$OUT/backbone.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1], encoding="utf-8"))
print("; ".join(f"{size}^3 {e['speedup_vs_monai']:.2f}x MONAI" for size, e in r["sizes"].items()))
EOF
)"
else
    record FAIL "4a backbone benchmark: $(tail -1 "$OUT/4_backbone.log") (see $OUT/4_backbone.log)"
fi
IMAGE=../shared/data/chest/elastix_00.nii.gz
if [ "$DRY" = 1 ] || [ ! -f "$IMAGE" ]; then
    if [ "$DRY" = 1 ]; then IMAGE="$OUT/phantoms/case_000/ct.nii.gz"; else
        "$PY" -m smartformer data phantom --out "$OUT/big" -n 1 --seed 5 --shape 486 358 141 --spacing 0.98 0.98 2 \
            --no-progress > "$OUT/big.log" 2>&1
        IMAGE="$OUT/big/case_000/ct.nii.gz"
    fi
fi
if timeout 240 "$PY" benchmarks/attention_speed.py --device $DEVICE --preset $PRESET_BENCH --image "$IMAGE" \
        --repeats 1 --no-agreement --json "$OUT/attention_speed.json" > "$OUT/4_attention.log" 2>&1; then
    record PASS "4b attention benchmark ($(basename "$(dirname "$IMAGE")")/$(basename "$IMAGE")): $("$PY" -c "
import json, sys; r = json.load(open(sys.argv[1])); print(', '.join(f'{m} {s:.1f} s end to end' for m, s in r['best_s'].items()))
" "$OUT/attention_speed.json")"
else
    record FAIL "4b attention benchmark: $(tail -1 "$OUT/4_attention.log") (see $OUT/4_attention.log)"
fi

echo
echo "gpu_check summary ($DEVICE$([ "$DRY" = 1 ] && echo ', dry run'), $(($(date +%s) - START)) s, logs in $OUT):"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [ -z "${GPU_CHECK_OUT:-}" ] && [ $FAILED -eq 0 ]; then rm -rf "$OUT"; fi
exit $FAILED
