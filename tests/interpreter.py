"""How the kernel tests run: compiled on a GPU; on the CPU under Triton's interpreter.

Triton turns its interpreter on only if TRITON_INTERPRET=1 is set when it is first imported,
and the engine's tests in the same pytest process need it off. So on the CPU, unless the
variable is set, a kernel test file runs itself in a child process with it (`child_run`), and
its kernel tests are skipped in the parent (`runs_kernels`).
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


def cases(*axes: list) -> list[tuple]:
    """Parameter combinations for `pytest.mark.parametrize`: every one on the CPU, where the
    interpreter runs them cheaply. On the GPU each combination compiles kernels of its own, so
    there the first axis (the dtype) meets every value of each other axis, rotated so that the
    values pair up differently for each dtype, rather than the whole product."""
    if not ON_GPU:
        return list(itertools.product(*axes))
    first, *rest = axes
    width = max(len(axis) for axis in rest)
    return [
        (value, *(axis[(i + j) % len(axis)] for axis in rest))
        for i, value in enumerate(first)
        for j in range(width)
    ]


def child_run(path: str):
    """A test that runs the test file at `path` under the interpreter, in a child process."""

    @pytest.mark.skipif(not NEEDS_CHILD, reason="the kernels run in this process")
    def test_under_the_triton_interpreter():
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        child = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        assert child.returncode == 0, child.stdout[-5000:] + child.stderr[-2000:]

    return test_under_the_triton_interpreter


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """Every buffer a kernel wrapper allocates starts as NaN: an unwritten output fails."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
