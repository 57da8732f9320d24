"""Benchmark: the cost of a SMART step, of attention-guided masking, and of waiting for data.

Measured side by side in one process (repeats interleaved, median reported):

1. full SMART step (teacher pass, masking, three losses, backward, AdamW, EMA + centers) versus
   the student's forward+backward alone on the same views and masks -- target <= 1.6x;
2. the full step with attention-guided masking (``attention_hint``) versus ``random`` -- target
   <= 5% slower;
3. the fraction of step time spent waiting for data on the real CTs of ../shared/data with 2
   loader workers once the cache is warm -- target < 10%.

Usage::

    python benchmarks/pretrain_step.py --preset tiny --roi 64 --batch 2 --repeats 5 \
        --json benchmarks/results/pretrain_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smartformer.config import load_config
from smartformer.data.loader import build_pretrain_loader
from smartformer.train.ssl_meta_arch import SMARTMetaArch
from smartformer.train.teacher import update_momentum

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def hardware() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def make_meta(
    preset: str, roi: int, batch: int, strategy: str, device: torch.device
) -> tuple[SMARTMetaArch, torch.optim.Optimizer]:
    cfg = load_config(
        preset,
        [
            f"data.roi=[{roi},{roi},{roi}]",
            f"data.batch_size={batch}",
            f"masking.strategy={strategy}",
            "masking.warmup_steps=0",
        ],
    )
    torch.manual_seed(0)
    meta = SMARTMetaArch(cfg).to(device).train()
    return meta, torch.optim.AdamW(meta.param_groups(), lr=1e-4)


def full_step(meta: SMARTMetaArch, opt: torch.optim.Optimizer, views: torch.Tensor, gen: torch.Generator) -> None:
    out = meta(views, step=10, teacher_temp=0.05, generator=gen)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(meta.student.parameters(), 3.0)
    opt.step()
    meta.after_step(out, 0.996)


def student_only(meta: SMARTMetaArch, opt: torch.optim.Optimizer, views: torch.Tensor, mask: torch.Tensor) -> None:
    """The student's forward + backward (same masked views, same heads and decoder), nothing else."""
    x = views.transpose(0, 1).reshape(-1, *views.shape[2:])
    out = meta.student(x, mask=mask)
    loss = out["recon"].float().abs().mean() + out["cls_logits"].float().mean() + out["patch_logits"].float().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()


def timed(fn, sync: bool) -> float:
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def step_costs(args: argparse.Namespace, device: torch.device) -> dict:
    views = torch.rand(args.batch, 2, 1, args.roi, args.roi, args.roi, device=device)
    grid = args.roi // 16
    mask = torch.rand(2 * args.batch, grid, grid, grid, device=device) < 0.6
    hint, opt_h = make_meta(args.preset, args.roi, args.batch, "attention_hint", device)
    rand, opt_r = make_meta(args.preset, args.roi, args.batch, "random", device)
    gen = torch.Generator(device=device).manual_seed(0)
    sync = device.type == "cuda"
    cases = {
        "smart_step_attention_hint": lambda: full_step(hint, opt_h, views, gen),
        "smart_step_random": lambda: full_step(rand, opt_r, views, gen),
        "student_fwd_bwd": lambda: student_only(hint, opt_h, views, mask),
        "ema_update": lambda: update_momentum(hint.student, hint.teacher, 0.996),
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn, sync))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_s": med,
        "all_s": times,
        "smart_over_student": med["smart_step_attention_hint"] / med["student_fwd_bwd"],
        "attention_over_random": med["smart_step_attention_hint"] / med["smart_step_random"],
    }


def data_wait(args: argparse.Namespace, device: torch.device) -> dict | None:
    if not DATA.is_dir():
        return None
    cfg = load_config(
        args.preset,
        [
            f"data.roi=[{args.roi},{args.roi},{args.roi}]",
            f"data.batch_size={args.batch}",
            f"data.num_workers={args.workers}",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        stream = build_pretrain_loader(DATA, cfg.data, Path(tmp) / "cache", cfg.train.seed)
        keyed, loader, n = stream.views, stream.loader, stream.n_volumes
        t = time.perf_counter()
        for i in range(len(keyed)):  # warm the cache: every volume decoded + resampled once
            keyed[i]
        warm_s = time.perf_counter() - t
        meta, opt = make_meta(args.preset, args.roi, args.batch, "attention_hint", device)
        gen = torch.Generator(device=device).manual_seed(0)
        it = iter(loader)
        next(it)  # start the workers
        waits, computes = [], []
        for _ in range(args.data_steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            full_step(meta, opt, batch["views"].to(device), gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            waits.append(t1 - t0)
            computes.append(t2 - t1)
        del it, loader, stream
    total = sum(waits) + sum(computes)
    return {
        "volumes": n,
        "workers": args.workers,
        "cache_warm_s": warm_s,
        "steps": args.data_steps,
        "wait_fraction": sum(waits) / total,
        "mean_wait_s": statistics.mean(waits),
        "mean_step_s": statistics.mean(computes),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data-steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "pretrain_step.json")
    args = p.parse_args()
    device = torch.device(args.device)
    result = {
        "hardware": hardware(),
        "settings": vars(args) | {"json": str(args.json)},
        "step": step_costs(args, device),
        "data": data_wait(args, device),
    }
    s = result["step"]
    print(f"hardware: {result['hardware']}")
    print(f"{'case':<28}{'median s':>10}")
    for k, v in s["median_s"].items():
        print(f"{k:<28}{v:>10.3f}")
    print(f"SMART step / student fwd+bwd : {s['smart_over_student']:.2f}x  (target <= 1.6)")
    print(f"attention_hint / random      : {s['attention_over_random']:.3f}x (target <= 1.05)")
    if result["data"]:
        d = result["data"]
        print(
            f"data wait ({d['volumes']} real CTs, {d['workers']} workers, warm cache): "
            f"{100 * d['wait_fraction']:.1f}% of step time (target < 10%)"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
