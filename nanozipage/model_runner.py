"""Tensors start here: the KV pool, per-step inputs, the forward pass, CUDA graphs, sampling.

`run` builds a `StepPlan` (`step_plan.py`); `execute` publishes it through the `Context` and
runs the model; `run` returns the samples without waiting for the GPU (`overlap.py`). Decode
replays a CUDA graph captured for the next larger batch size; prefill runs eagerly (its shapes
vary too much). The compressor works on the tensors allocated here. Under tensor parallelism each
rank has a runner over its shard; rank 0 forwards step plans and compressions (`parallel.Workers`).
"""

import torch
import torch.distributed as dist

from nanozipage.compressor import Compressor
from nanozipage.config import Config
from nanozipage.context import get_context, set_context, to_device
from nanozipage.model import CausalLM
from nanozipage.overlap import Samples
from nanozipage.parallel import Workers
from nanozipage.sampler import TokenCounts, sample
from nanozipage.sampling_params import SamplingParams
from nanozipage.sequence import PENDING, Sequence
from nanozipage.step_plan import StepPlan, decode_plan, prefill_plan

CPU_KV_CACHE_BYTES = 1 << 30  # with no GPU to size from, give the KV pool 1 GiB by default
_GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


class ModelRunner:
    def __init__(self, config: Config, rank: int = 0, eos_token_ids: set[int] = frozenset()):
        self.config, self.rank = config, rank
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
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.window = config.window if config.kv_budget else None  # None: no window queries
        self.q_cache = self.score_cache = None
        self.pending_tokens = None  # ranks 1..N-1: the last step's samples, broadcast by rank 0
        self.token_counts = TokenCounts(hf["vocab_size"], self.device)  # rows for penalties
        self.count_rows: dict[Sequence, int] = {}
        # Rank 0: the EOS ids that sampling bans before min_tokens (those that are logits' rows)
        self.eos_token_ids = {t for t in eos_token_ids if t < hf["vocab_size"]}
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

    def _set_kv_cache(self, kv_cache: torch.Tensor):
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = kv_cache[0, i], kv_cache[1, i]

    def _empty_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """[K|V, layers, blocks, KV heads, block_size, head_dim]"""
        shape = (len(self.model.model.layers), num_blocks, self.num_kv_heads, self.block_size)
        return torch.empty(2, *shape, self.head_dim, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def warmup(self):
        """Run the largest prefill step once, so that its peak memory is known before sizing."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._set_kv_cache(self._empty_kv_cache(1))  # every block id in the dummy tables is 0
        seqs, budget = [], self.config.max_num_batched_tokens
        while budget > 0 and len(seqs) < self.config.max_num_seqs:
            seq = Sequence([0] * min(budget, self.config.max_model_len), _GREEDY, self.block_size)
            seq.num_new_tokens, budget = len(seq), budget - len(seq)
            seq.block_table = [0] * seq.num_blocks
            seqs.append(seq)
        self.execute(prefill_plan(seqs, None))  # every rank at once; no query cache yet
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
            stats = torch.cuda.memory_stats()
            # Our share of the card, minus memory in use and the largest step's activations.
            activations = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
            spare = total * config.gpu_memory_utilization - (total - free) - activations
        if config.tensor_parallel_size > 1:  # the same pool on every rank: the least memory
            spare = torch.tensor([spare], dtype=torch.float64, device=self.device)
            dist.all_reduce(spare, dist.ReduceOp.MIN)
            spare = spare.item()
        block_bytes, slot_bytes, n_max = self._empty_kv_cache(1).nbytes, 0, 1
        if config.kv_budget:
            block_bytes += num_layers * self.num_kv_heads * self.block_size * 4  # stored scores
            n_max = config.kv_budget // self.block_size + 1
            query_bytes = self.num_heads * self.head_dim * self.dtype.itemsize
            slot_bytes = num_layers * config.window * query_bytes
        num_blocks = int(spare // (block_bytes + slot_bytes / n_max))
        if config.num_kvcache_blocks is not None:
            num_blocks = min(num_blocks, config.num_kvcache_blocks)
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
        self._set_kv_cache(self.kv_cache)
        if config.kv_budget:
            self.score_cache = torch.zeros(self.kv_cache.shape[1:-1], device=self.device)
            rows = num_slots * config.window  # one per (query slot, window position)
            self.q_cache = self.kv_cache.new_zeros(num_layers, rows, self.num_heads, self.head_dim)
            for i, layer in enumerate(self.model.model.layers):
                layer.self_attn.q_cache = self.q_cache[i]

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], is_prefill: bool, pending: torch.Tensor | None = None
    ) -> Samples | None:
        """Rank 0: launch one step and the sampling of the requests that reach their last token;
        returns their samples without waiting for the GPU (None if no request samples)."""
        if not seqs:
            return None
        plan = (prefill_plan if is_prefill else decode_plan)(seqs, self.window)
        seqs = [seq for seq in seqs if seq.samples_this_step]  # as many as the workers expect
        if self.workers:
            self.workers.call(ModelRunner.worker_step, plan)
        try:
            logits = self.execute(plan, pending)
            if not seqs:
                return None
            error, tokens = None, torch.zeros(len(seqs), dtype=torch.long, device=self.device)
            try:
                tokens, logprobs = self.sample(seqs, logits)
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
        return self.model.compute_logits(hidden) if len(hidden) else None

    def run_decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bs = input_ids.shape[0]
        graph_bs = next((b for b in self.graph_sizes if b >= bs), None) if self.graphs else None
        if graph_bs is None:
            return self.model(input_ids, positions)
        ctx, buf = get_context(), self.graph_buffers
        buf["input_ids"][:bs] = input_ids
        buf["positions"][:bs] = positions
        buf["slot_mapping"].fill_(-1)
        buf["slot_mapping"][:bs] = ctx.slot_mapping
        buf["context_lens"].zero_()
        buf["context_lens"][:bs] = ctx.context_lens
        buf["block_tables"][:bs, : ctx.block_tables.shape[1]] = ctx.block_tables
        if ctx.query_rows is not None:
            buf["query_rows"].fill_(-1)
            buf["query_rows"][:bs] = ctx.query_rows
        self.graphs[graph_bs].replay()
        return buf["hidden"][:bs]

    def sample(self, seqs: list[Sequence], logits: torch.Tensor):
        """Rank 0: token ids and logprobs (or None) on the device; feature tensors only if used."""
        params = [seq.sampling_params for seq in seqs]
        for seq in seqs:
            if seq.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(self.device).manual_seed(seq.seed)
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

    @torch.inference_mode()
    def capture_cudagraphs(self):
        """Capture the decode forward pass for a ladder of batch sizes over static buffers."""
        max_bs = min(self.config.max_num_seqs, self.num_blocks)  # a request holds >= 1 block
        sizes = [1, 2, 4, 8, *range(16, max_bs, 16)]
        self.graph_sizes = [b for b in sizes if b < max_bs] + [max_bs]  # ascending
        hidden_size, int32, long = self.config.hf_config["hidden_size"], torch.int32, torch.long
        zeros = lambda *shape, dtype: torch.zeros(shape, dtype=dtype, device=self.device)
        buf = self.graph_buffers = {
            "input_ids": zeros(max_bs, dtype=long),
            "positions": zeros(max_bs, dtype=long),
            "slot_mapping": zeros(max_bs, dtype=int32) - 1,  # -1: store nothing
            "context_lens": zeros(max_bs, dtype=int32),
            "block_tables": zeros(max_bs, self.max_blocks_per_seq, dtype=int32),
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
