"""``train.compile``: the student's forward + backward through ``torch.compile``, or eager where it cannot be.

``torch.compile`` compiles lazily, at the first call, and can fail there for reasons outside the
project (no C++ compiler for inductor's CPU code, a torch build without Triton on CUDA, an
unsupported operator). :func:`compile_student` wraps the module so that such a failure costs one
warning and the run continues eagerly with the same module (same parameters, same state): a
compile option that stops a pretraining run at step 1 would be worse than none.

Measured on a 2-core CPU (docs/BENCHMARKS.md, attention-maps section): compiling the ``tiny``
preset's student step had not finished after 400 s (an eager step takes 3-6 s), hence the default
``train.compile=false``; on CUDA it is worth a try.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["compile_student", "CompiledWithFallback"]


class CompiledWithFallback:
    """Calls ``torch.compile(module)``; on an error at the first call, warns once and calls ``module``.

    Only the first call can fall back: a compiled module that has run once has compiled its graph
    (later recompilations for new shapes that fail raise, as they would mean a different error).
    """

    def __init__(self, module: nn.Module, **compile_kwargs: Any) -> None:
        self.module = module
        self.compiled: Any = torch.compile(module, **compile_kwargs)
        self._first = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.module(*args, **kwargs)
        if not self._first:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:  # any compiler failure: dynamo, inductor, a missing toolchain
            self.compiled = None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(
                f"train.compile: torch.compile failed ({type(exc).__name__}: {first[:300]}); "
                "training continues without it",
                stacklevel=2,
            )
            return self.module(*args, **kwargs)
        self._first = False
        return out

    def __getattr__(self, name: str) -> Any:  # e.g. .module, .parameters() as the wrapped module has them
        return getattr(self.__dict__["module"], name)


def compile_student(student: nn.Module, enabled: bool) -> Any:
    """``student`` (possibly DDP-wrapped) as the step calls it: compiled when ``enabled``, with a clean
    eager fallback (:class:`CompiledWithFallback`)."""
    if not enabled:
        return student
    try:
        return CompiledWithFallback(student)
    except Exception as exc:  # torch.compile itself refused (e.g. an unsupported Python version)
        warnings.warn(
            f"train.compile: torch.compile is unavailable ({type(exc).__name__}: {exc}); training continues without it",
            stacklevel=2,
        )
        return student
