"""train.compile (issue 15): compiled where torch.compile works, one warning and eager where it cannot."""

from __future__ import annotations

import warnings

import pytest
import torch

from smartformer.config import load_config
from smartformer.train.compile import CompiledWithFallback, compile_student


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_off_by_default_and_a_no_op():
    assert load_config("tiny", []).train.compile is False
    module = torch.nn.Linear(3, 2)
    assert compile_student(module, False) is module
    assert load_config("tiny", ["train.compile=true"]).train.compile is True


def test_a_module_that_cannot_compile_warns_once_and_runs_eagerly():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    wrapped = CompiledWithFallback(module, backend=_failing_backend)
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="train.compile: torch.compile failed.*continues without it"):
        out = wrapped(x)
    torch.testing.assert_close(out, module(x))
    out.sum().backward()  # gradients flow through the eager module
    assert module[0].weight.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        torch.testing.assert_close(wrapped(x), module(x))
    assert list(wrapped.parameters()) == list(module.parameters())
