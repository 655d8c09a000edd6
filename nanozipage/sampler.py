"""Next-token choice for a batch (called by the model runner), per-row settings, vLLM's order:
penalties, then greedy argmax or temperature, min_p, top-k / top-p and the exponential race:
argmax of (logits / T - log E), E ~ Exp(1), draws from the softmax without computing it, and
lets seeded rows use their own generator for E. The logprob is under the raw distribution
(before penalties and filters), what evaluation compares. Nothing here waits for the device."""

import torch

from nanozipage.context import to_device


class TokenCounts:
    """Per-row token histories of requests with a penalty, on the device: `counts` [rows, vocab]
    int32 (times sampled), `in_prompt` [rows, vocab] bool. Made on first use and doubled when
    full, so engines without penalties allocate nothing; the last row stays empty, for row -1."""

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.free_rows: list[int] = []

    def add_row(self, prompt_ids: list[int], output_ids: list[int]) -> int:
        """A new row holding a request's history so far (`record` adds the rest) -> the row."""
        if not self.free_rows:
            self._grow()
        row = self.free_rows.pop()
        ids = to_device(output_ids + prompt_ids, self.counts.device, torch.long)
        output, prompt = ids.tensor_split([len(output_ids)])
        self.counts[row].zero_().scatter_add_(0, output, torch.ones_like(output, dtype=torch.int32))
        self.in_prompt[row].zero_().index_fill_(0, prompt, True)
        return row

    def _grow(self):
        used = max(len(self.counts) - 1, 0)  # all in use: the last row is the empty one
        size = max(2 * used, 4)
        added = (size + 1 - used, self.counts.shape[1])
        self.counts = torch.cat([self.counts[:used], self.counts.new_zeros(added)])
        self.in_prompt = torch.cat([self.in_prompt[:used], self.in_prompt.new_zeros(added)])
        self.free_rows += range(size - 1, used - 1, -1)  # pop() hands out the lowest first

    def free_row(self, row: int):
        self.free_rows.append(row)

    def penalize(self, logits: torch.Tensor, rows: torch.Tensor, penalties: torch.Tensor):
        """logits [B, V]; rows [B]; penalties [B, 3]: repetition, frequency, presence (vLLM's)."""
        counts = self.counts[rows]
        repetition, frequency, presence = penalties.unsqueeze(2).unbind(1)  # each [B, 1]
        repetition = torch.where(self.in_prompt[rows] | (counts > 0), repetition, 1.0)
        logits = torch.where(logits > 0, logits / repetition, logits * repetition)
        return logits - frequency * counts - presence * (counts > 0)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor):
        """Count each row's sampled token, on the device (row -1 adds 0 to the empty row)."""
        self.counts.index_put_((rows, tokens), (rows >= 0).int(), accumulate=True)


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    generators: list[torch.Generator | None],
    greedy: bool,
    want_logprobs: bool,
    top_ks: torch.Tensor | None = None,
    top_ps: torch.Tensor | None = None,
    min_ps: torch.Tensor | None = None,
    token_counts: TokenCounts | None = None,
    rows: torch.Tensor | None = None,
    penalties: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V]; temperatures, top_ps, min_ps float [B]; top_ks int [B] (0 or -1: off);
    rows and penalties as in `TokenCounts.penalize`, which then records the sampled tokens.
    A feature's arguments are None when no row uses it (known on the host), so the common case
    costs no sort, no penalty and no device sync."""
    logits = raw = logits.float()
    if banned is not None:  # [2, n]: rows, and ids they may not sample yet (min_tokens)
        logits = logits.index_put(tuple(banned), torch.tensor(float("-inf"), device=logits.device))
    if penalties is not None:
        logits = token_counts.penalize(logits, rows, penalties)
    tokens = logits.argmax(-1)
    if not greedy:
        scaled = logits / temperatures.clamp(min=1e-5).unsqueeze(1)
        if min_ps is not None:  # p < min_p * max p, in logits (the softmax's normaliser cancels)
            floor = scaled.max(-1, keepdim=True).values + min_ps.log().unsqueeze(1)
            scaled = scaled.masked_fill(scaled < floor, float("-inf"))
        if top_ks is not None:
            scaled = _top_k_top_p(scaled, top_ks, top_ps)
        noise = torch.empty_like(scaled).exponential_()
        for i, gen in enumerate(generators):
            if gen is not None:
                noise[i].exponential_(generator=gen)
        sampled = (scaled - noise.log()).argmax(-1)
        tokens = torch.where(temperatures == 0, tokens, sampled)
    if penalties is not None:
        token_counts.record(rows, tokens)
    logprobs = raw.log_softmax(-1).gather(1, tokens[:, None])[:, 0] if want_logprobs else None
    return tokens, logprobs


def _top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor):
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)
    drop = (top_ks.unsqueeze(1) > 0) & (rank >= top_ks.unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Drop a token once the tokens ranked above it reach top_p < 1 (float32 sums reach 1 early)
    drop = (probs.cumsum(-1) - probs >= top_ps.unsqueeze(1)) & (top_ps.unsqueeze(1) < 1)
    drop[:, 0] = False  # the first stays, also when top_p is 0 in float32 (top_p < 1.4e-45)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
