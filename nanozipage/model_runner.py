"""Tensors start here: the KV pool, per-step inputs, the forward pass, CUDA graphs, sampling.

`run(seqs, is_prefill)` turns the scheduler's requests into flat tensors (token ids, positions,
the cache slot of every new token, cumulative query lengths, context lengths, block tables),
publishes them through the `Context`, runs the model and samples one token for every request
that reached its last token. Decode steps replay a CUDA graph captured for the next larger
batch size; prefill steps run eagerly (their shapes vary too much to capture).
"""

import torch

from nanozipage.config import Config
from nanozipage.context import get_context, reset_context, set_context
from nanozipage.kernels import compact
from nanozipage.model import CausalLM
from nanozipage.policy import POLICIES, CacheState, select
from nanozipage.sampler import sample
from nanozipage.sampling_params import SamplingParams
from nanozipage.sequence import PENDING, Sequence

CPU_KV_CACHE_BYTES = 1 << 30  # with no GPU to size from, give the KV pool 1 GiB by default
_GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


class Samples:
    """One step's sampled tokens: on the device, where the next step reads its input ids, and
    on their way to the host, where `tolist` waits for that copy only."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor | None):
        self.tokens = tokens
        self._host = [self._to_host(t) for t in (tokens, logprobs) if t is not None]
        self._copied = torch.cuda.Event() if tokens.is_cuda else None
        if self._copied:
            self._copied.record()

    @staticmethod
    def _to_host(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, device="cpu", pin_memory=t.is_cuda).copy_(t, non_blocking=True)

    def tolist(self) -> tuple[list[int], list[float] | None]:
        if self._copied:
            self._copied.synchronize()
        tokens, *logprobs = (t.tolist() for t in self._host)
        return tokens, logprobs[0] if logprobs else None


class ModelRunner:
    def __init__(self, config: Config):
        self.config = config
        self.block_size = config.block_size
        hf = config.hf_config
        self.device = torch.device(
            config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.use_cuda = self.device.type == "cuda"
        dtype_name = config.dtype or (
            hf.get("dtype") or hf.get("torch_dtype") or "bfloat16" if self.use_cuda else "float32"
        )
        self.dtype = getattr(torch, dtype_name)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        with torch.device(self.device):
            self.model = CausalLM(hf)
        torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            self.model.init_dummy_weights()
        else:
            self.model.load_weights(config.model)
        self.model.eval()
        attn = self.model.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.q_cache = self.score_cache = None
        self.pending = []  # (event, jobs) of compactions under way
        self.compress_stream = torch.cuda.Stream() if self.use_cuda else None
        if self.use_cuda:
            self.warmup()
        self.allocate_kv_cache()
        self.graphs = {}
        if self.use_cuda and not config.enforce_eager:
            self.capture_cudagraphs()

    def _tensor(self, data, dtype=torch.int32) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self.use_cuda).to(
            self.device, non_blocking=True
        )

    def _set_kv_cache(self, kv_cache: torch.Tensor):
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = kv_cache[0, i], kv_cache[1, i]

    def _empty_kv_cache(self, num_blocks: int) -> torch.Tensor:
        num_layers = len(self.model.model.layers)
        return torch.empty(
            2,
            num_layers,
            num_blocks,
            self.num_kv_heads,
            self.block_size,
            self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def warmup(self):
        """Run the largest prefill step once, so that its peak memory is known before sizing."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._set_kv_cache(self._empty_kv_cache(1))  # every block id in the dummy tables is 0
        seqs, budget = [], self.config.max_num_batched_tokens
        while budget > 0 and len(seqs) < self.config.max_num_seqs:
            seq = Sequence([0] * min(budget, self.config.max_model_len), _GREEDY)
            seq.num_new_tokens, budget = len(seq), budget - len(seq)
            seq.block_table = [0] * seq.num_blocks
            seqs.append(seq)
        self.run(seqs, is_prefill=True)
        torch.cuda.synchronize()

    def allocate_kv_cache(self):
        """Size the KV pool, and with compression the query cache (DESIGN.md section 3): with
        spare memory m, block bytes m_kv (K, V and stored scores) and query bytes per slot m_q,
        M = m / (m_kv * N_max + m_q) query slots and m / (m_kv + m_q / N_max) blocks, so that
        the M slot holders can always reach their N_max blocks."""
        config, num_layers = self.config, len(self.model.model.layers)
        block_bytes = self._empty_kv_cache(1).nbytes
        if self.use_cuda:
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            # Memory the engine may still take: its share of the card, minus what is in use, minus
            # the activations of the largest step (peak seen in warmup, beyond what is resident).
            spare = (
                total * config.gpu_memory_utilization
                - (total - free)
                - stats["allocated_bytes.all.peak"]
                + stats["allocated_bytes.all.current"]
            )
        else:
            spare = CPU_KV_CACHE_BYTES
        num_slots, num_q_heads = 0, self.config.hf_config["num_attention_heads"]
        if config.kv_budget:
            block_bytes += num_layers * self.num_kv_heads * self.block_size * 4
            n_max = config.kv_budget // self.block_size + 1
            slot_bytes = (
                num_layers * config.window * num_q_heads * self.head_dim * self.dtype.itemsize
            )
            num_slots = int(spare // (block_bytes * n_max + slot_bytes))
            num_blocks = int(spare // (block_bytes + slot_bytes / n_max))
        else:
            num_blocks = int(spare // block_bytes)
        if config.num_kvcache_blocks is not None:
            num_blocks = min(num_blocks, config.num_kvcache_blocks)
        if num_blocks < 1:
            raise ValueError(
                "gpu_memory_utilization leaves no memory for the KV cache; raise it "
                "or lower max_num_batched_tokens"
            )
        if config.kv_budget:
            num_slots = min(num_slots, num_blocks // n_max, config.max_num_seqs)
            if num_slots < 1:
                raise ValueError(
                    f"kv_budget={config.kv_budget} needs {n_max} KV blocks per request, the pool "
                    f"has {num_blocks}; lower kv_budget or give the pool more memory"
                )
            self.score_cache = torch.zeros(
                num_layers, num_blocks, self.num_kv_heads, self.block_size, device=self.device
            )
            # One row per (query slot, window position).
            self.q_cache = torch.zeros(
                num_layers, num_slots * config.window, num_q_heads, self.head_dim,
                dtype=self.dtype, device=self.device,
            )  # fmt: skip
            for i, layer in enumerate(self.model.model.layers):
                layer.self_attn.q_cache = self.q_cache[i]
        self.num_blocks, self.num_query_slots = num_blocks, num_slots
        self.kv_cache = self._empty_kv_cache(num_blocks)
        self._set_kv_cache(self.kv_cache)

    def _block_tables(self, seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        width = width or max(len(seq.block_table) for seq in seqs)
        return self._tensor(
            [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
        )

    def _slot(self, seq: Sequence, index: int) -> int:
        return seq.block_table[index // self.block_size] * self.block_size + index % self.block_size

    def _query_row(self, seq: Sequence, index: int, last_block: int) -> int:
        """Row of the query cache for the token at cache index `index`, or -1: window queries
        are the last `window` tokens of a block, and only those of seq's newest block are kept."""
        b, w = self.block_size, self.config.window
        if seq.query_slot < 0 or index % b < b - w or index // b != last_block:
            return -1
        return seq.query_slot * w + index % b - (b - w)

    def prepare_prefill(self, seqs: list[Sequence]):
        input_ids, positions, slots, cu_seqlens_q, context_lens, sample_rows = (
            [],
            [],
            [],
            [0],
            [],
            [],
        )
        query_rows = []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_new_tokens
            input_ids += seq[start:end]
            positions += range(start, end)
            slots += [self._slot(seq, i) for i in range(start, end)]
            if self.q_cache is not None:
                query_rows += [
                    self._query_row(seq, i, (end - 1) // self.block_size) for i in range(start, end)
                ]
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            context_lens.append(end)
            if end == len(seq):
                sample_rows.append(cu_seqlens_q[-1] - 1)
        set_context(
            is_prefill=True,
            slot_mapping=self._tensor(slots),
            context_lens=self._tensor(context_lens),
            block_tables=self._block_tables(seqs),
            cu_seqlens_q=self._tensor(cu_seqlens_q),
            max_seqlen_q=max(seq.num_new_tokens for seq in seqs),
            query_rows=self._tensor(query_rows, torch.long) if query_rows else None,
        )
        return self._tensor(input_ids, torch.long), self._tensor(positions, torch.long), sample_rows

    def prepare_decode(self, seqs: list[Sequence], pending: torch.Tensor | None):
        """The last token of each request: at position len - 1, but at cache index
        cache_len - 1 (they differ once the request has been compressed). A PENDING last token
        is read from `pending`, the samples of the step still in flight, on the device."""
        index = [seq.cache_len - 1 for seq in seqs]
        query_rows = None
        if self.q_cache is not None:
            rows = [self._query_row(s, i, i // self.block_size) for s, i in zip(seqs, index)]
            query_rows = self._tensor(rows, torch.long)
        set_context(
            slot_mapping=self._tensor([self._slot(seq, i) for seq, i in zip(seqs, index)]),
            context_lens=self._tensor([i + 1 for i in index]),
            block_tables=self._block_tables(seqs),
            query_rows=query_rows,
        )
        input_ids = self._tensor([seq.last_token for seq in seqs], torch.long)
        if pending is not None:
            rows = self._tensor([s.sample_row if s.last_token == PENDING else -1 for s in seqs])
            input_ids = torch.where(rows >= 0, pending[rows.clamp(min=0)], input_ids)
        return input_ids, self._tensor([len(seq) - 1 for seq in seqs], torch.long)

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], is_prefill: bool, pending: torch.Tensor | None = None
    ) -> "Samples | None":
        """Launch one forward pass and the sampling of the requests that reach their last token;
        returns their samples without waiting for the GPU (None if no request samples)."""
        if is_prefill:
            input_ids, positions, sample_rows = self.prepare_prefill(seqs)
            hidden = self.model(input_ids, positions)[sample_rows]
            seqs = [seq for seq in seqs if seq.num_computed_tokens + seq.num_new_tokens == len(seq)]
        else:
            input_ids, positions = self.prepare_decode(seqs, pending)
            hidden = self.run_decode(input_ids, positions)
        reset_context()
        if not seqs:
            return None
        return self.sample(seqs, self.model.compute_logits(hidden))

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

    def compress(self, jobs: list[tuple[Sequence, list[int]]]):
        """Run the compactions; asynchronous ones go on a side stream after the work already
        queued on the main stream (the requests' last K/V), and are handed back by
        `finished_compressions` once their event has fired."""
        if not (self.config.async_compression and self.use_cuda):
            self._compress(jobs)
            if self.config.async_compression:  # no side stream off the GPU: done at once
                self.pending.append((None, jobs))
            return
        self.compress_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.compress_stream):
            self._compress(jobs)
            done = torch.cuda.Event()
            done.record()
        self.pending.append((done, jobs))

    def finished_compressions(self) -> list[tuple[Sequence, list[int]]]:
        done = [event is None or event.query() for event, _ in self.pending]
        finished = [job for (_, jobs), d in zip(self.pending, done) if d for job in jobs]
        self.pending = [entry for entry, d in zip(self.pending, done) if not d]
        return finished

    def wait_for_compressions(self):
        if self.use_cuda:
            self.compress_stream.synchronize()

    @torch.inference_mode()
    def _compress(self, jobs: list[tuple[Sequence, list[int]]]):
        """Compress each request from its old block table into its new one (already planned by
        the block manager): score every cached token with the policy, keep `kv_budget` per
        (layer, KV head) in position order, and compact K, V and this compression's scores
        into the first blocks of the new table, a group of layers at a time."""
        config, b = self.config, self.block_size
        policy, num_layers = POLICIES[config.policy], len(self.model.model.layers)
        for seq, old_table in jobs:
            keep = seq.kv_budget
            old = self._tensor(old_table)
            new = self._tensor(seq.block_table[: keep // b])
            first = seq.num_compressions == 1  # counted when it was planned
            window_rows = slice(
                seq.query_slot * config.window, (seq.query_slot + 1) * config.window
            )
            for start in range(0, num_layers, config.compress_layers):
                layers = slice(start, min(start + config.compress_layers, num_layers))
                k_cache, v_cache = self.kv_cache[0, layers], self.kv_cache[1, layers]
                score_cache = self.score_cache[layers]
                # The request's keys and stored scores, dense: [layers, kvh, T, ...]
                keys = k_cache[:, old].transpose(1, 2).flatten(2, 3)
                prev = score_cache[:, old].transpose(1, 2).flatten(2)
                prev[..., 0 if first else keep :] = 0  # newer tokens were never scored
                state = CacheState(keys, self.q_cache[layers, window_rows], prev, first, b)
                score, stored = policy(state, config)
                kept = select(score, keep, config.window, config.num_sinks)  # [L, kvh, keep]
                compact(k_cache, old, new, kept)
                compact(v_cache, old, new, kept)
                # The scores are this compression's (dense), not the cache's: gather, not compact.
                kept_scores = stored.gather(2, kept).unflatten(2, (-1, b))
                score_cache[:, new] = kept_scores.transpose(1, 2)

    def sample(self, seqs: list[Sequence], logits: torch.Tensor):
        params = [seq.sampling_params for seq in seqs]
        for seq in seqs:
            if seq.sampling_params.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(self.device).manual_seed(seq.sampling_params.seed)
        filtered = any(p.top_k > 0 or p.top_p < 1 for p in params)
        tokens, logprobs = sample(
            logits,
            temperatures=self._tensor([p.temperature for p in params], torch.float32),
            top_ks=self._tensor([p.top_k for p in params]) if filtered else None,
            top_ps=self._tensor([p.top_p for p in params], torch.float32) if filtered else None,
            generators=[seq.generator for seq in seqs],
            greedy=all(p.temperature == 0 for p in params),
            want_logprobs=any(p.logprobs for p in params),
        )
        return Samples(tokens, logprobs)

    @torch.inference_mode()
    def capture_cudagraphs(self):
        """Capture the decode forward pass for a ladder of batch sizes over static buffers."""
        max_bs = self.config.max_num_seqs
        self.graph_sizes = sorted(
            {b for b in [1, 2, 4, 8, *range(16, max_bs, 16)] if b < max_bs} | {max_bs}
        )
        hidden_size = self.config.hf_config["hidden_size"]
        buf = self.graph_buffers = {
            "input_ids": torch.zeros(max_bs, dtype=torch.long, device=self.device),
            "positions": torch.zeros(max_bs, dtype=torch.long, device=self.device),
            "slot_mapping": torch.full((max_bs,), -1, dtype=torch.int32, device=self.device),
            "context_lens": torch.zeros(max_bs, dtype=torch.int32, device=self.device),
            "block_tables": torch.zeros(
                max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=self.device
            ),
            "hidden": torch.zeros(max_bs, hidden_size, dtype=self.dtype, device=self.device),
        }
        if self.q_cache is not None:
            buf["query_rows"] = torch.full((max_bs,), -1, dtype=torch.long, device=self.device)
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
            reset_context()
