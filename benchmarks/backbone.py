#!/usr/bin/env python
"""Benchmark: smartformer ``Swin3D`` vs MONAI ``SwinTransformer`` (forward + backward).

Both models get the identical configuration (from a ``Swin3D`` preset) and identical weights
(our state dict loaded into MONAI's model), the same input and the same loss (sum of the mean
squares of the five normalised stage outputs). In one process and one run it measures:

* throughput: forward + backward time per batch, the models' repeats interleaved (the order
  alternates between repeats), reported as the best (min) and the median of the repeats;
* peak memory of one forward + backward, each (model, size) in a fresh subprocess: on CPU the
  peak RSS (VmHWM, reset before the step) minus the RSS before the step, with glibc's mmap
  threshold fixed low so freed blocks go back to the OS; "activations" is the RSS held after
  the forward (before the backward). On CUDA: ``torch.cuda.max_memory_allocated`` deltas;
* achieved GFLOP/s as a fraction of an fp32 matmul peak measured in the same run (best of a few
  large ``torch.mm``). FLOPs are the model's math, counted by ``FlopCounterMode`` on one forward
  + backward of the explicit-softmax path on the meta device (the same count for both models;
  the recomputation that the fused attention does in its backward is not counted, as in MFU);
* ``Swin3D`` with gradient checkpointing (``set_grad_checkpointing(True)``): throughput and
  memory, to compare activation memory with checkpointing on and off;
* with ``--profile``: where the time of one forward + backward goes, per model, from
  ``torch.profiler`` self times grouped into phases (:data:`PHASES`): window attention, linear
  layers, normalisation, data movement (pad, roll, window partition/reverse copies, cat), other
  element-wise work.

Usage::

    python benchmarks/backbone.py --sizes 64 96 --batch 2 --preset base --repeats 3 --device cpu

The table is printed, and everything (with the hardware) is written as JSON
(``benchmarks/results/backbone.json`` by default).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = ("swin3d", "monai", "swin3d_ckpt")
LABELS = {"swin3d": "Swin3D", "monai": "MONAI SwinTransformer", "swin3d_ckpt": "Swin3D + checkpointing"}


# --------------------------------------------------------------------------------------------
# models


def build(name: str, preset: str, device: str):
    """The model ``name`` (one of MODELS) with the preset's configuration and seed-0 weights."""
    from smartformer.models.swin3d import Swin3D

    torch.manual_seed(0)
    ours = Swin3D.from_preset(preset)
    if name == "swin3d_ckpt":
        ours.set_grad_checkpointing(True)
    if name != "monai":
        return ours.to(device)
    from monai.networks.nets.swin_unetr import SwinTransformer

    cfg = ours.config
    model = SwinTransformer(
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        window_size=cfg.window_size,
        patch_size=(cfg.patch_size,) * 3,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=cfg.drop_path_rate,
        spatial_dims=3,
        downsample="merging",
        use_v2=False,
    )
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    if missing or set(unexpected) != {"mask_token"}:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    return model.to(device)


def stages(model, x):
    if hasattr(model, "forward_stages"):
        return model.forward_stages(x, normalize=True)
    return model(x, normalize=True)


def train_step(model, x) -> None:
    model.zero_grad(set_to_none=True)
    loss = sum(o.float().square().mean() for o in stages(model, x))
    loss.backward()


def make_input(batch: int, size: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, size, size, size, generator=g).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# measurements


def matmul_peak(device: str, n: int = 4096, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of ``torch.mm`` on n x n matrices."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def count_flops(preset: str, batch: int, size: int) -> dict:
    """FLOPs of one forward + backward, counted on the meta device for both models."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name in ("swin3d", "monai"):
        model = build(name, preset, "cpu")
        if name == "swin3d":
            model.set_fused_attn(False)  # FlopCounterMode does not know the CPU flash kernels
        model = model.to("meta")
        x = torch.empty(batch, 1, size, size, size, device="meta")
        with FlopCounterMode(display=False) as counter:
            train_step(model, x)
        out[name] = counter.get_total_flops()
    return out


def check_equal(preset: str, batch: int, size: int, device: str) -> float:
    """Max |difference| of the five stage outputs of the two models (forward, no grad)."""
    x = make_input(batch, size, device)
    with torch.no_grad():
        a = stages(build("swin3d", preset, device), x)
        b = stages(build("monai", preset, device), x)
    return max((u - v).abs().max().item() for u, v in zip(a, b))


def time_interleaved(preset: str, batch: int, size: int, device: str, repeats: int, names) -> dict[str, list[float]]:
    models = {name: build(name, preset, device) for name in names}
    x = make_input(batch, size, device)
    for name in names:  # warm-up: lazy initialisation, allocator, caches
        train_step(models[name], x)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for name in order:
            sync(device)
            t = time.perf_counter()
            train_step(models[name], x)
            sync(device)
            times[name].append(time.perf_counter() - t)
        print(
            f"  {size}^3 repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True
        )
    return times


#: Profiler op names by phase (the first phase whose pattern an op's name contains wins). The
#: attention's batched products (``bmm``) are told from the linears' 2-D ones (``addmm``, ``mm``);
#: the element-wise work inside the attention (exp, masks) counts as element-wise.
PHASES = {
    "window attention": ("flash_attention", "bmm", "softmax"),
    "linear layers": ("addmm", "aten::mm", "aten::linear"),
    "normalisation": ("layer_norm",),
    "data movement": (
        "copy_",
        "clone",
        "contiguous",
        "cat",
        "roll",
        "pad",
        "index",
        "scatter",
        "gather",
        "slice",
        "select",
        "narrow",
        "stack",
        "fill_",
        "zero_",
        "empty",
        "as_strided",
        "reshape",
        "view",
        "permute",
        "transpose",
    ),
}


def phase_of(op: str) -> str:
    """The phase (a key of :data:`PHASES`, else ``"element-wise and other"``) of a profiler op."""
    for phase, patterns in PHASES.items():
        if any(p in op for p in patterns):
            return phase
    return "element-wise and other"


def profile_phases(preset: str, batch: int, size: int, device: str, names) -> dict[str, dict[str, float]]:
    """Seconds of one profiled forward + backward per phase (self times), per model."""
    from torch.profiler import ProfilerActivity, profile

    x = make_input(batch, size, device)
    result = {}
    for name in names:
        model = build(name, preset, device)
        train_step(model, x)  # warm-up
        sync(device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, x)
            sync(device)
        phases: dict[str, float] = {}
        for event in prof.key_averages():
            phase = phase_of(event.key)
            phases[phase] = phases.get(phase, 0.0) + event.self_cpu_time_total / 1e6
        phases["total"] = sum(phases.values())
        result[name] = phases
        print(f"  {size}^3 {name} profile: " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()), flush=True)
        del model
    return result


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - non-glibc
        pass


def memory_child(name: str, preset: str, batch: int, size: int, device: str) -> dict:
    """Runs in a fresh process: memory of one forward + backward of ``name``."""
    model = build(name, preset, device)
    x = make_input(batch, size, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.zero_grad(set_to_none=True)
        outs = stages(model, x)
        loss = sum(o.float().square().mean() for o in outs)
        torch.cuda.synchronize()
        after_fwd = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {
            "peak_mib": (peak - base) / 2**20,
            "activations_mib": (after_fwd - base) / 2**20,
            "method": "cuda.max_memory_allocated",
        }
    _trim()
    base = _rss_kib("VmRSS")
    method = "VmHWM delta (reset via /proc/self/clear_refs)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        method = "VmHWM delta (could not reset: includes set-up)"
    t = time.perf_counter()
    model.zero_grad(set_to_none=True)
    outs = stages(model, x)
    loss = sum(o.float().square().mean() for o in outs)
    _trim()
    after_fwd = _rss_kib("VmRSS")
    loss.backward()
    elapsed = time.perf_counter() - t
    peak = _rss_kib("VmHWM")
    return {
        "peak_mib": (peak - base) / 1024,
        "activations_mib": (after_fwd - base) / 1024,
        "baseline_rss_mib": base / 1024,
        "step_s": elapsed,
        "method": method,
    }


def memory_subprocess(name: str, preset: str, batch: int, size: int, device: str) -> dict:
    env = dict(os.environ)
    # Freed blocks of >= 128 KiB go straight back to the OS, so RSS follows live memory.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--preset", preset, "--batch", str(batch)]
    cmd += ["--sizes", str(size), "--device", device, "--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} at {size} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def hardware(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
        info["logical_cpus_in_cpuinfo"] = len(names)
    except OSError:  # pragma: no cover
        info["cpu_model"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------


def summarize(times: list[float], batch: int) -> dict:
    best, med = min(times), statistics.median(times)
    return {
        "times_s": times,
        "best_s": best,
        "median_s": med,
        "vol_per_s": batch / best,
        "vol_per_s_median": batch / med,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="cubic input sides")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--preset", default="base")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward steps per model and size")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "backbone.json"))
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    p.add_argument("--no-checkpointing", action="store_true", help="skip Swin3D with gradient checkpointing")
    p.add_argument("--profile", action="store_true", help="also profile where each model's step goes, by phase")
    p.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")

    if args.child:
        print(json.dumps(memory_child(args.child, args.preset, args.batch, args.sizes[0], args.device)))
        return {}

    names = [m for m in MODELS if not (args.no_checkpointing and m == "swin3d_ckpt")]
    result: dict = {
        "benchmark": "Swin3D vs MONAI SwinTransformer, forward + backward, fp32",
        "config": {
            "preset": args.preset,
            "batch": args.batch,
            "sizes": args.sizes,
            "repeats": args.repeats,
            "device": args.device,
        },
        "hardware": hardware(args.device),
        "load_avg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sizes": {},
    }
    from smartformer.models import attention

    result["swin3d_attention"] = {
        "cpu_flash_kernel": attention.flash_cpu_available(),
        "use_flash_backward": attention.USE_FLASH_BACKWARD,
    }
    try:
        root = Path(__file__).resolve().parents[1]
        result["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    print(f"hardware: {result['hardware']}", flush=True)
    peaks = [matmul_peak(args.device)]
    print(f"fp32 matmul peak: {peaks[0]:.1f} GFLOP/s", flush=True)
    result["max_abs_diff_stage_outputs"] = check_equal(args.preset, 1, min(args.sizes), args.device)
    print(f"max |Swin3D - MONAI| over stage outputs: {result['max_abs_diff_stage_outputs']:.2e}", flush=True)

    for size in args.sizes:
        entry: dict = {}
        flops = count_flops(args.preset, args.batch, size)
        if flops["swin3d"] != flops["monai"]:
            print(f"  warning: FLOP counts differ: {flops}", flush=True)
        entry["flops_fwd_bwd"] = flops["monai"]
        times = time_interleaved(args.preset, args.batch, size, args.device, args.repeats, names)
        for name in names:
            entry[name] = summarize(times[name], args.batch)
            entry[name]["gflops_per_s"] = flops["monai"] / entry[name]["best_s"] / 1e9
        if args.profile:
            entry["profile_s"] = profile_phases(args.preset, args.batch, size, args.device, ["swin3d", "monai"])
        if not args.no_memory:
            for name in names:
                entry[name]["memory"] = memory_subprocess(name, args.preset, args.batch, size, args.device)
                print(f"  {size}^3 {name}: peak {entry[name]['memory']['peak_mib']:.0f} MiB", flush=True)
        result["sizes"][str(size)] = entry
        peaks.append(matmul_peak(args.device))
    peak = max(peaks)
    result["matmul_peak_gflops"] = {"runs (start, after each size)": peaks, "best": peak, "n": 4096}
    result["load_avg_end"] = os.getloadavg()

    # summary: ratios
    for entry in result["sizes"].values():
        for name in names:
            entry[name]["fraction_of_matmul_peak"] = entry[name]["gflops_per_s"] / peak
        s, m = entry["swin3d"], entry["monai"]
        entry["speedup_vs_monai"] = m["best_s"] / s["best_s"]
        entry["speedup_vs_monai_median"] = m["median_s"] / s["median_s"]
        if "memory" in s:
            entry["peak_memory_ratio_vs_monai"] = s["memory"]["peak_mib"] / m["memory"]["peak_mib"]
            if "swin3d_ckpt" in entry:
                entry["checkpointing_activation_ratio"] = (
                    entry["swin3d_ckpt"]["memory"]["activations_mib"] / s["memory"]["activations_mib"]
                )
                entry["checkpointing_peak_ratio"] = entry["swin3d_ckpt"]["memory"]["peak_mib"] / s["memory"]["peak_mib"]

    print_table(result, names)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def print_table(result: dict, names) -> None:
    hw = result["hardware"]
    print()
    print(
        f"{hw.get('cpu_model')} | {hw['cpu_count']} CPUs, torch {hw['torch']} ({hw['torch_threads']} threads) "
        f"| device {result['config']['device']}"
    )
    print(
        f"fp32 matmul peak {result['matmul_peak_gflops']['best']:.1f} GFLOP/s; batch {result['config']['batch']}, "
        f"preset {result['config']['preset']}"
    )
    head = (
        f"{'size':>5} {'model':<24} {'best s':>7} {'median s':>8} {'vol/s':>6} {'GFLOP/s':>8} {'%peak':>6} "
        f"{'peak MiB':>9} {'act. MiB':>9}"
    )
    print(head)
    print("-" * len(head))
    for size, entry in result["sizes"].items():
        for name in names:
            e = entry[name]
            mem = e.get("memory", {})
            print(
                f"{size + '^3':>5} {LABELS[name]:<24} {e['best_s']:7.2f} {e['median_s']:8.2f} {e['vol_per_s']:6.3f} "
                f"{e['gflops_per_s']:8.1f} {100 * e['fraction_of_matmul_peak']:5.1f}% "
                f"{mem.get('peak_mib', float('nan')):9.0f} {mem.get('activations_mib', float('nan')):9.0f}"
            )
        line = (
            f"      speed-up vs MONAI {entry['speedup_vs_monai']:.2f}x (median {entry['speedup_vs_monai_median']:.2f}x)"
        )
        if "peak_memory_ratio_vs_monai" in entry:
            line += f"; peak memory {entry['peak_memory_ratio_vs_monai']:.2f}x MONAI's"
        if "checkpointing_activation_ratio" in entry:
            line += (
                f"; checkpointing: activations {entry['checkpointing_activation_ratio']:.2f}x, "
                f"peak {entry['checkpointing_peak_ratio']:.2f}x"
            )
        print(line)


if __name__ == "__main__":
    main()
