"""Tiny random checkpoints made with transformers, and the HF reference they are checked against."""

import torch
import torch.distributed as dist
import transformers

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
ARCHS = {
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32, rope_theta=1e6),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, rope_theta=1e6),
    "llama": lambda: transformers.LlamaConfig(
        **{**TINY, "tie_word_embeddings": True}, rope_theta=1e5
    ),
}


def make_tiny_model(arch: str, path) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch]())
    with torch.no_grad():  # larger weights than the default init, so that logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return str(path)


def check_against_hf(model_dir: str, prompts: list[list[int]], outputs: list[dict]):
    """Teacher-force each prompt + engine output through HF: every engine token must be HF's
    argmax at that position, and the engine's logprob must match HF's."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt + out["token_ids"]])
        with torch.no_grad():
            logprobs = hf(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        tokens = torch.tensor(out["token_ids"])
        top2 = logprobs.topk(2, dim=-1).values
        near_tie = (top2[:, 0] - top2[:, 1]) < 1e-4
        agree = (logprobs.argmax(-1) == tokens) | near_tie
        assert agree.all(), (
            f"greedy tokens differ from HF at {(~agree).nonzero().flatten().tolist()}"
        )
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(out["logprobs"]), chosen, atol=2e-4, rtol=0)


def gather_kv_cache(runner) -> torch.Tensor | None:
    """The KV pool with every rank's KV heads, on rank 0 (None elsewhere): lets the tests compare
    a tensor-parallel engine's cache with a single-rank engine's. Rank 0 has the others run it."""
    if runner.workers:
        runner.workers.call(gather_kv_cache)
    ranks = runner.config.tensor_parallel_size
    if ranks == 1:
        return runner.kv_cache
    parts = [torch.empty_like(runner.kv_cache) for _ in range(ranks)] if runner.rank == 0 else None
    dist.gather(runner.kv_cache, parts, dst=0)
    return None if parts is None else torch.cat(parts, dim=3)  # [2, L, blocks, kvh, b, d]
