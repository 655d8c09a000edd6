"""Next-token choice for a batch, called by the model runner, with per-row settings in vLLM's
order (`sample`). argmax(logits / T - log E), E ~ Exp(1), is a softmax draw that needs no softmax,
and a seeded row draws its E from its own generator. The logprob is under the raw distribution
(before penalties and filters), what evaluation compares. Nothing here waits for the device."""

import torch

from nanozipage.context import to_device
from nanozipage.sequence import PENDING, Sequence


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


class Sampler:
    """Rank 0's sampler: a batch's settings as tensors for `sample`, and the penalty counts."""

    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: set[int]):
        self.device = device
        self.token_counts = TokenCounts(vocab_size, device)
        self.count_rows: dict[Sequence, int] = {}  # penalized requests' rows, until they end
        # The EOS ids banned before min_tokens (those that are rows of the logits)
        self.eos_token_ids = {t for t in eos_token_ids if t < vocab_size}

    def tensor(self, data, dtype=torch.int32) -> torch.Tensor:
        return to_device(data, self.device, dtype)

    def __call__(self, seqs: list[Sequence], logits: torch.Tensor):
        """Token ids and logprobs (or None), on the device."""
        params = [seq.sampling_params for seq in seqs]
        for seq, p in zip(seqs, params):
            if p.seed is not None and seq.generator is None:  # each sample its own stream
                seed = (p.seed + seq.sample_index * 0x9E3779B97F4A7C15) % 2**64
                seq.generator = torch.Generator(self.device).manual_seed(seed)
        extra, f32 = {}, torch.float32
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            extra["top_ks"] = self.tensor([p.top_k for p in params])
            extra["top_ps"] = self.tensor([p.top_p for p in params], f32)
        if any(p.min_p > 0 for p in params):
            extra["min_ps"] = self.tensor([p.min_p for p in params], f32)
        penalties = [
            (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params
        ]
        if any(x != (1, 0, 0) for x in penalties):
            rows = self._count_rows(seqs, [x != (1, 0, 0) for x in penalties])
            extra["token_counts"] = self.token_counts
            extra["rows"] = self.tensor(rows, torch.long)
            extra["penalties"] = self.tensor(penalties, f32)
        banned = [  # (row, id) before min_tokens, as vLLM: EOS and stop ids are not sampled
            (row, t)
            for row, (seq, p) in enumerate(zip(seqs, params))
            if seq.num_completion_tokens < p.min_tokens
            for t in {*p.stop_token_ids, *(() if p.ignore_eos else self.eos_token_ids)}
        ]
        if banned:
            extra["banned"] = self.tensor(banned, torch.long).T
        return sample(
            logits,
            temperatures=self.tensor([p.temperature for p in params], f32),
            generators=[seq.generator for seq in seqs],
            greedy=all(p.temperature == 0 for p in params),
            want_logprobs=any(p.logprobs for p in params),
            **extra,
        )

    def _count_rows(self, seqs: list[Sequence], penalized: list[bool]) -> list[int]:
        """Each penalized request's row of token counts (-1 for the others), made at its first
        sample and kept across preemption until the request ends (`forget`)."""
        for seq in (seq for seq, p in zip(seqs, penalized) if p and seq not in self.count_rows):
            output = [t for t in seq.completion_token_ids if t != PENDING]
            self.count_rows[seq] = self.token_counts.add_row(seq.prompt_token_ids, output)
        return [self.count_rows[seq] if p else -1 for seq, p in zip(seqs, penalized)]

    def forget(self, seq: Sequence):
        """seq has ended: its row of token counts goes back."""
        if seq in self.count_rows:
            self.token_counts.free_row(self.count_rows.pop(seq))


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
    rows and penalties as in `TokenCounts.penalize`. A feature's arguments are None when no row
    uses it (known on the host), so the common case costs no sort and no device sync."""
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
