"""The decoder: one implementation of Qwen3, Qwen2 and Llama, switched by the checkpoint config.

Qwen3 has q/k RMSNorm per head, Qwen2 a bias on q, k and v, Llama neither; attention, the norms,
the activation and one token's projections go through `kernels/`, the rest is plain PyTorch.
Each layer holds shard `rank` of `ranks` (the process group is `parallel.py`'s), loaded by its
`weight_loader`, which packs q/k/v and gate/up."""

import glob
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from nanozipage.context import get_context
from nanozipage.kernels import (
    add_rms_norm,
    decode_attention,
    gemv,
    prefill_attention,
    rope_store_kv,
    silu_and_mul,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        return add_rms_norm(x, residual, self.weight, self.eps)


class Rotary(nn.Module):
    """The cos | sin table of every position, shared by the layers (applied in `rope_store_kv`)."""

    def __init__(self, hf: dict, head_dim: int, max_positions: int):
        super().__init__()
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":  # Llama 3.1 / DeepSeek-R1-Distill-Llama: stretch low frequencies
            factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
            old_len = rope["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
            inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        elif rope_type != "default":
            raise ValueError(f"model: rope type {rope_type!r} is not supported (default, llama3)")
        freqs = torch.outer(torch.arange(max_positions).float(), inv_freq.float())
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b. One token on the GPU (a decode step at batch 1) goes through `gemv`, where
    cuBLAS reads the weights well under the copy rate or splits K (BENCHMARKS.md)."""
    if len(x) != 1 or not x.is_cuda:
        return F.linear(x, weight, bias)
    y = gemv(x, weight)
    return y if bias is None else y + bias


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b, W (q|k|v or gate|up, each split evenly) split by rows over the ranks."""

    def __init__(self, in_features: int, shards: list[int], bias: bool, rank: int, ranks: int):
        super().__init__()
        self.rank = rank
        self.sizes = [size // ranks for size in shards]
        self.weight = nn.Parameter(torch.empty(sum(self.sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.sizes))) if bias else None

    def weight_loader(self, param: nn.Parameter, tensor, shard: int):
        start, size = sum(self.sizes[:shard]), self.sizes[shard]
        param[start : start + size].copy_(tensor[self.rank * size : (self.rank + 1) * size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b, W split by columns over the ranks: an all-reduce sums the partial products."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, ranks: int):
        super().__init__()
        self.rank, self.ranks = rank, ranks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.ranks))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def weight_loader(self, param: nn.Parameter, tensor, shard: int = 0):
        if param is self.bias:
            param.copy_(tensor[:])
        else:
            size = param.shape[1]
            param.copy_(tensor[:, self.rank * size : (self.rank + 1) * size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias if self.rank == 0 else None)  # the bias once
        if self.ranks > 1:
            dist.all_reduce(y)
        return y


class VocabParallelEmbedding(nn.Module):
    """The token ids split over the ranks (the last padded with zero rows): each rank looks up
    the ids it holds, zeros for the others, and one all-reduce assembles the vectors."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, ranks: int):
        super().__init__()
        self.rank, self.ranks = rank, ranks
        self.vocab_size, self.rows = vocab_size, -(-vocab_size // self.ranks)
        self.start = self.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size))

    def weight_loader(self, param: nn.Parameter, tensor, shard: int = 0):
        rows = tensor[self.start : self.start + self.rows]
        param[: len(rows)].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ranks == 1:
            return F.embedding(input_ids, self.weight)
        ids = input_ids - self.start
        mine = (ids >= 0) & (ids < self.rows)
        x = F.embedding(ids.clamp(0, self.rows - 1), self.weight).masked_fill(~mine[:, None], 0)
        dist.all_reduce(x)
        return x


class ParallelLMHead(VocabParallelEmbedding):
    """Split like the embedding: each rank's logits are gathered on rank 0, the one that samples."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(hidden, self.weight)
        if self.ranks == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.ranks)] if self.rank == 0 else None
        dist.gather(logits, parts, dst=0)
        return None if parts is None else torch.cat(parts, -1)[:, : self.vocab_size]


class Attention(nn.Module):
    def __init__(self, hf: dict, rotary: Rotary, rank: int, ranks: int):
        super().__init__()
        hidden, num_heads = hf["hidden_size"], hf["num_attention_heads"]
        num_kv_heads = hf.get("num_key_value_heads", num_heads)
        self.head_dim = hf.get("head_dim") or hidden // num_heads
        q_size, kv_size = num_heads * self.head_dim, num_kv_heads * self.head_dim
        qwen2 = hf["architectures"][0] == "Qwen2ForCausalLM"
        bias = qwen2 or hf.get("attention_bias", False)
        self.qkv_proj = ColumnParallelLinear(hidden, [q_size, kv_size, kv_size], bias, rank, ranks)
        o_bias = hf.get("attention_bias", False) and not qwen2
        self.o_proj = RowParallelLinear(q_size, hidden, o_bias, rank, ranks)
        self.eps = hf["rms_norm_eps"]
        # This rank's heads: a GQA group never spans two ranks (the config checks divisibility).
        self.num_heads, self.num_kv_heads = num_heads // ranks, num_kv_heads // ranks
        self.qk_norm = hf["architectures"][0] == "Qwen3ForCausalLM"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, self.eps)
            self.k_norm = RMSNorm(self.head_dim, self.eps)
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        self.k_cache = self.v_cache = self.q_cache = torch.empty(0)  # views of the engine's caches

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        # Where the new k and v go, and their q too for the tokens a compression will score.
        store = (self.k_cache, self.v_cache, ctx.slot_mapping, self.q_cache, ctx.query_rows)
        q = rope_store_kv(qkv, positions, self.rotary.cos_sin, *norms, self.eps, *store)
        kv, paged = (self.k_cache, self.v_cache), (ctx.context_lens, ctx.block_tables)
        if ctx.is_prefill:
            o = prefill_attention(q, *kv, ctx.cu_seqlens_q, *paged, ctx.max_seqlen_q, self.scale)
        else:
            o = decode_attention(q, *kv, *paged, self.scale)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, hf: dict, rank: int, ranks: int):
        super().__init__()
        inter, hidden = hf["intermediate_size"], hf["hidden_size"]
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter], False, rank, ranks)
        self.down_proj = RowParallelLinear(inter, hidden, False, rank, ranks)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, hf: dict, rotary: Rotary, rank: int, ranks: int):
        super().__init__()
        self.self_attn = Attention(hf, rotary, rank, ranks)
        self.mlp = MLP(hf, rank, ranks)
        self.input_layernorm = RMSNorm(hf["hidden_size"], hf["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(hf["hidden_size"], hf["rms_norm_eps"])

    def forward(self, positions, x, residual):
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Decoder(nn.Module):
    def __init__(self, hf: dict, rank: int, ranks: int):
        super().__init__()
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        rotary = Rotary(hf, head_dim, hf.get("max_position_embeddings", 32768))
        self.embed_tokens = VocabParallelEmbedding(hf["vocab_size"], hf["hidden_size"], rank, ranks)
        self.layers = nn.ModuleList(
            DecoderLayer(hf, rotary, rank, ranks) for _ in range(hf["num_hidden_layers"])
        )
        self.norm = RMSNorm(hf["hidden_size"], hf["rms_norm_eps"])

    def forward(self, input_ids, positions):
        x = self.embed_tokens(input_ids)
        residual = torch.zeros_like(x)  # x + 0 is x exactly: the first layer adds nothing
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class CausalLM(nn.Module):
    def __init__(self, hf: dict, rank: int = 0, ranks: int = 1):
        """This rank's shard of the model (`rank` of `ranks`): the whole model by default."""
        super().__init__()
        self.model = Decoder(hf, rank, ranks)
        self.lm_head = ParallelLMHead(hf["vocab_size"], hf["hidden_size"], rank, ranks)
        if hf.get("tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    @torch.no_grad()
    def load_weights(self, path: str):
        """Write every parameter exactly once (a packed one once per shard), or raise naming the
        tensors missing, unexpected or repeated, or the unreadable file."""
        params = dict(self.named_parameters())
        tied = "lm_head.weight" not in params  # listed as the embedding
        expected = {}  # checkpoint tensor -> (parameter, shard), removed when loaded
        for target in params:
            module = target.split(".")[-2]
            for shard, part in enumerate(PACKED.get(module, [module])):
                expected[target.replace(module, part)] = (target, shard)
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"model: no *.safetensors files in {path!r}")
        for file in files:
            try:
                f = safe_open(file, "pt", "cpu")  # checks that the header covers the whole file
            except (OSError, SafetensorError) as e:
                raise ValueError(f"model: cannot read {file}: {e}") from e
            for name in f.keys():  # noqa: SIM118 (a safetensors file is not iterable)
                if "rotary_emb" in name or (name == "lm_head.weight" and tied):
                    continue  # recomputed; a tied head is the embedding (vLLM skips it too)
                if name not in expected:
                    raise ValueError(f"model: {file} holds {name!r}, unexpected or loaded twice")
                target, shard = expected.pop(name)
                module = self.get_submodule(target.rpartition(".")[0])
                if hasattr(module, "weight_loader"):  # reads only its rank's part of the slice
                    module.weight_loader(params[target], f.get_slice(name), shard)
                else:
                    params[target].copy_(f.get_tensor(name))
        if expected:
            raise ValueError(f"model: {path} lacks {len(expected)} tensors: {sorted(expected)[:4]}")

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0):
        """For `load_format="dummy"`: a generator per matrix, so all ranks' shards are alike."""
        for i, (name, param) in enumerate(self.named_parameters()):  # a tied matrix once
            if param.dim() == 2:
                generator = torch.Generator(param.device).manual_seed(seed + i)
                param.normal_(0, 0.02, generator=generator)
            else:
                param.fill_(0 if name.endswith("bias") else 1)
