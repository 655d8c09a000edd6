"""Per-request settings for `LLM.generate`, validated when made, before any work starts.

Names and meanings are vLLM's, but `logprobs` is a switch (no alternatives are returned). The
engine checks what only it knows: stop_token_ids against its vocabulary, kv_budget its own."""

import sys
from dataclasses import dataclass

_INT64, _FLOAT_MAX, _REAL = 2**63 - 1, sys.float_info.max, int | float  # for _check


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all, as does k >= vocabulary
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 64
    ignore_eos: bool = False
    logprobs: bool = False  # return the log-probability of each chosen token
    seed: int | None = None  # per-request generator: same seed, same prompt -> same output
    kv_budget: int | None = None  # lower this request's KV budget below the engine's
    n: int = 1  # samples per prompt
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages every token seen in prompt or output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if the token occurs in the output
    stop: str | list[str] | None = None  # strings that end the output; made a list
    stop_token_ids: list[int] | None = None  # ids that end the output besides EOS; made a list
    min_tokens: int = 0  # no EOS or stop id sampled, no stop string matched, before this many
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        _check(self, "temperature", _REAL, 0, _FLOAT_MAX, "a finite number >= 0")
        _check(self, "top_k", int, -1, 2**31 - 1, "-1, 0 (both off) or k >= 1, below 2**31")
        _check(self, "top_p", _REAL, 0, 1, "in (0, 1]", above_lo=True)
        _check(self, "min_p", _REAL, 0, 1, "in [0, 1]")
        _check(self, "repetition_penalty", _REAL, 0, _FLOAT_MAX, "finite and > 0", above_lo=True)
        for name in ("frequency_penalty", "presence_penalty"):
            _check(self, name, _REAL, -2, 2, "in [-2, 2], as in vLLM")
        _check(self, "max_tokens", int, 1, _INT64, "an integer >= 1")
        _check(self, "min_tokens", int, 0, self.max_tokens, "an integer in [0, max_tokens]")
        _check(self, "n", int, 1, _INT64, "an integer >= 1")
        if self.seed is not None:
            _check(self, "seed", int, 0, 2**64 - 1, "None or an integer in [0, 2**64)")
        if self.kv_budget is not None:
            _check(self, "kv_budget", int, 1, _INT64, "None or an integer >= 1")
        for name in ("ignore_eos", "logprobs", "include_stop_str_in_output"):
            if not isinstance(value := getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")  # noqa: TRY004
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        stop, ids = ([] if v is None else v for v in (stop, self.stop_token_ids))
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them: {self.stop!r}")
        if not isinstance(ids, list | tuple) or not all(_is(i, int, 0, _INT64) for i in ids):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0: {ids!r}")
        self.stop, self.stop_token_ids = list(stop), list(ids)


def _is(value, kind, lo, hi) -> bool:
    """A `kind` in [lo, hi] (so never NaN, nor infinite if they are finite), and not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool) and lo <= value <= hi


def _check(params, name, kind, lo, hi, allowed: str, above_lo: bool = False):
    value = getattr(params, name)
    if not _is(value, kind, lo, hi) or (above_lo and value == lo):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
