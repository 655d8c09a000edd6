"""How the kernel tests run: compiled on a GPU; on the CPU under Triton's interpreter.

Triton turns its interpreter on only if TRITON_INTERPRET=1 is set when it is first imported,
and the engine's tests in the same pytest process need it off. So on the CPU, unless the
variable is set, a kernel test file runs itself in a child process with it (`child_run`), and
its kernel tests are skipped in the parent (`runs_kernels`): those are the many skips that
`pytest` reports on the CPU.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
HEAD_DIMS = [64, 128] if ON_GPU else [32]
NEEDS_CHILD = not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1"
runs_kernels = pytest.mark.skipif(NEEDS_CHILD, reason="runs in a child with TRITON_INTERPRET=1")


def cases(*axes: list) -> list:
    """Parameter combinations for `pytest.mark.parametrize`: each value of the first axis (the
    dtype, mostly) meets every value of each other axis, rotated so that the values pair up
    differently for each first value. The rest of the full product is marked `exhaustive`: the
    default run leaves it out (pyproject.toml), `pytest -m exhaustive` runs it. On the GPU each
    combination compiles kernels of its own; on the CPU the interpreter is slow."""
    first, *rest = axes
    width = max(len(axis) for axis in rest)
    few = [
        (value, *(axis[(i + j) % len(axis)] for axis in rest))
        for i, value in enumerate(first)
        for j in range(width)
    ]
    others = [case for case in itertools.product(*axes) if case not in few]
    return few + [pytest.param(*case, marks=pytest.mark.exhaustive) for case in others]


def child_run(path: str):
    """A test that runs the test file at `path` under the interpreter, in a child process: the
    default cases, or with `-m exhaustive` the rest."""

    @pytest.mark.skipif(not NEEDS_CHILD, reason="the kernels run in this process")
    @pytest.mark.parametrize(
        "selection", ["not exhaustive", pytest.param("exhaustive", marks=pytest.mark.exhaustive)]
    )
    def test_under_the_triton_interpreter(selection):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", selection]
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        child = subprocess.run(
            [*command, path], env=env, capture_output=True, text=True, check=False
        )
        assert child.returncode == 0, child.stdout[-5000:] + child.stderr[-2000:]

    return test_under_the_triton_interpreter


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """Every buffer a kernel wrapper allocates starts as NaN: an unwritten output fails."""

    def poisoned(allocate):  # the wrappers allocate in all three ways; integers cannot be NaN
        return lambda *a, **k: (t := allocate(*a, **k)).fill_(
            float("nan") if t.is_floating_point() else -1
        )

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
