"""Every knob in one object, validated once: `LLM(model, **config)` builds it, and an unknown
key is an error (a typo must not be silently ignored). Names follow nano-vllm."""

import json
import os
from dataclasses import dataclass, field

import torch

from nanozipage.policy import make_policy

# model_type -> architecture (qwen3 -> Qwen3ForCausalLM), for a config without `architectures`
ARCHITECTURES = {t: f"{t.title()}ForCausalLM" for t in ("qwen3", "qwen2", "llama")}
LOAD_FORMATS = ("safetensors", "dummy")
DTYPES = (None, "float32", "float16", "bfloat16")


@dataclass(slots=True)
class Config:
    model: str
    max_num_batched_tokens: int = 16384  # tokens per prefill step (longer prompts are chunked)
    max_num_seqs: int = 512  # requests decoding at once
    max_model_len: int | None = None  # prompt + output; default: the model's context length
    gpu_memory_utilization: float = 0.9  # share of GPU memory the engine may fill (KV sizing)
    num_kvcache_blocks: int | None = None  # cap on KV blocks (None: as many as memory allows)
    block_size: int = 256  # tokens per KV block
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    overlap_scheduling: bool = True  # plan and launch step N+1 while the GPU runs step N
    dtype: str | None = None  # None: the checkpoint's dtype on GPU, float32 on CPU
    device: str | None = None  # None: cuda if available, else cpu
    load_format: str = "safetensors"  # or "dummy" (vLLM's): seeded random weights, to time
    tensor_parallel_size: int = 1  # processes (GPUs) one model is split over; rank r: cuda:r
    # Compressed PagedAttention (docs/DESIGN.md section 2); kv_budget=None: the full-KV engine.
    kv_budget: int | None = 2048  # tokens kept per (layer, KV head) after a compression
    window: int = 16  # observation window: the last queries before a block boundary
    first_window: int | None = None  # the same at a first compression (None: 2 x window, <= b)
    num_sinks: int = 0  # first tokens always kept
    compress_layers: int = 64  # scored at once: fewer bound temporary memory, more save launches
    policy: str = "spans"  # eviction policy, a key of nanozipage.policy.POLICIES
    policy_args: dict = field(default_factory=dict)  # its parameters (its dataclass's fields)
    async_compression: bool = True  # on a side stream while the other requests decode
    max_compress_blocks: int = 600  # blocks being compressed at once (bounds temporary memory)
    hf_config: dict = field(default_factory=dict)  # the checkpoint's config.json (filled here)

    def __post_init__(self):
        self.model = model_dir(self.model)  # from here on, the engine reads only this directory
        path = os.path.join(self.model, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"model: {self.model!r} is not a directory with a config.json")
        with open(path) as f:
            self.hf_config = hf = json.load(f)
        model_type = hf.get("model_type")
        arch = (hf.get("architectures") or [ARCHITECTURES.get(model_type, f"of {model_type=}")])[0]
        if arch not in ARCHITECTURES.values():
            raise ValueError(
                f"model: architecture {arch} is not supported; "
                f"supported: {', '.join(ARCHITECTURES.values())}"
            )
        hf["architectures"] = [arch]  # the model reads the architecture here, always set
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r}, but torch sees no GPU; use device='cpu'")
        if self.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # small CPU ops: more threads mostly wait for busy cores
        model_len = hf.get("max_position_embeddings", 1 << 20)
        self.max_model_len = model_len if self.max_model_len is None else self.max_model_len
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _check_int(name, getattr(self, name), 1)
        _check_int("max_model_len", self.max_model_len, 1, model_len)
        gpus = torch.cuda.device_count() if cuda else None
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1, gpus)
        if self.num_kvcache_blocks is not None:
            _check_int("num_kvcache_blocks", self.num_kvcache_blocks, 1)
        checks = {  # knob: (valid, what is allowed)
            "gpu_memory_utilization": (0 < self.gpu_memory_utilization <= 1, "in (0, 1]"),
            "load_format": (self.load_format in LOAD_FORMATS, f"one of {', '.join(LOAD_FORMATS)}"),
            "dtype": (self.dtype in DTYPES, "float32, float16 or bfloat16"),
        }
        make_policy(self.policy, self.policy_args)  # a typo is an error, also under full KV
        for name, low in (("compress_layers", 1), ("max_compress_blocks", 1), ("num_sinks", 0)):
            _check_int(name, getattr(self, name), low)
        if self.first_window is None:  # the scheduler reads it under full KV too
            self.first_window = min(2 * self.window, self.block_size)
        if self.kv_budget is not None:
            check_kv_budget(self.kv_budget, self)
            _check_int("first_window", self.first_window, self.window, self.block_size)
        for name, (valid, allowed) in checks.items():
            if not valid:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        tp = self.tensor_parallel_size
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            size = hf.get(name, hf["num_attention_heads"])  # no num_key_value_heads: MHA
            if size % tp:  # every rank holds whole heads: KV heads are split, never replicated
                raise ValueError(
                    f"tensor_parallel_size={tp} must divide the model's {name}={size} "
                    "(KV heads are split over the ranks, not replicated)"
                )


def model_dir(model: str) -> str:
    """`model` if a directory (`~` expanded), else its snapshot in the local Hugging Face cache
    ($HF_HUB_CACHE, read now). Never downloads: a load must not hang."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        validate_repo_id(model)
    except ValueError:  # a path, not a hub id: nothing to download
        hint = "pass a checkpoint directory or a hub id"
    else:
        try:
            return snapshot_download(model, cache_dir=cache, local_files_only=True)
        except (ValueError, OSError):  # not cached
            hint = f"download it with `hf download {model}`, or pass a directory"
    raise ValueError(
        f"model: {path!r} is not a local directory and not in the Hugging Face cache at {cache}; "
        + hint
    )


def max_blocks(kv_budget: int, block_size: int) -> int:
    """N_max: the most blocks a request holds, its budget plus one block for the next tokens."""
    return kv_budget // block_size + 1


def check_kv_budget(budget, config: Config):
    """Whole blocks, room for the window and a block (or the sinks, if more); the window fits."""
    b, window, sinks = config.block_size, config.window, config.num_sinks
    _check_int("window", window, 1, b)
    least = window + max(b, sinks)
    if not isinstance(budget, int) or budget % b or budget < least:
        smallest = -(-least // b) * b
        raise ValueError(
            f"kv_budget must be a multiple of block_size={b}, >= window={window} + max(block_size, "
            f"num_sinks={sinks}) = {least} ({smallest}, {smallest + b}, ...), got {budget!r}"
        )


def _check_int(name: str, value, low: int, high: int | None = None):
    if type(value) is not int or value < low or (high is not None and value > high):  # not bool
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
