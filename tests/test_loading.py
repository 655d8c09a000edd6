"""Loading a checkpoint: every parameter exactly once or a clear error, architecture detection,
and hub ids found in the local Hugging Face cache."""

import json
import os
import re
import shutil
import time

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


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_config_without_architectures_is_detected_from_model_type(tmp_path, arch):
    model = make_tiny_model(arch, tmp_path)
    tokens = greedy_tokens(model)
    path = os.path.join(model, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["architectures"]
    with open(path, "w") as f:
        json.dump(config, f)
    assert greedy_tokens(model) == tokens


def test_hub_id_loads_from_the_hugging_face_cache(tmp_path, monkeypatch):
    model = make_tiny_model("qwen3", tmp_path / "model")
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(model, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    llm = LLM("org/tiny", **SMALL)
    assert llm.config.model == str(snapshot)
    assert greedy_tokens("org/tiny") == greedy_tokens(model)


@pytest.mark.parametrize("name", ["org/not-cached", "not/a/repo/id"])
def test_model_in_neither_place_raises_quickly(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(
        ValueError, match=re.escape(f"not in the Hugging Face cache at {tmp_path};")
    ):
        LLM(name, **SMALL)
    assert time.monotonic() - start < 5
