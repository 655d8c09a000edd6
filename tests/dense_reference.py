"""A dense reference of Compressed PagedAttention: one request, one contiguous cache per layer,
plain PyTorch over the HF model's own modules, greedy decoding, compressed at the same token
boundaries with the same policy functions as the engine. No pages, no batching, no slots."""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from nanozipage.policy import CacheState, make_policy, select


@torch.no_grad()
def dense_generate(hf, prompt: list[int], max_tokens: int, config, kv_budget: int):
    """Greedy tokens, and for every compression the kept cache indices per layer [L, kvh, keep]."""
    b = config.block_size
    n_max = kv_budget // b + 1
    layers = hf.model.layers
    keys, values, queries, scores = ([None] * len(layers) for _ in range(4))
    tokens, kept_log, position = list(prompt), [], 0
    new = list(prompt)
    while len(tokens) - len(prompt) < max_tokens:
        cache_len = 0 if keys[0] is None else keys[0].shape[1]
        if cache_len % b == 0 and cache_len >= n_max * b and len(new) == 1:
            first = not kept_log
            kept_log.append(compress(keys, values, queries, scores, config, kv_budget, first))
        logits = forward(hf, new, position, keys, values, queries, scores)
        position += len(new)
        new = [int(logits.argmax())]
        tokens += new
    return tokens[len(prompt) :], kept_log


def dense_state(keys, queries, prev_scores, first, block_size, layers, keep) -> CacheState:
    """The state of a cache held as dense keys `[layers, kv_heads, T, head_dim]`: a view of them
    as pages, blocks 0..T/block_size-1 in order."""
    k_cache = keys.unflatten(2, (-1, block_size)).transpose(1, 2)  # [layers, N, kvh, b, d]
    table = torch.arange(k_cache.shape[1], device=keys.device)
    return CacheState(k_cache, table, queries, prev_scores, first, layers, keep)


def compress(keys, values, queries, scores, config, keep, first):
    kept_layers, w = [], config.window
    for i in range(len(keys)):
        num_queries = config.first_window if first else w
        queries_i, b = queries[i][None, -num_queries:], config.block_size
        layers = range(i, i + 1)
        state = dense_state(keys[i][None], queries_i, scores[i][None], first, b, layers, keep)
        score, stored = make_policy(config.policy, config.policy_args)(state)
        kept = select(score, keep, w, config.num_sinks)[0]  # [kvh, keep]
        head_dim = keys[i].shape[-1]
        keys[i] = keys[i].gather(1, kept[..., None].expand(-1, -1, head_dim))
        values[i] = values[i].gather(1, kept[..., None].expand(-1, -1, head_dim))
        scores[i] = stored[0].gather(1, kept)
        queries[i] = torch.zeros_like(queries[i][:keep])  # only newer queries are ever used
        kept_layers.append(kept)
    return torch.stack(kept_layers)


def forward(hf, token_ids, start, keys, values, queries, scores):
    n = len(token_ids)
    positions = torch.arange(start, start + n)[None]
    x = hf.model.embed_tokens(torch.tensor(token_ids))
    cos, sin = hf.model.rotary_emb(x[None], positions)
    for i, layer in enumerate(hf.model.layers):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        head_dim = attn.head_dim
        q = attn.q_proj(h).view(n, -1, head_dim)
        k = attn.k_proj(h).view(n, -1, head_dim)
        v = attn.v_proj(h).view(n, -1, head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
        q, k, v = q[0], k[0], v.transpose(0, 1)  # [heads, n, d]
        if keys[i] is None:
            keys[i], values[i] = k, v
            queries[i], scores[i] = q.transpose(0, 1), torch.zeros(k.shape[:2])
        else:
            keys[i], values[i] = torch.cat([keys[i], k], 1), torch.cat([values[i], v], 1)
            queries[i] = torch.cat([queries[i], q.transpose(0, 1)])
            scores[i] = torch.cat([scores[i], torch.zeros(k.shape[:2])], 1)
        group = q.shape[0] // k.shape[0]
        kk = keys[i].repeat_interleave(group, 0)
        vv = values[i].repeat_interleave(group, 0)
        total = kk.shape[1]
        logits = q @ kk.transpose(1, 2) * head_dim**-0.5  # [heads, n, total]
        causal = torch.arange(total)[None] > torch.arange(total - n, total)[:, None]
        o = logits.masked_fill(causal, float("-inf")).softmax(-1) @ vv
        x = x + attn.o_proj(o.transpose(0, 1).flatten(1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return hf.lm_head(hf.model.norm(x[-1:]))[0]
