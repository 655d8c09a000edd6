"""Loading a checkpoint: every parameter exactly once or a clear error."""

import os
import re

import pytest
import torch
from helpers import make_tiny_model
from safetensors.torch import load_file, save_file

from nanozipage import LLM, SamplingParams

SMALL = {"block_size": 16, "kv_budget": None, "num_kvcache_blocks": 40, "max_model_len": 256}


def greedy_tokens(model: str) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return LLM(model, **SMALL).generate([[1, 2, 3]], params, use_tqdm=False)[0]["token_ids"]


def edit_weights(model_dir: str, edit) -> str:
    """Rewrite the checkpoint's one safetensors file with `edit(tensors)` applied."""
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_missing_tensor_raises_naming_it(tmp_path):
    model = make_tiny_model("qwen3", tmp_path)
    edit_weights(model, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensors: \['model.layers.1.self_attn.k_proj"):
        LLM(model, **SMALL)


def test_unexpected_tensor_raises_naming_it(tmp_path):
    model = make_tiny_model("qwen2", tmp_path)
    edit_weights(model, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.extra.weight', unexpected"):
        LLM(model, **SMALL)


def test_tensor_in_two_files_raises(tmp_path):
    model = make_tiny_model("qwen3", tmp_path)
    path = os.path.join(model, "model.safetensors")
    save_file({"model.norm.weight": load_file(path)["model.norm.weight"]}, f"{model}/x.safetensors")
    with pytest.raises(ValueError, match="'model.norm.weight', unexpected or loaded twice"):
        LLM(model, **SMALL)


def test_truncated_safetensors_file_raises_naming_it(tmp_path):
    model = make_tiny_model("llama", tmp_path)
    path = os.path.join(model, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read {re.escape(path)}"):
        LLM(model, **SMALL)


def test_tied_lm_head_in_the_checkpoint_is_skipped(tmp_path):
    model = make_tiny_model("llama", tmp_path)  # ties the LM head to the embedding
    tokens = greedy_tokens(model)
    save_file({"lm_head.weight": torch.zeros(256, 64)}, f"{model}/z.safetensors")  # read last
    assert greedy_tokens(model) == tokens
