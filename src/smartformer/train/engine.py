"""The pretraining loop behind ``smartformer pretrain``: one CPU, one GPU, or many via torchrun.

Run directory layout::

    RUN_DIR/config.yaml            resolved configuration
    RUN_DIR/metrics.jsonl          one line per logging step (every loss term, lr, momentum, ...)
    RUN_DIR/tensorboard/           the same scalars for TensorBoard
    RUN_DIR/snapshots/*.png        teacher attention on one fixed volume, every N steps
    RUN_DIR/checkpoints/last.pt    full state (atomic), plus step_N.pt every N steps
    RUN_DIR/teacher/               the teacher encoder for downstream use (SMARTFormer.from_pretrained)
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from smartformer.analysis.head_distance import head_distance_entropy
from smartformer.config import PretrainConfig
from smartformer.data.loader import build_pretrain_loader, default_cache_dir
from smartformer.errors import ConfigError, SmartformerError
from smartformer.train.checkpoint import (
    RunLock,
    check_state_fits,
    last_checkpoint,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
)
from smartformer.io_utils import make_dir, output_errors
from smartformer.models.swin3d import Swin3D
from smartformer.train.monitor import MetricsWriter, attention_snapshot, collapse_message
from smartformer.train.schedules import (
    Schedules,
    annotate_effective_lr,
    cosine_schedule,
    linear_warmup_then_constant,
    momentum_schedule,
    schedule_warnings,
)
from smartformer.train.ssl_meta_arch import SMARTMetaArch

__all__ = ["pretrain", "DistContext"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str) -> DistContext:
    """Join the process group torchrun describes (env ``RANK``/``WORLD_SIZE``), or an existing one."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(pref: str, ctx: DistContext) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={pref} but no CUDA device is available")
        if pref == "cuda":
            return torch.device("cuda", ctx.local_rank)
    return torch.device(pref)


def resolve_precision(pref: str, device: torch.device) -> str:
    if pref == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if pref == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return pref


def build_schedules(config: PretrainConfig, world_size: int) -> Schedules:
    steps, o, lc = config.train.max_steps, config.optim, config.loss
    global_batch = config.data.batch_size * world_size
    return Schedules(
        lr=cosine_schedule(o.lr * global_batch, o.min_lr, steps, warmup_steps=min(o.warmup_for(steps), steps - 1)),
        wd=cosine_schedule(o.weight_decay, o.weight_decay_end, steps),
        momentum=momentum_schedule(steps, base=config.teacher.momentum),
        teacher_temp=linear_warmup_then_constant(
            lc.warmup_teacher_temp, lc.teacher_temp, min(lc.warmup_teacher_temp_steps, steps), steps
        ),
    )


class _StopFlag:
    """SIGTERM / first Ctrl-C: finish the step, save, exit. A second Ctrl-C interrupts at once."""

    def __init__(self, verbose: bool) -> None:
        self.requested = False
        self.verbose = verbose
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.verbose:
            tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    def __enter__(self) -> "_StopFlag":
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _checkpoint_state(meta: SMARTMetaArch, optimizer, scaler, step: int, config: PretrainConfig,
                      schedules: Schedules, generator: torch.Generator, train_seconds: float) -> dict[str, Any]:
    return {
        "format_version": 1,
        "step": step,
        "train_seconds": train_seconds,
        "student": meta.student.state_dict(),
        "teacher": meta.teacher.state_dict(),
        "centers": {"cls": meta.dino_loss.center.clone(), "patch": meta.ibot_loss.center.clone()},
        "losses": {"cls": meta.dino_loss.state_dict(), "patch": meta.ibot_loss.state_dict(),  # + Sinkhorn queue
                   **({"global": meta.gitd_loss.state_dict()} if meta.gitd_loss is not None else {})},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "schedules": {k: torch.from_numpy(getattr(schedules, k).copy()) for k in ("lr", "wd", "momentum", "teacher_temp")},
        "rng": rng_state(generator),
        "config": config.to_dict(),
    }


@torch.no_grad()
def replica_divergence(module: torch.nn.Module, ctx: DistContext) -> float:
    """Largest difference between any process's parameters and rank 0's (exactly 0 when in sync)."""
    if not ctx.enabled:
        return 0.0
    worst = torch.zeros((), dtype=torch.float64, device=next(module.parameters()).device)
    for p in module.parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (reference - p).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _all_reduce_max(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def pretrain(
    data: str | Path,
    out: str | Path,
    config: PretrainConfig,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) SMART pretraining; returns a summary dict. See the module doc for outputs."""
    out = Path(out)
    ctx = init_distributed(config.train.device)
    device = resolve_device(config.train.device, ctx)
    lock = RunLock(out) if ctx.is_main else nullcontext()
    with lock:
        return _run(data, out, config, resume, progress, ctx, device)


def _run(data, out: Path, config: PretrainConfig, resume: bool, progress: bool, ctx: DistContext,
         device: torch.device) -> dict[str, Any]:
    existing = last_checkpoint(out) or next(iter(step_checkpoints(out)), None)
    if existing is not None and not resume:
        raise SmartformerError(f"{out}: holds a run already (checkpoints/{existing.name}); pass --resume to "
                               "continue it or choose another --out")
    found = resume_checkpoint(out) if resume else None  # verified; falls back to the newest good step_N.pt
    ckpt_path, state = found if found is not None else (None, None)
    if resume and state is None and ctx.is_main:
        warnings.warn(f"{out}: no checkpoint to resume from yet; starting at step 0", stacklevel=1)
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    precision = resolve_precision(config.train.precision, device)

    torch.manual_seed(config.train.seed)
    meta = SMARTMetaArch(config).to(device)
    meta.student.backbone.set_grad_checkpointing(config.train.grad_checkpointing)
    optimizer = torch.optim.AdamW(meta.param_groups(), lr=0.0, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    schedules = build_schedules(config, ctx.world_size)
    generator = torch.Generator(device=device).manual_seed(config.train.seed * 1000 + ctx.rank)
    start_step = 0
    seconds_before = 0.0  # training time of earlier invocations (resume), for train.max_minutes
    if state is not None:
        model_config = f"the model of this config (preset {config.preset!r}, model overrides {dict(config.model) or 'none'})"
        for net in ("student", "teacher"):
            check_state_fits(getattr(meta, net).state_dict(), state[net], model_config, f"{ckpt_path} ({net})")
        meta.student.load_state_dict(state["student"])
        meta.teacher.load_state_dict(state["teacher"])
        meta.dino_loss.center.copy_(state["centers"]["cls"])
        meta.ibot_loss.center.copy_(state["centers"]["patch"])
        if "losses" in state:  # checkpoints since the Sinkhorn queue; older ones hold the centers only
            meta.dino_loss.load_state_dict(state["losses"]["cls"])
            meta.ibot_loss.load_state_dict(state["losses"]["patch"])
            if meta.gitd_loss is not None:
                meta.gitd_loss.load_state_dict(state["losses"]["global"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], generator)
        start_step = int(state["step"])
        seconds_before = float(state.get("train_seconds", 0.0))
    student: torch.nn.Module = meta.student
    if ctx.enabled:
        student = DistributedDataParallel(
            meta.student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    # The data first (every file checked): a run that cannot start leaves no config.yaml, so it
    # is no run that --resume would take up.
    stream = build_pretrain_loader(data, config.data, config.data.cache_dir or default_cache_dir(out),
                                   config.train.seed, ctx.rank, ctx.world_size, start_step)
    if ctx.is_main:
        make_dir(out)
        with output_errors(out / "config.yaml"):
            (out / "config.yaml").write_text(annotate_effective_lr(config.to_yaml(), config, ctx.world_size))
        for message in schedule_warnings(config, schedules, ctx.world_size, start_step,
                                         state["schedules"] if state is not None else None):
            warnings.warn(message, stacklevel=1)
    autocast = torch.autocast(
        device.type,
        dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
        enabled=precision in ("bf16", "fp16"),
    )
    # A fresh start (step 0) drops the rows of an earlier attempt; a resume keeps those up to its step.
    metrics = MetricsWriter(out, resume_step=start_step) if ctx.is_main else None
    snapshot_volume = None
    max_steps = config.train.max_steps
    tc = config.train
    verbose = progress and ctx.is_main
    if verbose:
        tqdm.write(
            f"pretraining {config.preset} on {stream.n_volumes} volumes, {ctx.world_size} process(es), {device}, {precision}; "
            f"steps {start_step}->{max_steps}, batch {config.data.batch_size}x{ctx.world_size}, run dir {out}"
        )
    meta.train()
    status = "completed"
    step = start_step
    last: dict[str, float] = {}
    data_wait = compute = 0.0
    window_steps = 0
    collapse_warned = False
    bar = tqdm(total=max_steps, initial=start_step, unit="step", disable=not verbose, dynamic_ncols=True)
    it = iter(stream.loader)
    t_start = time.perf_counter()

    def train_seconds() -> float:
        return seconds_before + time.perf_counter() - t_start

    def out_of_time() -> bool:
        return tc.max_minutes > 0 and train_seconds() >= 60.0 * tc.max_minutes

    try:
        with _StopFlag(verbose) as stop:
            budget_spent = out_of_time()  # a resumed run whose budget is already used up
            if budget_spent:
                status = "time_budget"
            while step < max_steps and not budget_spent:
                t0 = time.perf_counter()
                batch = next(it)
                t1 = time.perf_counter()
                if "error" in batch:
                    hint = " (pass --skip-bad to leave such files out)" if batch["bad_file"] else ""
                    raise SmartformerError(batch["error"] + hint)
                views = batch["views"].to(device, non_blocking=True)
                if snapshot_volume is None and ctx.is_main:
                    snapshot_volume = stream.views[0]["views"][:1].to(device)
                vals = schedules.at(step)
                for group in optimizer.param_groups:
                    group["lr"] = vals["lr"]
                    if group["apply_wd"]:
                        group["weight_decay"] = vals["wd"]
                out_step = meta(views, step, vals["teacher_temp"], generator=generator, student=student,
                                autocast=autocast)
                bad, stop_now, time_up = _all_reduce_max(
                    [0.0 if math.isfinite(out_step.terms["loss"]) else 1.0, float(stop.requested), float(out_of_time())],
                    ctx, device,
                )
                if bad:
                    good = last_checkpoint(out)
                    raise SmartformerError(
                        f"non-finite loss at step {step} ({', '.join(f'{k}={v:.4g}' for k, v in out_step.terms.items() if k.startswith('loss'))}); "
                        f"stopped without saving: the last good checkpoint is {good or 'none (no checkpoint yet)'}"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out_step.loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(meta.student.parameters(), config.optim.clip_grad)
                if step < config.optim.freeze_last_layer_steps:
                    for p in meta.last_layer_parameters():
                        p.grad = None
                scaler.step(optimizer)
                scaler.update()
                meta.after_step(out_step, vals["momentum"])
                step += 1
                t2 = time.perf_counter()
                data_wait += t1 - t0
                compute += t2 - t1
                window_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{out_step.terms['loss']:.4f}", refresh=False)

                if ctx.is_main and (step % tc.log_every == 0 or step == max_steps):
                    elapsed = data_wait + compute
                    last = {
                        **out_step.terms, **vals,
                        "grad_norm": float(grad_norm),
                        "steps_per_s": window_steps / elapsed,
                        "volumes_per_s": window_steps * config.data.batch_size * ctx.world_size / elapsed,
                        "data_wait_s": data_wait / window_steps,
                        "data_wait_frac": data_wait / elapsed,
                        "masking_attention": float(meta.masker.needs_attention(step - 1)),
                    }
                    assert metrics is not None
                    metrics.write(step, last)
                    if not collapse_warned and step > config.loss.warmup_teacher_temp_steps:
                        message = collapse_message(last)
                        if message:
                            warnings.warn(f"step {step}: {message}", stacklevel=1)
                            collapse_warned = True
                    data_wait = compute = 0.0
                    window_steps = 0
                if ctx.is_main and snapshot_volume is not None and tc.head_distance_every \
                        and step % tc.head_distance_every == 0 and isinstance(meta.teacher.backbone, Swin3D):
                    assert metrics is not None
                    metrics.write(step, head_distance_entropy(meta.teacher.backbone, snapshot_volume))
                if ctx.is_main and snapshot_volume is not None and (step % tc.snapshot_every == 0 or step == max_steps) \
                        and meta.teacher.has_attention:
                    png = attention_snapshot(meta.teacher, snapshot_volume,
                                             out / "snapshots" / f"attention_step{step:07d}.png",
                                             title=f"teacher attention, step {step}")
                    assert metrics is not None
                    metrics.image("attention/teacher", png, step)
                must_stop = bool(stop_now or time_up)
                if step % tc.checkpoint_every == 0 or step == max_steps or must_stop:
                    divergence = replica_divergence(meta, ctx)  # student and teacher
                    if divergence > 0:
                        raise SmartformerError(f"process replicas diverged at step {step} (max |diff| {divergence:.3g})")
                    if ctx.is_main and ctx.enabled:
                        assert metrics is not None
                        metrics.write(step, {"replica_max_abs_diff": divergence})
                    if ctx.is_main:
                        state = _checkpoint_state(meta, optimizer, scaler, step, config, schedules, generator,
                                                  train_seconds())
                        save_checkpoint(state, out, step, keep=tc.keep_checkpoints and step % tc.checkpoint_every == 0)
                        with output_errors(out / "teacher"):
                            meta.teacher.save_pretrained(out / "teacher")
                    if ctx.enabled:
                        dist.barrier()
                if must_stop:
                    status = "interrupted" if stop_now else "time_budget"
                    if verbose and not stop_now:
                        tqdm.write(f"train.max_minutes={tc.max_minutes:g} reached at step {step}; saved")
                    break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return {
        "status": status,
        "step": step,
        "max_steps": max_steps,
        "train_seconds": train_seconds(),
        "run_dir": str(out),
        "teacher": str(out / "teacher"),
        "checkpoint": str(last_checkpoint(out)) if last_checkpoint(out) else None,
        "metrics": last,
        "world_size": ctx.world_size,
    }
