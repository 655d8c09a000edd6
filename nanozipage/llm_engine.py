"""The engine loop, top of the data flow: requests in, `step()` until done, results out.

`generate` validates every prompt before queuing any, then steps; `add_request`, `step` and
`abort` are the same loop, fed request by request. A failed step aborts what it touched only.
"""

import dataclasses
import functools
import json
import os
import threading
import time

from tqdm.auto import tqdm

from nanozipage.compressor import Compression
from nanozipage.config import Config, check_kv_budget
from nanozipage.model_runner import ModelRunner
from nanozipage.overlap import InFlight, Overlap
from nanozipage.sampling_params import SamplingParams
from nanozipage.scheduler import Scheduler
from nanozipage.sequence import Sequence
from nanozipage.stop import StopConditions

USER_CONFIG_KEYS = {f.name for f in dataclasses.fields(Config)} - {"model", "hf_config"}


def one_caller_at_a_time(method):
    """The engine is not thread-safe: a second thread's call raises before touching anything."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if not self.lock.acquire(blocking=False):
            raise RuntimeError(
                f"{method.__name__}: another thread is using this LLM; use one thread at a time"
            )
        try:
            return method(self, *args, **kwargs)
        finally:
            self.lock.release()

    return guarded


def eos_token_ids(model: str, hf_config: dict, tokenizer) -> set[int]:
    """Every EOS id: generation_config.json's, else config.json's, else the tokenizer's."""
    path, generation = os.path.join(model, "generation_config.json"), {}
    if os.path.isfile(path):
        with open(path) as f:
            generation = json.load(f)
    eos = generation.get("eos_token_id", hf_config.get("eos_token_id"))
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


class LLMEngine:
    def __init__(self, model: str, **config):
        if unknown := set(config) - USER_CONFIG_KEYS:
            raise ValueError(
                f"unknown config keys {sorted(unknown)}; allowed: {sorted(USER_CONFIG_KEYS)}"
            )
        self.config = Config(model, **config)
        model = self.config.model  # a directory, also when given as a Hugging Face id
        names = ("tokenizer.json", "tokenizer_config.json")
        self.tokenizer = None
        if any(os.path.isfile(os.path.join(model, name)) for name in names):
            from transformers import AutoTokenizer  # only here: a slow import; workers need none

            self.tokenizer = AutoTokenizer.from_pretrained(model)
        eos = eos_token_ids(model, self.config.hf_config, self.tokenizer)
        runner = self.model_runner = ModelRunner(self.config, eos_token_ids=eos)
        stop = StopConditions(eos, self.tokenizer)
        self.scheduler = Scheduler(self.config, runner.num_blocks, runner.num_query_slots, stop)
        self.compressor = runner.compressor
        self.overlap = Overlap(self.config.overlap_scheduling)
        self.lock = threading.RLock()  # `one_caller_at_a_time`
        self.requests: dict[int, list[Sequence]] = {}  # unfinished requests, by request id
        self.unclaimed: list[dict] = []  # results that the next `step()` returns

    def make_sequences(self, prompt: str | list[int], params: SamplingParams) -> list[Sequence]:
        """Check one request against the engine's limits; one sequence per sample, none queued."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params: expected SamplingParams, got {params!r}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: strings need a tokenizer; use stop_token_ids")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer; pass token ids instead")
            prompt = self.tokenizer.encode(prompt)
        if not isinstance(prompt, list):
            raise TypeError(f"prompt: expected a string or a list of token ids, got {prompt!r}")
        if len(prompt) == 0:
            raise ValueError("prompt: must hold at least one token, got an empty prompt")
        vocab = self.config.hf_config["vocab_size"]
        for name, ids in (("prompt", prompt), ("stop_token_ids", params.stop_token_ids)):
            if bad := [t for t in ids if type(t) is not int or not 0 <= t < vocab]:
                raise ValueError(f"{name}: ids must be integers in [0, {vocab}), got {bad[:5]}")
        total, max_len = len(prompt) + params.max_tokens, self.config.max_model_len
        if total > max_len:
            raise ValueError(f"prompt and max_tokens: {total} tokens > max_model_len={max_len}")
        b, kv_budget = self.config.block_size, self.config.kv_budget
        if params.kv_budget is not None:
            if kv_budget is None or params.kv_budget > kv_budget:
                raise ValueError(
                    f"kv_budget: may only lower the engine's {kv_budget}, got {params.kv_budget}"
                )
            check_kv_budget(params.kv_budget, self.config)
            kv_budget = params.kv_budget
        seqs = [Sequence(prompt, params, b) for _ in range(params.n)]
        for i, seq in enumerate(seqs):
            seq.request_id, seq.sample_index = seqs[0].seq_id, i
            seq.first_sample = seqs[0] if i else None
            seq.kv_budget = kv_budget
        # Blocks at the request's peak: all its tokens, or N_max once it compresses.
        num_blocks = min(-(-total // b), max(seqs[0].max_blocks, -(-len(prompt) // b) + 1))
        if num_blocks > (pool := self.model_runner.num_blocks):
            raise ValueError(f"prompt and max_tokens need {num_blocks} KV blocks, pool has {pool}")
        return seqs

    def _add(self, seqs: list[Sequence]) -> int:
        self.requests[seqs[0].request_id] = seqs
        self.scheduler.waiting.extend(seqs)
        return seqs[0].request_id

    @one_caller_at_a_time
    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        """Queue one request; returns its id, which its results carry as `request_id`."""
        return self._add(self.make_sequences(prompt, sampling_params))

    @one_caller_at_a_time
    def abort(self, request_id: int):
        """End a request (all samples) without a result; unknown ids (just finished) are ignored."""
        for seq in self.requests.pop(request_id, []):
            self.scheduler.abort(seq)
            self.model_runner.sampler.forget(seq)

    @one_caller_at_a_time
    def step(self) -> tuple[list[dict], int]:
        """One step: the finished requests' results, and the tokens fed (negative for decode).
        A failure aborts what it touched (`_recover`)."""
        touched = list(self.scheduler.running)  # until the schedule says which
        try:
            self._finish_compressions()
            seqs, is_prefill, compressions = self.scheduler.schedule()
            touched = seqs + [compression.seq for compression in compressions]
            self._launch_compressions(compressions, nothing_to_run=not seqs)
            samples = self.model_runner.run(seqs, is_prefill, self.overlap.pending_tokens())
            launched = self.overlap.advance(seqs, samples)  # the step to read back now
            touched += launched.seqs if launched else []
            outputs = self._collect(launched)
        except BaseException:
            self._recover(touched)
            raise
        outputs, self.unclaimed = self.unclaimed + outputs, []
        return outputs, sum(s.num_new_tokens for s in seqs) if is_prefill else -len(seqs)

    def _finish_compressions(self, wait: bool = False):
        for compression in self.compressor.poll(wait):
            self.scheduler.finish_compression(compression)  # the request switches blocks
            self.compressor.done(compression)

    def _launch_compressions(self, compressions: list[Compression], nothing_to_run: bool):
        """Synchronous compression is this launch and a wait; with nothing to run, wait for any."""
        self.compressor.launch(compressions)
        if compressions and not self.config.async_compression:
            self._finish_compressions(wait=True)
        elif nothing_to_run and not compressions and not self.overlap.in_flight:
            if not self.compressor.running and not self.scheduler.is_finished():
                raise RuntimeError("no request can make progress")
            self._finish_compressions(wait=True)

    def _recover(self, touched: list[Sequence]):
        """After a failed step: read back the step in flight (other ranks hold the failed step's
        samples, zeros), end or cancel its compressions, abort what it touched, recount blocks."""
        self.unclaimed += self._collect(self.overlap.take())
        self._finish_compressions(wait=True)
        for seq in self.scheduler.running:
            if seq.compression:  # planned, never launched
                self.scheduler.cancel_compression(seq.compression)
        for seq in touched:
            if not seq.is_finished:
                self.scheduler.abort(seq)
                self.unclaimed.append(self._result(seq))
        self.scheduler.block_manager.recount([seq.block_table for seq in self.scheduler.running])

    def _collect(self, launched: InFlight | None) -> list[dict]:
        """Read a launched step's samples back; the results of the requests it finished."""
        if launched is None:
            return []
        finished = self.scheduler.postprocess(launched.seqs, launched.collect())
        return [self._result(seq) for seq in finished]

    def _result(self, seq: Sequence) -> dict:
        if all(s.is_finished for s in self.requests.get(seq.request_id, [])):
            self.requests.pop(seq.request_id, None)
        self.model_runner.sampler.forget(seq)
        output = {
            "request_id": seq.request_id,
            "index": seq.sample_index,
            "text": self.scheduler.stop.text(seq),
            "token_ids": seq.completion_token_ids,
            "prompt_token_ids": seq.prompt_token_ids,
            "finish_reason": seq.finish_reason,
            "stop_reason": seq.stop_reason,
            "num_cached_tokens": max(seq.num_cached_tokens, 0),
            "num_compressions": seq.num_compressions,
            "num_evicted_tokens": seq.num_evicted,
            "peak_kv_blocks": max(seq.peak_kv_blocks, -(-(seq.cache_len - 1) // seq.block_size)),
        }
        if seq.sampling_params.logprobs:
            output["logprobs"] = seq.logprobs
        return output

    def close(self):
        """End tensor-parallel workers now, not at exit, so another engine can start. Idempotent."""
        if self.model_runner.workers:
            self.model_runner.workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def is_finished(self) -> bool:
        """Nothing queued, running, in flight, compressing (still holding blocks) or unclaimed."""
        idle = not self.overlap.in_flight and not self.compressor.running
        return self.scheduler.is_finished() and idle and not self.unclaimed

    @one_caller_at_a_time
    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        """One result per sample, in prompt order (a prompt's `n` samples side by side); other
        requests' results are kept for `step()`. Interrupted, it aborts its own requests."""
        if not isinstance(prompts, str | list):
            raise TypeError(f"prompts: expected a prompt or a list of prompts, got {prompts!r}")
        if isinstance(prompts, str) or (prompts and type(prompts[0]) is int):
            prompts = [prompts]  # one prompt, as text or token ids
        sampling_params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params: {len(sampling_params)} for {len(prompts)} prompts, not one each"
            )
        requests = [self.make_sequences(p, sp) for p, sp in zip(prompts, sampling_params)]
        samples = [(seq.request_id, seq.sample_index) for seqs in requests for seq in seqs]
        results, others = {}, []  # by (request id, sample index); other requests' results
        ids = {seqs[0].request_id for seqs in requests}  # all aborted if interrupted, even unqueued
        bar = tqdm(total=len(samples), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        rates = {}  # tokens per second of the last prefill and decode steps
        try:
            for seqs in requests:
                self._add(seqs)
            while len(results) < len(samples):
                start = time.perf_counter()
                outputs, num_tokens = self.step()
                if num_tokens:
                    kind = "prefill" if num_tokens > 0 else "decode"
                    rates[kind] = f"{abs(num_tokens) / (time.perf_counter() - start):.0f}tok/s"
                bar.set_postfix(rates, running=len(self.scheduler.running), refresh=False)
                for output in outputs:
                    if output["request_id"] in ids:
                        results[output["request_id"], output["index"]] = output
                        bar.update(1)
                    else:
                        others.append(output)
            if any(seq.compression for seqs in requests for seq in seqs):
                self._finish_compressions(wait=True)  # its requests' blocks are free on return
        except BaseException:
            for request_id in ids:
                self.abort(request_id)
            self._recover([])  # also when it struck between two steps
            self.unclaimed = [o for o in self.unclaimed if o["request_id"] not in ids]
            raise
        finally:
            self.unclaimed = others + self.unclaimed
            bar.close()
        return [results[sample] for sample in samples]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[dict]:
        """`generate` on one conversation ({"role", "content"} messages) or a list, through the
        chat template (and `chat_template_kwargs`), encoded without special tokens: no BOS twice."""
        if self.tokenizer is None:
            raise ValueError("chat: needs a tokenizer with a chat template in the model directory")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        kwargs = {"tokenize": False, "add_generation_prompt": True, **(chat_template_kwargs or {})}
        texts = [self.tokenizer.apply_chat_template(c, **kwargs) for c in conversations]
        prompts = [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        return self.generate(prompts, sampling_params, use_tqdm)
