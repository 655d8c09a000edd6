"""Next-token choice for a batch, each row with its own sampling settings.

Greedy rows take the argmax. Sampled rows divide the logits by their temperature, drop tokens
outside top-k / top-p, and draw with the exponential-race trick: argmax of p / E with
E ~ Exp(1), i.e. argmax of (logits / T - log E), which equals drawing from p, needs no softmax,
and lets seeded rows use their own generator for E. The returned
log-probability is that of the chosen token under the model's own distribution (before
temperature, top-k and top-p), which is what evaluation and fidelity checks compare.
"""

import torch


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor | None,
    top_ps: torch.Tensor | None,
    generators: list[torch.Generator | None],
    greedy: bool,
    want_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V]; temperatures, top_ps float [B]; top_ks int [B] (0: off). -> tokens, logprobs.

    top_ks / top_ps are None when no row uses them; the caller knows that on the host, so the
    common case costs no sort and no device sync."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    if not greedy:
        scaled = logits / temperatures.clamp(min=1e-5).unsqueeze(1)
        if top_ks is not None:
            scaled = _top_k_top_p(scaled, top_ks, top_ps)
        noise = torch.empty_like(scaled).exponential_()
        for i, gen in enumerate(generators):
            if gen is not None:
                noise[i].exponential_(generator=gen)
        sampled = (scaled - noise.log()).argmax(-1)
        tokens = torch.where(temperatures == 0, tokens, sampled)
    logprobs = None
    if want_logprobs:
        logprobs = logits.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs


def _top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor):
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)
    drop = (top_ks.unsqueeze(1) > 0) & (rank >= top_ks.unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
    drop = probs.cumsum(-1) - probs >= top_ps.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
