"""The decoder: one implementation of Qwen3, Qwen2 and Llama, switched by the checkpoint config.

Qwen3 normalises q and k per head (q/k RMSNorm); Qwen2 has a bias on q, k and v; Llama has
neither. Attention reads and writes the paged KV cache through the kernels; everything else is
plain PyTorch. Weights load from the checkpoint's safetensors through a `weight_loader` attached
to each parameter, which also packs q/k/v into one matrix and gate/up into another; with
`load_format="dummy"` they are seeded random values instead (benchmarks of an architecture).
"""

import functools
import glob
import math
import os
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from nanozipage.context import get_context
from nanozipage.kernels import decode_attention, prefill_attention, rope_store_kv


def fused_on_gpu(fn):
    """On the GPU, torch.compile fuses a chain of elementwise ops into one kernel (unfused, a
    decode step launches about 60 tiny kernels per layer); the CPU runs the chain as written."""
    compiled = torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args):
        return compiled(x, *args) if x.is_cuda else fn(x, *args)

    return dispatch


@fused_on_gpu
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype, x = x.dtype, x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


@fused_on_gpu
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + residual
    return rms_norm.__wrapped__(x, weight, eps), x


@fused_on_gpu
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise x, or (x + residual) returning the sum as the new residual."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(hf: dict, head_dim: int) -> torch.Tensor:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "llama3":  # Llama 3.1 / DeepSeek-R1-Distill-Llama: stretch low frequencies
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif rope_type != "default":
        raise ValueError(f"model: rope type {rope_type!r} is not supported (default, llama3)")
    return inv_freq.float()


class Rotary(nn.Module):
    """The cos | sin table of every position, shared by the layers (applied in `rope_store_kv`)."""

    def __init__(self, hf: dict, head_dim: int, max_positions: int):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions).float(), rope_inv_freq(hf, head_dim))
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)


def packed_linear(in_features: int, shards: list[int], bias: bool) -> nn.Linear:
    """A Linear whose output rows are several checkpoint matrices stacked (q|k|v, gate|up)."""
    linear = nn.Linear(in_features, sum(shards), bias=bias)
    offsets = [sum(shards[:i]) for i in range(len(shards))]
    for param in linear.parameters():

        def loader(param, weight, shard, param_offsets=offsets, sizes=shards):
            param.data[param_offsets[shard] : param_offsets[shard] + sizes[shard]].copy_(weight)

        param.weight_loader = loader
    return linear


class Attention(nn.Module):
    def __init__(self, hf: dict, rotary: Rotary):
        super().__init__()
        hidden, self.num_heads = hf["hidden_size"], hf["num_attention_heads"]
        self.num_kv_heads = hf.get("num_key_value_heads", self.num_heads)
        self.head_dim = hf.get("head_dim") or hidden // self.num_heads
        self.q_size, self.kv_size = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        qwen2 = hf["architectures"][0] == "Qwen2ForCausalLM"
        bias = qwen2 or hf.get("attention_bias", False)
        self.qkv_proj = packed_linear(hidden, [self.q_size, self.kv_size, self.kv_size], bias)
        self.o_proj = nn.Linear(
            self.q_size, hidden, bias=hf.get("attention_bias", False) and not qwen2
        )
        self.eps = hf["rms_norm_eps"]
        self.qk_norm = hf["architectures"][0] == "Qwen3ForCausalLM"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, self.eps)
            self.k_norm = RMSNorm(self.head_dim, self.eps)
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)  # views into the engine's KV pool
        self.q_cache = torch.empty(0)  # window queries, for compression scores

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        ctx = get_context()
        q = rope_store_kv(
            qkv, positions, self.rotary.cos_sin, *norms, self.eps,
            self.k_cache, self.v_cache, ctx.slot_mapping, self.q_cache, ctx.query_rows,
        )  # fmt: skip
        if ctx.is_prefill:
            o = prefill_attention(
                q,
                self.k_cache,
                self.v_cache,
                ctx.cu_seqlens_q,
                ctx.context_lens,
                ctx.block_tables,
                ctx.max_seqlen_q,
                self.scale,
            )
        else:
            o = decode_attention(
                q, self.k_cache, self.v_cache, ctx.context_lens, ctx.block_tables, self.scale
            )
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, hf: dict):
        super().__init__()
        inter = hf["intermediate_size"]
        self.gate_up_proj = packed_linear(hf["hidden_size"], [inter, inter], bias=False)
        self.down_proj = nn.Linear(inter, hf["hidden_size"], bias=False)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, hf: dict, rotary: Rotary):
        super().__init__()
        self.self_attn = Attention(hf, rotary)
        self.mlp = MLP(hf)
        self.input_layernorm = RMSNorm(hf["hidden_size"], hf["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(hf["hidden_size"], hf["rms_norm_eps"])

    def forward(self, positions, x, residual):
        x, residual = (
            self.input_layernorm(x, residual)
            if residual is not None
            else (self.input_layernorm(x), x)
        )
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Decoder(nn.Module):
    def __init__(self, hf: dict):
        super().__init__()
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        rotary = Rotary(hf, head_dim, hf.get("max_position_embeddings", 32768))
        self.embed_tokens = nn.Embedding(hf["vocab_size"], hf["hidden_size"])
        self.layers = nn.ModuleList(
            DecoderLayer(hf, rotary) for _ in range(hf["num_hidden_layers"])
        )
        self.norm = RMSNorm(hf["hidden_size"], hf["rms_norm_eps"])

    def forward(self, input_ids, positions):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    packed: ClassVar = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf: dict):
        super().__init__()
        self.model = Decoder(hf)
        self.lm_head = nn.Linear(hf["hidden_size"], hf["vocab_size"], bias=False)
        if hf.get("tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, path: str):
        params = dict(self.named_parameters(remove_duplicate=False))
        files = glob.glob(os.path.join(path, "*.safetensors"))
        if not files:
            raise ValueError(f"model: no *.safetensors files in {path!r}")
        for file in files:
            with safe_open(file, "pt", "cpu") as f:
                for name in f.keys():  # noqa: SIM118 (a safetensors file is not iterable)
                    if "rotary_emb" in name:
                        continue
                    for part, (packed_name, shard) in self.packed.items():
                        if f".{part}." in name:
                            param = params[name.replace(part, packed_name)]
                            param.weight_loader(param, f.get_tensor(name), shard)
                            break
                    else:
                        params[name].copy_(f.get_tensor(name))

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0):
        """Weights for `load_format="dummy"`, made in place on each parameter's device: matrices
        normal(0, 0.02), norm weights one, biases zero. Each parameter draws from its own
        generator (seeded by its index), so the values do not depend on other parameters' sizes,
        and a parameter holding only a shard of a matrix is filled all the same."""
        for i, (name, param) in enumerate(self.named_parameters()):  # a tied matrix once
            if param.dim() == 2:
                generator = torch.Generator(param.device).manual_seed(seed + i)
                param.normal_(0, 0.02, generator=generator)
            else:
                param.fill_(0 if name.endswith("bias") else 1)
