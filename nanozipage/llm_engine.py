"""The engine loop: requests in, `step()` until done, texts out.

`generate` validates every prompt first (a bad one raises before any work starts), queues them,
and calls `step()`: the scheduler picks the requests, the model runner runs them, and the
scheduler applies the sampled tokens. `add_request` / `step` / `is_finished` are the same loop
for callers who feed requests incrementally.
"""

import dataclasses
import json
import os
import time

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanozipage.config import Config, check_kv_budget
from nanozipage.model_runner import ModelRunner, Samples
from nanozipage.sampling_params import SamplingParams
from nanozipage.scheduler import Scheduler
from nanozipage.sequence import Sequence

USER_CONFIG_KEYS = {f.name for f in dataclasses.fields(Config)} - {"model", "hf_config", "eos"}


def _eos_token_id(model: str, hf_config: dict, tokenizer) -> int:
    path = os.path.join(model, "generation_config.json")
    generation = {}
    if os.path.isfile(path):
        with open(path) as f:
            generation = json.load(f)
    eos = generation.get("eos_token_id", hf_config.get("eos_token_id"))
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return -1 if eos is None else eos


@dataclasses.dataclass(slots=True)
class InFlight:
    """A launched step whose samples have not been read back yet."""

    seqs: list[Sequence]
    sampling: list[tuple[Sequence, int]]  # requests that sample, with their placeholder index
    samples: Samples | None  # None when no request samples (a prefill chunk mid-prompt)


class LLMEngine:
    def __init__(self, model: str, **config):
        unknown = set(config) - USER_CONFIG_KEYS
        if unknown:
            raise ValueError(
                f"unknown config keys {sorted(unknown)}; allowed: {sorted(USER_CONFIG_KEYS)}"
            )
        self.config = Config(model, **config)
        has_tokenizer = any(
            os.path.isfile(os.path.join(model, name))
            for name in ("tokenizer.json", "tokenizer_config.json")
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model) if has_tokenizer else None
        self.config.eos = _eos_token_id(model, self.config.hf_config, self.tokenizer)
        Sequence.block_size = self.config.block_size
        self.model_runner = ModelRunner(self.config)
        self.scheduler = Scheduler(
            self.config, self.model_runner.num_blocks, self.model_runner.num_query_slots
        )
        self.in_flight: InFlight | None = None  # the step launched last, if not yet collected

    def make_sequence(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Check one request against the engine's limits; nothing is queued here."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "prompt: text prompts need a tokenizer in the model directory; "
                    "pass token ids instead"
                )
            prompt = self.tokenizer.encode(prompt)
        if len(prompt) == 0:
            raise ValueError("prompt: must hold at least one token, got an empty prompt")
        vocab = self.config.hf_config["vocab_size"]
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab}), got {bad[:5]}")
        max_len = self.config.max_model_len
        if len(prompt) + params.max_tokens > max_len:
            raise ValueError(
                f"prompt: {len(prompt)} tokens plus max_tokens={params.max_tokens} "
                f"exceed max_model_len={max_len}"
            )
        seq = Sequence(prompt, params)
        seq.kv_budget = self.config.kv_budget
        if params.kv_budget is not None:
            if self.config.kv_budget is None or params.kv_budget > self.config.kv_budget:
                raise ValueError(
                    f"kv_budget: a request may only lower the engine's kv_budget="
                    f"{self.config.kv_budget}, got {params.kv_budget}"
                )
            b = self.config.block_size
            check_kv_budget("kv_budget", params.kv_budget, b, self.config.window)
            seq.kv_budget = params.kv_budget
        b, total = self.config.block_size, len(prompt) + params.max_tokens
        # Blocks at the request's peak: all its tokens, or N_max once it compresses.
        num_blocks = min(-(-total // b), max(seq.max_blocks, -(-len(prompt) // b) + 1))
        if num_blocks > self.model_runner.num_blocks:
            raise ValueError(
                f"prompt: {len(prompt)} tokens plus max_tokens={params.max_tokens} "
                f"need {num_blocks} KV blocks, the pool has {self.model_runner.num_blocks}"
            )
        return seq

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        seq = self.make_sequence(prompt, sampling_params)
        self.scheduler.add(seq)
        return seq.seq_id

    def step(self) -> tuple[list[dict], int]:
        """Launch one step and collect the results of the one before; returns the requests that
        finished, and the tokens fed by the launched step (negative for a decode step, so that
        callers can tell prefill and decode throughput apart).

        The overlap is the engine loop's one trick. The GPU runs asynchronously, so the step is
        launched before the previous step's sampled tokens are read back: while the GPU runs
        step N, the host collects step N-1's tokens and plans step N+1. Planning needs no
        token values, only lengths (every running request gains exactly one token per step),
        and step N+1's input ids are read from step N's samples on the GPU. A request that
        finishes at step N (EOS) has already been launched in step N+1: that token is dropped.
        With `overlap_scheduling=False` each step is collected right after its launch.
        """
        for seq, old_table in self.model_runner.finished_compressions():
            self.scheduler.finish_compression(seq, old_table)
        seqs, is_prefill, compressions = self.scheduler.schedule()
        if compressions:
            self.model_runner.compress(compressions)
        launched = None
        if seqs:
            previous = self.in_flight and self.in_flight.samples
            samples = self.model_runner.run(seqs, is_prefill, previous and previous.tokens)
            launched = InFlight(seqs, self.scheduler.launch(seqs), samples)
        elif not self.in_flight:  # every request that could run is under compression
            self.model_runner.wait_for_compressions()
        if self.config.overlap_scheduling:
            launched, self.in_flight = self.in_flight, launched
        outputs = []
        if launched:
            token_ids, logprobs = launched.samples.tolist() if launched.samples else ([], None)
            finished = self.scheduler.postprocess(
                launched.seqs, launched.sampling, token_ids, logprobs
            )
            outputs = [self._output(seq) for seq in finished]
        num_tokens = sum(seq.num_new_tokens for seq in seqs) if is_prefill else -len(seqs)
        return outputs, num_tokens

    def _output(self, seq: Sequence) -> dict:
        token_ids = seq.completion_token_ids
        output = {
            "seq_id": seq.seq_id,
            "token_ids": token_ids,
            "num_cached_tokens": seq.num_cached_tokens,
            "text": self.tokenizer.decode(token_ids, skip_special_tokens=True)
            if self.tokenizer
            else None,
        }
        if seq.sampling_params.logprobs:
            output["logprobs"] = seq.logprobs
        return output

    def close(self):
        """End a tensor-parallel engine's workers and process group now rather than when it is
        collected (or the program exits): another can then start. Idempotent."""
        if self.model_runner.workers:
            self.model_runner.workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and not self.in_flight

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[dict]:
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params: got {len(sampling_params)} for "
                f"{len(prompts)} prompts; pass one, or one per prompt"
            )
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]
        for seq in seqs:
            self.scheduler.add(seq)
        order = {seq.seq_id: i for i, seq in enumerate(seqs)}
        results = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        while not self.is_finished():
            start = time.perf_counter()
            outputs, num_tokens = self.step()
            rate = abs(num_tokens) / (time.perf_counter() - start)
            prefill_tps, decode_tps = (rate, decode_tps) if num_tokens > 0 else (prefill_tps, rate)
            bar.set_postfix(
                running=len(self.scheduler.running),
                prefill=f"{prefill_tps:.0f}tok/s",
                decode=f"{decode_tps:.0f}tok/s",
                refresh=False,
            )
            for output in outputs:
                if output["seq_id"] in order:
                    results[order[output.pop("seq_id")]] = output
                    bar.update(1)
        bar.close()
        return results
