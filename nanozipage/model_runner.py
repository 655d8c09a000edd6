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
from nanozipage.model import CausalLM
from nanozipage.sampler import sample
from nanozipage.sampling_params import SamplingParams
from nanozipage.sequence import Sequence

CPU_KV_CACHE_BYTES = 1 << 30  # with no GPU to size from, give the KV pool 1 GiB by default
_GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


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
        self.model.load_weights(config.model)
        self.model.eval()
        attn = self.model.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
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
        config = self.config
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
            num_blocks = int(spare // block_bytes)
        else:
            num_blocks = CPU_KV_CACHE_BYTES // block_bytes
        if config.num_kvcache_blocks is not None:
            num_blocks = min(num_blocks, config.num_kvcache_blocks)
        if num_blocks < 1:
            raise ValueError(
                "gpu_memory_utilization leaves no memory for the KV cache; raise it "
                "or lower max_num_batched_tokens"
            )
        self.num_blocks = num_blocks
        self.kv_cache = self._empty_kv_cache(num_blocks)
        self._set_kv_cache(self.kv_cache)

    def _block_tables(self, seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        width = width or max(len(seq.block_table) for seq in seqs)
        return self._tensor(
            [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
        )

    def _slot(self, seq: Sequence, index: int) -> int:
        return seq.block_table[index // self.block_size] * self.block_size + index % self.block_size

    def prepare_prefill(self, seqs: list[Sequence]):
        input_ids, positions, slots, cu_seqlens_q, context_lens, sample_rows = (
            [],
            [],
            [],
            [0],
            [],
            [],
        )
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_new_tokens
            input_ids += seq[start:end]
            positions += range(start, end)
            slots += [self._slot(seq, i) for i in range(start, end)]
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
        )
        return self._tensor(input_ids, torch.long), self._tensor(positions, torch.long), sample_rows

    def prepare_decode(self, seqs: list[Sequence]):
        set_context(
            slot_mapping=self._tensor([self._slot(seq, len(seq) - 1) for seq in seqs]),
            context_lens=self._tensor([len(seq) for seq in seqs]),
            block_tables=self._block_tables(seqs),
        )
        return (
            self._tensor([seq.last_token for seq in seqs], torch.long),
            self._tensor([len(seq) - 1 for seq in seqs], torch.long),
        )

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool):
        """One forward pass; returns (token ids, logprobs) of the requests that sample."""
        if is_prefill:
            input_ids, positions, sample_rows = self.prepare_prefill(seqs)
            hidden = self.model(input_ids, positions)[sample_rows]
            seqs = [seq for seq in seqs if seq.num_computed_tokens + seq.num_new_tokens == len(seq)]
        else:
            input_ids, positions = self.prepare_decode(seqs)
            hidden = self.run_decode(input_ids, positions)
        reset_context()
        if not seqs:
            return [], None
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
        self.graphs[graph_bs].replay()
        return buf["hidden"][:bs]

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
        return tokens.tolist(), None if logprobs is None else logprobs.tolist()

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
        pool = None
        for bs in reversed(self.graph_sizes):
            set_context(
                slot_mapping=buf["slot_mapping"][:bs],
                context_lens=buf["context_lens"][:bs],
                block_tables=buf["block_tables"][:bs],
            )
            buf["hidden"][:bs] = self.model(buf["input_ids"][:bs], buf["positions"][:bs])  # warm up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                buf["hidden"][:bs] = self.model(buf["input_ids"][:bs], buf["positions"][:bs])
            pool = pool or graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
            reset_context()
