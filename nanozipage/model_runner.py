"""Tensors start here: the KV pool, per-step inputs, the forward pass, CUDA graphs, sampling.

`run` turns the scheduled requests into a `StepPlan` of flat host lists: per token fed, its id,
position (index in the request), KV slot (block * block_size + offset of its cache index, which
trails the position once compressed) and window-query row; per request, its context length and
block table. `execute` runs the model on it (decode by replaying a CUDA graph captured for the
next larger batch); `run` returns the samples without waiting for the GPU (`overlap.py`). Under
tensor parallelism rank 0 forwards step plans and compressions to the others (`parallel.py`).
"""

import gc
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanozipage.compressor import Compressor
from nanozipage.config import Config, max_blocks
from nanozipage.context import get_context, set_context, to_device
from nanozipage.model import CausalLM
from nanozipage.overlap import Samples, pending_rows
from nanozipage.parallel import Workers
from nanozipage.sampler import Sampler
from nanozipage.sampling_params import SamplingParams
from nanozipage.sequence import Sequence

CPU_KV_CACHE_BYTES = 1 << 30  # with no GPU to size from, give the KV pool 1 GiB by default
_GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
_RUNNERS: "weakref.WeakSet[ModelRunner]" = weakref.WeakSet()  # this process's, while alive


@dataclass(slots=True)
class StepPlan:
    """One step as flat host lists, each rank's Context built from them; what rank 0 sends."""

    is_prefill: bool
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]  # unpadded
    query_rows: list[int] | None
    sample_rows: list[int] | None = None  # rows whose logits are sampled; None: all (decode)
    pending_rows: list[int] | None = None  # decode, overlapped loop: see `overlap.pending_rows`
    cu_seqlens_q: list[int] | None = None  # prefill only
    max_seqlen_q: int = 0  # prefill only


def _query_row(seq: Sequence, index: int, last_block: int, rows: int) -> int:
    """Row of the query cache for the token at cache index `index`, or -1: a query slot's `rows`
    (first_window) rows hold the last tokens of seq's newest block."""
    b = seq.block_size
    if seq.query_slot < 0 or index % b < b - rows or index // b != last_block:
        return -1
    return seq.query_slot * rows + index % b - (b - rows)


def step_plan(seqs: list[Sequence], rows: int | None, is_prefill: bool) -> StepPlan:
    """Each request's next tokens: a prompt chunk, or in decode its last token (if PENDING, read
    on the device from the last step's samples); `rows` None: no window queries stored."""
    input_ids, positions, slots, context_lens, sample_rows, query_rows = [], [], [], [], [], []
    cu_seqlens_q, b = [0], seqs[0].block_size
    if not is_prefill:  # the loop below for one token each, per batch: half its host time
        index = [seq.cache_len - 1 for seq in seqs]
        input_ids = [seq.last_token for seq in seqs]
        positions = [len(seq) - 1 for seq in seqs]
        slots = [seq.block_table[i // b] * b + i % b for seq, i in zip(seqs, index)]
        context_lens = [i + 1 for i in index]
        query_rows = rows and [_query_row(seq, i, i // b, rows) for seq, i in zip(seqs, index)]
    for seq in seqs if is_prefill else []:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_new_tokens
        input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        indices = range(start - seq.num_evicted, end - seq.num_evicted)  # cache indices
        slots += [seq.block_table[i // b] * b + i % b for i in indices]
        if rows:
            last_block = indices[-1] // b
            query_rows += [_query_row(seq, i, last_block, rows) for i in indices]
        cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
        context_lens.append(indices.stop)
        if seq.samples_this_step:
            sample_rows.append(cu_seqlens_q[-1] - 1)
    return StepPlan(
        is_prefill,
        input_ids,
        positions,
        slots,
        context_lens,
        block_tables=[seq.block_table for seq in seqs],
        query_rows=query_rows or None,
        sample_rows=sample_rows if is_prefill else None,
        pending_rows=pending_rows(seqs),  # None in prefill: a prompt chunk ends before any
        cu_seqlens_q=cu_seqlens_q if is_prefill else None,
        max_seqlen_q=max(seq.num_new_tokens for seq in seqs),
    )


class ModelRunner:
    def __init__(self, config: Config, rank: int = 0, eos_token_ids: set[int] = frozenset()):
        self.config, self.rank = config, rank
        _RUNNERS.add(self)
        self.block_size = config.block_size
        hf = config.hf_config
        self.device = torch.device(config.device)
        self.use_cuda = self.device.type == "cuda"
        tp = config.tensor_parallel_size > 1
        if tp and self.use_cuda:
            self.device = torch.device("cuda", rank)
        self.graphs = {}  # decode batch size -> CUDA graph (capture_cudagraphs)
        # Rank 0 starts the other ranks (each builds its own ModelRunner) before its own shard.
        self.workers = Workers(config, ModelRunner, self.graphs) if tp and rank == 0 else None
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
        self.dtype = getattr(torch, config.dtype or (hf_dtype if self.use_cuda else "float32"))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        with torch.device(self.device):
            self.model = CausalLM(hf, rank, config.tensor_parallel_size)
        torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            self.model.init_dummy_weights()
        else:
            self.model.load_weights(config.model)
        self.model.eval()
        attn = self.model.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.num_heads = attn.num_heads  # query heads
        # Queries stored per block: first_window (a later compression reads the last `window`)
        self.slot_rows = config.first_window if config.kv_budget else None
        self.q_cache = self.score_cache = None
        self.pending_tokens = None  # ranks 1..N-1: the last step's samples, broadcast by rank 0
        self.sampler = Sampler(hf["vocab_size"], self.device, eos_token_ids)  # rank 0's
        if self.use_cuda:
            self.warmup()
        self.allocate_kv_cache()
        self.compressor = Compressor(
            config, self.kv_cache, self.score_cache, self.q_cache, self.workers
        )
        if self.use_cuda and not config.enforce_eager:
            self.capture_cudagraphs()
        if self.workers:
            self.workers.expect("ready")

    def tensor(self, data, dtype=torch.int32) -> torch.Tensor:
        return to_device(data, self.device, dtype)

    def _set_caches(self, kv_cache: torch.Tensor):
        """Each attention layer's views of the KV pool, and of the query cache once made."""
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = kv_cache[0, i], kv_cache[1, i]
            if self.q_cache is not None:
                layer.self_attn.q_cache = self.q_cache[i]

    def _empty_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """[K|V, layers, blocks, KV heads, block_size, head_dim]"""
        shape = (len(self.model.model.layers), num_blocks, self.num_kv_heads, self.block_size)
        return torch.empty(2, *shape, self.head_dim, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def warmup(self):
        """Run the largest prefill step once, so that its peak memory is known before sizing."""
        # An engine that only a reference cycle holds goes now (its runner is alive until then;
        # a full collection takes long in a big process): its memory must not count as in use,
        # and its CUDA graphs must not be destroyed while this one captures (that ends it).
        if len(_RUNNERS) > 1:
            gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._set_caches(self._empty_kv_cache(1))  # every block id in the dummy tables is 0
        seqs, budget = [], self.config.max_num_batched_tokens
        while budget > 0 and len(seqs) < self.config.max_num_seqs:
            seq = Sequence([0] * min(budget, self.config.max_model_len), _GREEDY, self.block_size)
            seq.num_new_tokens, budget = len(seq), budget - len(seq)
            seq.block_table = [0] * seq.num_blocks
            seqs.append(seq)
        self.execute(step_plan(seqs, None, is_prefill=True))  # every rank; no query cache yet
        self.workers.wait_on_gpu() if self.workers else torch.cuda.synchronize()

    def allocate_kv_cache(self):
        """Size the KV pool, and with compression the query cache (docs/DESIGN.md section 3): with
        spare memory m, block bytes m_kv (K, V and stored scores) and query bytes per slot m_q,
        M = m / (m_kv * N_max + m_q) query slots and m / (m_kv + m_q / N_max) blocks, so that
        the M slot holders can always reach their N_max blocks."""
        config, num_layers = self.config, len(self.model.model.layers)
        spare = CPU_KV_CACHE_BYTES
        if self.use_cuda:
            free, total = torch.cuda.mem_get_info()
            # Our share of the card, minus memory in use and the largest step's activations.
            activations = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
            spare = total * config.gpu_memory_utilization - (total - free) - activations
        if config.tensor_parallel_size > 1:  # the same pool on every rank: the least memory
            spare = torch.tensor([spare], dtype=torch.float64, device=self.device)
            dist.all_reduce(spare, dist.ReduceOp.MIN)
            spare = spare.item()
        block_bytes, slot_bytes, n_max = self._empty_kv_cache(1).nbytes, 0, 1
        if config.kv_budget:
            n_max = max_blocks(config.kv_budget, self.block_size)
            block_bytes += num_layers * self.num_kv_heads * self.block_size * 4  # stored scores
            query_bytes = self.num_heads * self.head_dim * self.dtype.itemsize
            slot_bytes = num_layers * config.first_window * query_bytes
        num_blocks = int(spare // (block_bytes + slot_bytes / n_max))
        num_blocks = min(num_blocks, config.num_kvcache_blocks or num_blocks)
        if num_blocks < 1:
            raise ValueError(
                "gpu_memory_utilization leaves no memory for the KV cache; raise it "
                "or lower max_num_batched_tokens"
            )
        num_slots = 0
        if config.kv_budget:  # checked before anything is allocated
            num_slots = int(spare // (block_bytes * n_max + slot_bytes))
            num_slots = min(num_slots, num_blocks // n_max, config.max_num_seqs)
            if num_slots < 1:
                raise ValueError(
                    f"kv_budget={config.kv_budget} needs {n_max} KV blocks per request, the pool "
                    f"has {num_blocks}; lower kv_budget or give the pool more memory"
                )
        self.num_blocks, self.num_query_slots = num_blocks, num_slots
        self.kv_cache = self._empty_kv_cache(num_blocks)
        if config.kv_budget:
            self.score_cache = torch.zeros(self.kv_cache.shape[1:-1], device=self.device)
            rows = num_slots * config.first_window  # one per (query slot, window position)
            self.q_cache = self.kv_cache.new_zeros(num_layers, rows, self.num_heads, self.head_dim)
        self._set_caches(self.kv_cache)

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], is_prefill: bool, pending: torch.Tensor | None = None
    ) -> Samples | None:
        """Rank 0: launch one step and its sampling; the samples, not waited for (None: none)."""
        if not seqs:
            return None
        plan = step_plan(seqs, self.slot_rows, is_prefill)
        seqs = [seq for seq in seqs if seq.samples_this_step]  # as many as the workers expect
        if self.workers:
            self.workers.call(ModelRunner.worker_step, plan)
        try:
            logits = self.execute(plan, pending)
            if not seqs:
                return None
            error, tokens = None, torch.zeros(len(seqs), dtype=torch.long, device=self.device)
            try:
                tokens, logprobs = self.sampler(seqs, logits)
            except BaseException as e:  # noqa: BLE001 (the other ranks wait for the samples)
                error = e
            if self.workers:
                dist.broadcast(tokens, 0)
        except BaseException:
            if self.workers:  # the other ranks are left mid-step: end them, not desynchronise
                self.workers.close()
            raise
        if error:
            raise error
        return Samples(tokens, logprobs, self.workers if self.use_cuda else None)

    @torch.inference_mode()
    def worker_step(self, plan: StepPlan):
        """Ranks 1..N-1: rank 0's step on this shard; its broadcast samples feed the next step."""
        self.execute(plan, self.pending_tokens)
        num_sampled = len(plan.input_ids if plan.sample_rows is None else plan.sample_rows)
        self.pending_tokens = None
        if num_sampled:
            self.pending_tokens = torch.empty(num_sampled, dtype=torch.long, device=self.device)
            dist.broadcast(self.pending_tokens, 0)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, pending: torch.Tensor | None = None) -> torch.Tensor | None:
        """Every rank: one step's forward pass; the logits of the rows that sample (None if none,
        or on ranks > 0). A PENDING input id is read on the device from `pending`."""
        width = max(len(table) for table in plan.block_tables)
        set_context(
            is_prefill=plan.is_prefill,
            slot_mapping=self.tensor(plan.slot_mapping),
            context_lens=self.tensor(plan.context_lens),
            block_tables=self.tensor([t + [-1] * (width - len(t)) for t in plan.block_tables]),
            cu_seqlens_q=self.tensor(plan.cu_seqlens_q) if plan.is_prefill else None,
            max_seqlen_q=plan.max_seqlen_q,
            query_rows=plan.query_rows and self.tensor(plan.query_rows, torch.long),
        )
        input_ids = self.tensor(plan.input_ids, torch.long)
        if pending is not None and plan.pending_rows is not None:
            rows = self.tensor(plan.pending_rows)
            input_ids = torch.where(rows >= 0, pending[rows.clamp(min=0)], input_ids)
        positions = self.tensor(plan.positions, torch.long)
        if plan.is_prefill:
            hidden = self.model(input_ids, positions)[plan.sample_rows]
        else:
            hidden = self.run_decode(input_ids, positions)
        set_context()  # empty again
        return self.model.lm_head(hidden) if len(hidden) else None

    def run_decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bs = input_ids.shape[0]
        graph_bs = next((b for b in self.graph_sizes if b >= bs), None) if self.graphs else None
        if graph_bs is None:
            return self.model(input_ids, positions)
        ctx, buf = get_context(), self.graph_buffers
        buf["input_ids"][:bs] = input_ids
        buf["positions"][:bs] = positions
        buf["block_tables"][:bs, : ctx.block_tables.shape[1]] = ctx.block_tables
        # Rows past the batch store nothing, attend to nothing and keep no query: -1, 0, -1.
        for name, pad in (("slot_mapping", -1), ("context_lens", 0), ("query_rows", -1)):
            if getattr(ctx, name) is not None:
                buf[name][bs:] = pad
                buf[name][:bs] = getattr(ctx, name)
        self.graphs[graph_bs].replay()
        return buf["hidden"][:bs]

    @torch.inference_mode()
    def capture_cudagraphs(self):
        """Capture the decode forward pass for a ladder of batch sizes over static buffers."""
        max_bs = min(self.config.max_num_seqs, self.num_blocks)  # a request holds >= 1 block
        max_table = -(-self.config.max_model_len // self.block_size)  # blocks of the longest
        sizes = [1, 2, 4, 8, *range(16, max_bs, 16)]
        self.graph_sizes = [b for b in sizes if b < max_bs] + [max_bs]  # ascending
        hidden_size, int32, long = self.config.hf_config["hidden_size"], torch.int32, torch.long
        zeros = lambda *shape, dtype: torch.zeros(shape, dtype=dtype, device=self.device)
        buf = self.graph_buffers = {
            "input_ids": zeros(max_bs, dtype=long),
            "positions": zeros(max_bs, dtype=long),
            "slot_mapping": zeros(max_bs, dtype=int32) - 1,  # -1: store nothing
            "context_lens": zeros(max_bs, dtype=int32),
            "block_tables": zeros(max_bs, max_table, dtype=int32),
            "hidden": zeros(max_bs, hidden_size, dtype=self.dtype),
            "query_rows": zeros(max_bs, dtype=long) - 1,
        }
        pool = None
        for bs in reversed(self.graph_sizes):
            set_context(
                slot_mapping=buf["slot_mapping"][:bs],
                context_lens=buf["context_lens"][:bs],
                block_tables=buf["block_tables"][:bs],
                query_rows=buf["query_rows"][:bs] if self.q_cache is not None else None,
            )
            buf["hidden"][:bs] = self.model(buf["input_ids"][:bs], buf["positions"][:bs])  # warm up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                buf["hidden"][:bs] = self.model(buf["input_ids"][:bs], buf["positions"][:bs])
            pool = pool or graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
            set_context()
