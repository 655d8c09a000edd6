"""The eviction policies as functions: their parameters are validated when the engine is built,
and each returns a score and a score to store per (layer, KV head, token). That each gives the
engine the dense reference's tokens is tested in test_compression.py and test_differential.py,
over every entry of `POLICIES`."""

import pytest
import torch
from dense_reference import dense_state
from helpers import make_tiny_model

from nanozipage import LLM, SamplingParams
from nanozipage.config import Config
from nanozipage.policy import POLICIES, CacheState, make_policy, protect, select


def state(first: bool = True, layers: range = range(3, 5), seed: int = 0) -> CacheState:
    """Two layers, 2 KV heads of a GQA group of 2, 64 tokens in blocks of 16, window 4."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, 64, 8, generator=gen)
    queries = torch.randn(2, 4, 4, 8, generator=gen)
    prev = torch.zeros(2, 2, 64) if first else torch.rand(2, 2, 64, generator=gen)
    return dense_state(keys, queries, prev, first, 16, layers, 32)


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_every_policy_scores_every_token_of_every_head(name, first):
    score, stored = make_policy(name)(state(first))
    assert score.shape == stored.shape == (2, 2, 64)
    assert not score.isnan().any() and stored.isfinite().all()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"policy": "lru"}, "policy must be one of spans, zipage, "),
        ({"policy_args": {"decay": 0.5, "pool": 3}}, r"'spans' policy's parameters \(decay, pool"),
        ({"policy": "h2o", "policy_args": {"decay": 0.5}}, r"'h2o' policy's parameters \(none\)"),
        ({"policy_args": {"decay": 2}}, r"decay must be in \[0, 1\], got 2"),
        ({"policy_args": {"pool_kernel": 4}}, "pool_kernel must be an odd integer"),
        ({"policy": "zipage", "policy_args": {"decay": 0}}, r"decay must be in \(0, 1\], got 0"),
        ({"policy": "zipage", "policy_args": {"score_weight": 2}}, r"score_weight must be in \["),
        ({"policy": "zipage", "policy_args": {"redundancy_tau": -1}}, "redundancy_tau must be > 0"),
        ({"policy": "rkv", "policy_args": {"importance_weight": -0.1}}, "importance_weight"),
        ({"policy": "streamingllm", "policy_args": {"sinks": -1}}, "sinks must be"),
        ({"policy": "random", "policy_args": {"seed": 0.5}}, "seed must be an integer"),
        ({"policy": "zipage", "policy_args": {"decay": None}}, r"decay must be in \(0, 1\], got N"),
        ({"policy": "zipage", "policy_args": {"redundancy_tau": "1"}}, r"tau must be > 0, got '1'"),
        (
            {"policy_args": {"pool_kernel": True}},
            "pool_kernel must be an odd integer > 0, got True",
        ),
        ({"policy_args": {"newest": False}}, r"newest must be in \[0, 1\], got False"),
        ({"policy_args": [("decay", 0.5)]}, "policy_args must be a dict"),
        ({"policy": "lru", "kv_budget": None}, "policy must be one of"),  # a typo, also full KV
    ],
)
def test_bad_policy_or_policy_args_raise_when_the_engine_is_built(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        LLM(make_tiny_model("llama", tmp_path), **config)


def test_policy_args_reach_the_policy(tmp_path):
    config = Config(make_tiny_model("llama", tmp_path), policy="zipage", policy_args={"decay": 0.1})
    s = state(first=False)
    score = make_policy(config.policy, config.policy_args)(s)[0]
    assert torch.equal(score, make_policy("zipage", {"decay": 0.1})(s)[0])
    assert not torch.equal(score, make_policy("zipage")(s)[0])  # the default decay, 0.8


def test_random_draws_once_per_token_and_differs_per_layer_and_head():
    s = state()
    score, stored = make_policy("random")(s)
    assert torch.equal(score, make_policy("random")(s)[0])  # a function of the state alone
    assert not torch.equal(score, make_policy("random", {"seed": 1})(s)[0])
    assert not torch.equal(score[0], score[1]) and not torch.equal(score[:, 0], score[:, 1])
    assert not torch.equal(score, make_policy("random")(state(layers=range(2)))[0])
    kept = stored[..., :48]  # a later compression: 48 kept tokens, 16 new
    prev = torch.cat([kept, torch.zeros(2, 2, 16)], -1)
    later = make_policy("random")(dense_state(s.keys, s.queries, prev, False, 16, s.layers, 32))[0]
    assert torch.equal(later[..., :48], kept)  # a kept token keeps its priority
    assert not torch.equal(later[..., 48:], score[..., 48:])  # new tokens draw afresh


def test_streamingllm_keeps_the_sinks_and_the_newest():
    score = make_policy("streamingllm", {"sinks": 2})(state())[0]
    kept = score[0, 0].topk(10).indices.sort().values
    assert kept.tolist() == [0, 1, *range(56, 64)]


@pytest.mark.parametrize(
    "first, last, expected",
    [(2, 3, [0, 1, 7, 8, 9]), (0, 0, []), (0, 15, list(range(10))), (12, 0, list(range(10)))],
)
def test_protect_marks_the_first_and_last_tokens_and_no_others(first, last, expected):
    score = protect(torch.arange(10.0), first, last)
    assert score.isinf().nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("newest, sinks", [(0.25, 4), (0.5, 2), (1.0, 4)])
def test_spans_keeps_its_sinks_and_newest_share_whatever_the_attention(newest, sinks):
    s = state()  # keep 32 of 64 tokens
    score = make_policy("spans", {"newest": newest, "sinks": sinks})(s)[0]
    kept = select(score, s.keep, 4, 0)
    num_newest = min(int(newest * s.keep), s.keep - sinks)
    protected = [*range(sinks), *range(64 - num_newest, 64)]
    for row in kept.flatten(0, 1):
        assert set(protected) <= set(row.tolist())
        assert len(set(row.tolist())) == s.keep


@pytest.mark.parametrize("policy", ["streamingllm", "spans"])
def test_select_keeps_the_window_before_a_policys_sinks_however_many(policy):
    s = state()  # keep 32 of 64 tokens
    args = {"sinks": 40} | ({"newest": 1.0} if policy == "spans" else {})
    score = make_policy(policy, args)(s)[0]
    for num_sinks in (0, 3):
        kept = select(score, s.keep, 4, num_sinks)
        assert (kept == torch.tensor([*range(28), *range(60, 64)])).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_keydiff_ranks_by_cosine_with_the_mean_unit_key(dtype):
    # Keys with a common direction and large norms: a sum rather than a mean of the unit keys
    # would overflow float16 over 512 tokens.
    gen = torch.Generator().manual_seed(1)
    keys = (torch.randn(1, 2, 512, 16, generator=gen) + 2) * 300
    s = dense_state(
        keys.to(dtype), torch.zeros(1, 4, 4, 16), torch.zeros(1, 2, 512), True, 16, range(1), 256
    )
    score = make_policy("keydiff")(s)[0]
    unit = torch.nn.functional.normalize(keys, dim=-1)
    cosine = torch.nn.functional.cosine_similarity(unit, unit.mean(-2, keepdim=True), dim=-1)
    assert score.isfinite().all()
    ours, exact = select(score, 256, 0, 0), select(-cosine, 256, 0, 0)
    agree = (ours.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float().mean()
    assert agree == 1 if dtype == torch.float32 else agree > 0.97


def test_a_policy_sees_the_tokens_it_keeps_whole_blocks_and_its_window(tmp_path, monkeypatch):
    seen, observed = [], set()

    def spy(state: CacheState, p):
        seen.append((state.keep, state.keys.shape[-2]))
        observed.add((state.first, state.queries.shape[1]))
        return make_policy("spans")(state)

    monkeypatch.setitem(POLICIES, "spy", POLICIES["spans"]._replace(score=spy))
    llm = LLM(
        make_tiny_model("llama", tmp_path),
        block_size=16,
        kv_budget=48,
        window=4,
        first_window=6,
        policy="spy",
    )
    params = [
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, kv_budget=b)
        for b in (32, None)
    ]
    llm.generate([[1, 2, 3], list(range(5, 85))], params, use_tqdm=False)
    assert {keep for keep, _ in seen} == {32, 48}  # the request's own budget, or the engine's
    for keep, num_tokens in seen:  # N_max = keep / 16 + 1 whole blocks, more after a long prompt
        assert num_tokens % 16 == 0 and num_tokens >= keep + 16
    assert (48, 80) in seen  # the 80-token prompt's first compression
    assert observed == {(True, 6), (False, 4)}  # first_window queries at a first, then window
