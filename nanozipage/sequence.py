"""A request as the scheduler and block manager see it: token ids, progress and its blocks."""

from enum import Enum, auto
from itertools import count

from nanozipage.config import max_blocks
from nanozipage.sampling_params import SamplingParams

# A sampled token still on the GPU: the next step reads it there (`overlap.py`).
PENDING = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    counter = count()  # ids unique in the process, so that two engines' requests never clash

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int):
        self.seq_id = next(Sequence.counter)
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0  # tokens with K/V cached: prefix-cache hits plus prefill
        self.num_cached_tokens = -1  # prompt tokens the prefix cache served; -1: not yet scheduled
        self.num_new_tokens = 0  # tokens fed to the model in the step being run
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.sample_row = -1  # row of this request's PENDING token in its step's samples
        self.generator = None  # torch.Generator for seeded sampling, made by the sampler
        self.kv_budget: int | None = None  # tokens kept per (layer, KV head); None: full KV
        self.num_evicted = 0  # a token's cache index is its position (index in token_ids) - this
        self.num_compressions = 0
        self.peak_kv_blocks = 0  # the most blocks its stored tokens filled before a compression
        self.query_slot = -1  # row of the query cache holding this request's window queries
        self.compression = None  # its `compressor.Compression` from planned until done
        self.block_table: list[int] = []
        self.sampling_params = sampling_params
        self.logprobs: list[float] = []
        self.request_id, self.sample_index = self.seq_id, 0  # one prompt's; `SamplingParams.n`
        self.first_sample: Sequence | None = None  # the sample whose prompt blocks it shares
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.stop_reason: int | str | None = None  # the stop token id or string that matched

    def __len__(self):
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def in_prefill(self) -> bool:
        """Until every token before the last is cached (a decode step feeds the last). A prefill
        chunk may end at the last token (then it samples) or one short (then decode feeds it)."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    @property
    def cache_len(self) -> int:
        """Cache entries once every token's K/V is stored (the next decode step stores the last)."""
        return len(self.token_ids) - self.num_evicted

    @property
    def num_blocks(self) -> int:
        return (self.cache_len + self.block_size - 1) // self.block_size

    @property
    def max_blocks(self) -> int:
        """N_max: a request holding this many full blocks is compressed at its next token."""
        return max_blocks(self.kv_budget, self.block_size) if self.kv_budget else 1 << 62

    @property
    def samples_this_step(self) -> bool:
        """The step being planned feeds its last token: it ends with a sampled token."""
        return self.num_computed_tokens + self.num_new_tokens == len(self.token_ids)

    @property
    def needs_compression(self) -> bool:
        """Its last token is a generated one that starts a new block while N_max blocks are full:
        the step that feeds it compresses first (a prompt's last token sees the whole prompt)."""
        filled, b = self.cache_len - 1, self.block_size
        return filled % b == 0 and filled >= self.max_blocks * b and self.num_completion_tokens > 0

    @property
    def prefill_end(self) -> int:
        """Tokens cached once its prefill is done. A preempted request's recompute stops one short
        of a compression, which the next decode step runs, as it would have without preemption."""
        return len(self.token_ids) - self.needs_compression

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]
