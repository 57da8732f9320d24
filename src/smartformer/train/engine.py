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
from smartformer.config import OptimConfig, PretrainConfig
from smartformer.data.loader import build_pretrain_loader, default_cache_dir
from smartformer.errors import ConfigError, SmartformerError
from smartformer.io_utils import make_dir, output_errors
from smartformer.models.swin3d import Swin3D
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
from smartformer.train.compile import compile_student
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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:  # NCCL works on the current device: bind the rank to its GPU first (train.device=cuda:N: to N)
        torch.cuda.set_device(torch.device(device_pref) if device_pref.startswith("cuda:") else local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


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

    def __enter__(self) -> _StopFlag:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class _Training:
    """What the steps change and a checkpoint saves (``meta``: the networks and the loss centers and queues)."""

    meta: SMARTMetaArch
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: Schedules
    generator: torch.Generator  # masks and teacher noise of this process


def _start_training(config: PretrainConfig, ctx: DistContext, device: torch.device, precision: str) -> _Training:
    """A fresh model, optimizer, loss scaler, schedules and generator, seeded by ``train.seed``."""
    torch.manual_seed(config.train.seed)
    meta = SMARTMetaArch(config).to(device)
    meta.student.backbone.set_grad_checkpointing(config.train.grad_checkpointing)
    optimizer = torch.optim.AdamW(meta.param_groups(), lr=0.0, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    schedules = build_schedules(config, ctx.world_size)
    generator = torch.Generator(device=device).manual_seed(config.train.seed * 1000 + ctx.rank)
    return _Training(meta, optimizer, scaler, schedules, generator)


def _checkpoint_to_resume(out: Path, resume: bool, ctx: DistContext) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint ``--resume`` continues from (path, state), or (None, None) for a fresh start.

    Raises:
        SmartformerError: ``out`` holds a run already and ``resume`` is off.
    """
    existing = last_checkpoint(out) or next(iter(step_checkpoints(out)), None)
    if existing is not None and not resume:
        raise SmartformerError(
            f"{out}: holds a run already (checkpoints/{existing.name}); pass {{setting}} to "
            "continue it or choose another output folder",
            setting="resume",
            value=True,
        )
    found = resume_checkpoint(out) if resume else None  # verified; falls back to the newest good step_N.pt
    if resume and found is None and ctx.is_main:
        warnings.warn(f"{out}: no checkpoint to resume from yet; starting at step 0", stacklevel=1)
    return found if found is not None else (None, None)


def _checkpoint_state(training: _Training, step: int, config: PretrainConfig, train_seconds: float) -> dict[str, Any]:
    """Everything a resumed run needs to continue bit-identically; :func:`_restore` reads it back."""
    meta = training.meta
    return {
        "format_version": 1,
        "step": step,
        "train_seconds": train_seconds,
        "student": meta.student.state_dict(),
        "teacher": meta.teacher.state_dict(),
        "centers": {"cls": meta.dino_loss.center.clone(), "patch": meta.ibot_loss.center.clone()},
        "losses": {
            "cls": meta.dino_loss.state_dict(),
            "patch": meta.ibot_loss.state_dict(),  # + Sinkhorn queue
            **({"global": meta.gitd_loss.state_dict()} if meta.gitd_loss is not None else {}),
        },
        "optimizer": training.optimizer.state_dict(),
        "scaler": training.scaler.state_dict(),
        "schedules": {
            k: torch.from_numpy(getattr(training.schedules, k).copy()) for k in ("lr", "wd", "momentum", "teacher_temp")
        },
        "rng": rng_state(training.generator),
        "config": config.to_dict(),
    }


def _restore(training: _Training, state: dict[str, Any], path: Path, config: PretrainConfig) -> tuple[int, float]:
    """Load a checkpoint's state into ``training``; returns its step and training seconds so far.

    Raises:
        SmartformerError: the checkpoint's weights do not fit this config's model (one line).
    """
    meta = training.meta
    model_config = (
        f"the model of this config (preset {config.preset!r}, model overrides {dict(config.model) or 'none'})"
    )
    for net in ("student", "teacher"):
        check_state_fits(getattr(meta, net).state_dict(), state[net], model_config, f"{path} ({net})")
    meta.student.load_state_dict(state["student"])
    meta.teacher.load_state_dict(state["teacher"])
    meta.dino_loss.center.copy_(state["centers"]["cls"])
    meta.ibot_loss.center.copy_(state["centers"]["patch"])
    if "losses" in state:  # checkpoints since the Sinkhorn queue; older ones hold the centers only
        meta.dino_loss.load_state_dict(state["losses"]["cls"])
        meta.ibot_loss.load_state_dict(state["losses"]["patch"])
        if meta.gitd_loss is not None:
            meta.gitd_loss.load_state_dict(state["losses"]["global"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], training.generator)
    return int(state["step"]), float(state.get("train_seconds", 0.0))


def _write_run_config(
    out: Path,
    config: PretrainConfig,
    training: _Training,
    world_size: int,
    start_step: int,
    saved: dict[str, Any] | None,
) -> None:
    """``config.yaml`` (with the effective lr), and the warnings about schedules that would surprise."""
    make_dir(out)
    with output_errors(out / "config.yaml"):
        (out / "config.yaml").write_text(annotate_effective_lr(config.to_yaml(), config, world_size))
    for message in schedule_warnings(
        config, training.schedules, world_size, start_step, saved["schedules"] if saved is not None else None
    ):
        warnings.warn(message, stacklevel=1)


def _student_across_processes(student: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """The student as the step calls it: wrapped in DistributedDataParallel when there are several processes."""
    if not ctx.enabled:
        return student
    return DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(
        device.type,
        dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
        enabled=precision in ("bf16", "fp16"),
    )


def _views_of(sample: dict[str, Any]) -> torch.Tensor:
    """A batch's (or one volume's) views; a bad file it met is raised as its one-line error."""
    if "error" in sample:
        if sample["bad_file"]:
            raise SmartformerError(
                sample["error"] + " (pass {setting} to leave such files out)", setting="data.skip_bad", value=True
            )
        raise SmartformerError(sample["error"])
    return sample["views"]


def _apply_schedules(optimizer: torch.optim.Optimizer, scheduled: dict[str, float]) -> None:
    """This step's lr, and its weight decay in the groups that decay."""
    for group in optimizer.param_groups:
        group["lr"] = scheduled["lr"]
        if group["apply_wd"]:
            group["weight_decay"] = scheduled["wd"]


def _optimizer_step(training: _Training, loss: torch.Tensor, step: int, optim: OptimConfig) -> torch.Tensor:
    """Backward (loss-scaled for fp16), clip, keep the last layer frozen early on, AdamW; the grad norm."""
    optimizer, scaler = training.optimizer, training.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(training.meta.student.parameters(), optim.clip_grad)
    if step < optim.freeze_last_layer_steps:
        for p in training.meta.last_layer_parameters():
            p.grad = None
    scaler.step(optimizer)
    scaler.update()
    return grad_norm


class _Clock:
    """Training seconds, summed over the invocations of a resumed run, against ``train.max_minutes``."""

    def __init__(self, seconds_before: float, max_minutes: float) -> None:
        self.seconds_before = seconds_before
        self.max_minutes = max_minutes
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.max_minutes > 0 and self.seconds() >= 60.0 * self.max_minutes


def _check_step(
    terms: dict[str, float],
    step: int,
    stop: _StopFlag,
    clock: _Clock,
    out: Path,
    ctx: DistContext,
    device: torch.device,
) -> tuple[bool, bool]:
    """Whether any process was asked to stop, and whether the time budget is spent (all agree).

    Raises:
        SmartformerError: the loss is not finite on some process (nothing is saved).
    """
    bad, stop_requested, time_up = _all_reduce_max(
        [0.0 if math.isfinite(terms["loss"]) else 1.0, float(stop.requested), float(clock.out_of_time())], ctx, device
    )
    if bad:
        good = last_checkpoint(out)
        losses = ", ".join(f"{k}={v:.4g}" for k, v in terms.items() if k.startswith("loss"))
        raise SmartformerError(
            f"non-finite loss at step {step} ({losses}); "
            f"stopped without saving: the last good checkpoint is {good or 'none (no checkpoint yet)'}"
        )
    return bool(stop_requested), bool(time_up)


class _RunLog:
    """Rank 0's record of a run: metric rows with throughput, the collapse warning, teacher snapshots."""

    def __init__(self, out: Path, config: PretrainConfig, world_size: int, start_step: int) -> None:
        self.out = out
        self.config = config
        self.volumes_per_step = config.data.batch_size * world_size
        # A fresh start (step 0) drops the rows of an earlier attempt; a resume keeps those up to its step.
        self.writer = MetricsWriter(out, resume_step=start_step)
        self.data_wait = self.compute = 0.0  # seconds since the last row
        self.window_steps = 0
        self.collapse_warned = False
        self.last: dict[str, float] = {}  # the last row written

    def count(self, data_wait: float, compute: float) -> None:
        self.data_wait += data_wait
        self.compute += compute
        self.window_steps += 1

    def row(
        self,
        step: int,
        terms: dict[str, float],
        scheduled: dict[str, float],
        grad_norm: torch.Tensor,
        masking_attention: bool,
    ) -> None:
        """One row of ``metrics.jsonl``: the loss terms, schedules, grad norm and the throughput since the last."""
        elapsed = self.data_wait + self.compute
        self.last = {
            **terms,
            **scheduled,
            "grad_norm": float(grad_norm),
            "steps_per_s": self.window_steps / elapsed,
            "volumes_per_s": self.window_steps * self.volumes_per_step / elapsed,
            "data_wait_s": self.data_wait / self.window_steps,
            "data_wait_frac": self.data_wait / elapsed,
            "masking_attention": float(masking_attention),
        }
        self.writer.write(step, self.last)
        if not self.collapse_warned and step > self.config.loss.warmup_teacher_temp_steps:
            message = collapse_message(self.last)
            if message:
                warnings.warn(f"step {step}: {message}", stacklevel=1)
                self.collapse_warned = True
        self.data_wait = self.compute = 0.0
        self.window_steps = 0

    def teacher(self, meta: SMARTMetaArch, volume: torch.Tensor, step: int) -> None:
        """The teacher's head diversity and attention snapshot on one fixed volume, when due."""
        tc = self.config.train
        if tc.head_distance_every and step % tc.head_distance_every == 0 and isinstance(meta.teacher.backbone, Swin3D):
            self.writer.write(step, head_distance_entropy(meta.teacher.backbone, volume))
        if (step % tc.snapshot_every == 0 or step == tc.max_steps) and meta.teacher.has_attention:
            png = attention_snapshot(
                meta.teacher,
                volume,
                self.out / "snapshots" / f"attention_step{step:07d}.png",
                title=f"teacher attention, step {step}",
            )
            self.writer.image("attention/teacher", png, step)


def _save(
    training: _Training,
    step: int,
    config: PretrainConfig,
    clock: _Clock,
    out: Path,
    ctx: DistContext,
    log: _RunLog | None,
) -> None:
    """Check the replicas agree, then (rank 0) ``checkpoints/last.pt`` (+ ``step_N.pt``) and ``teacher/``.

    Raises:
        SmartformerError: the processes' weights differ.
    """
    divergence = replica_divergence(training.meta, ctx)  # student and teacher
    if divergence > 0:
        raise SmartformerError(f"process replicas diverged at step {step} (max |diff| {divergence:.3g})")
    if log is not None:
        if ctx.enabled:
            log.writer.write(step, {"replica_max_abs_diff": divergence})
        tc = config.train
        state = _checkpoint_state(training, step, config, clock.seconds())
        save_checkpoint(state, out, step, keep=tc.keep_checkpoints and step % tc.checkpoint_every == 0)
        with output_errors(out / "teacher"):
            training.meta.teacher.save_pretrained(out / "teacher")
    if ctx.enabled:
        dist.barrier()


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


def _run(
    data, out: Path, config: PretrainConfig, resume: bool, progress: bool, ctx: DistContext, device: torch.device
) -> dict[str, Any]:
    tc = config.train
    checkpoint_path, saved = _checkpoint_to_resume(out, resume, ctx)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    precision = resolve_precision(tc.precision, device)
    training = _start_training(config, ctx, device, precision)
    start_step, seconds_before = 0, 0.0  # seconds_before: training time of earlier invocations (resume)
    if saved is not None:
        start_step, seconds_before = _restore(training, saved, checkpoint_path, config)
    meta = training.meta
    student = compile_student(_student_across_processes(meta.student, ctx, device), tc.compile)

    # The data first (every file checked): a run that cannot start leaves no config.yaml, so it
    # is no run that --resume would take up.
    stream = build_pretrain_loader(
        data,
        config.data,
        config.data.cache_dir or default_cache_dir(out),
        tc.seed,
        ctx.rank,
        ctx.world_size,
        start_step,
    )
    if ctx.is_main:
        _write_run_config(out, config, training, ctx.world_size, start_step, saved)
    autocast = _autocast(device, precision)
    log = _RunLog(out, config, ctx.world_size, start_step) if ctx.is_main else None
    verbose = progress and ctx.is_main
    if verbose:
        tqdm.write(
            f"pretraining {config.preset} on {stream.n_volumes} volumes, {ctx.world_size} process(es), {device}, "
            f"{precision}; steps {start_step}->{tc.max_steps}, batch {config.data.batch_size}x{ctx.world_size}, "
            f"run dir {out}"
        )
    meta.train()
    status = "completed"
    step = start_step
    snapshot_volume = None  # one fixed volume for the teacher's attention snapshots (rank 0)
    bar = tqdm(total=tc.max_steps, initial=start_step, unit="step", disable=not verbose, dynamic_ncols=True)
    batches = iter(stream.loader)
    clock = _Clock(seconds_before, tc.max_minutes)
    try:
        with _StopFlag(verbose) as stop:
            if clock.out_of_time():  # a resumed run whose budget is already used up
                status = "time_budget"
            while status == "completed" and step < tc.max_steps:
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                views = _views_of(batch).to(device, non_blocking=True)
                local_views = batch.get("local_views")  # (B, L, 1, *local_roi) with data.local_views
                if local_views is not None:
                    local_views = local_views.to(device, non_blocking=True)
                if snapshot_volume is None and ctx.is_main:
                    snapshot_volume = _views_of(stream.views[0])[:1].to(device)
                scheduled = training.schedules.at(step)
                _apply_schedules(training.optimizer, scheduled)
                result = meta(
                    views,
                    step,
                    scheduled["teacher_temp"],
                    generator=training.generator,
                    student=student,
                    autocast=autocast,
                    local_views=local_views,
                )
                stop_requested, time_up = _check_step(result.terms, step, stop, clock, out, ctx, device)
                grad_norm = _optimizer_step(training, result.loss, step, config.optim)
                meta.after_step(result, scheduled["momentum"])  # teacher EMA, centers
                step += 1
                t2 = time.perf_counter()
                bar.update(1)
                bar.set_postfix(loss=f"{result.terms['loss']:.4f}", refresh=False)
                if log is not None:
                    log.count(t1 - t0, t2 - t1)
                    if step % tc.log_every == 0 or step == tc.max_steps:
                        log.row(step, result.terms, scheduled, grad_norm, meta.masker.needs_attention(step - 1))
                    log.teacher(meta, snapshot_volume, step)
                if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop_requested or time_up:
                    _save(training, step, config, clock, out, ctx, log)
                if stop_requested or time_up:
                    status = "interrupted" if stop_requested else "time_budget"
                    if verbose and not stop_requested:
                        tqdm.write(f"train.max_minutes={tc.max_minutes:g} reached at step {step}; saved")
    finally:
        bar.close()
        if log is not None:
            log.writer.close()
    checkpoint = last_checkpoint(out)
    return {
        "status": status,
        "step": step,
        "max_steps": tc.max_steps,
        "train_seconds": clock.seconds(),
        "run_dir": str(out),
        "teacher": str(out / "teacher"),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "metrics": log.last if log is not None else {},
        "world_size": ctx.world_size,
    }
