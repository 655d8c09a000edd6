"""Sampling: greedy, top-k, top-p, seeds, and logprobs of the chosen token."""

import torch

from nanozipage.sampler import sample


def run(logits, temperature=1.0, top_k=0, top_p=1.0, generators=None, greedy=False):
    b = logits.shape[0]
    return sample(
        logits,
        torch.full((b,), temperature),
        torch.full((b,), top_k, dtype=torch.int32),
        torch.full((b,), top_p),
        generators or [None] * b,
        greedy,
        want_logprobs=True,
    )


def test_greedy_takes_argmax_and_reports_its_logprob():
    logits = torch.randn(5, 100)
    tokens, logprobs = run(logits, temperature=0.0, greedy=True)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).max(-1).values)


def test_zero_temperature_rows_are_greedy_in_a_sampled_batch():
    logits = torch.randn(4, 50)
    temps = torch.tensor([0.0, 1.0, 0.0, 1.0])
    tokens, _ = sample(
        logits,
        temps,
        torch.zeros(4, dtype=torch.int32),
        torch.ones(4),
        [None] * 4,
        greedy=False,
        want_logprobs=False,
    )
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.randn(1, 20).repeat(2000, 1)
    allowed_k = set(logits[0].topk(3).indices.tolist())
    tokens, _ = run(logits, temperature=2.0, top_k=3)
    assert set(tokens.tolist()) == allowed_k
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    n = int((cum < 0.6).sum()) + 1  # smallest prefix reaching 0.6
    tokens, _ = run(logits, top_p=0.6)
    assert set(tokens.tolist()) == set(order[:n].tolist())


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    tokens, _ = run(logits)
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.02, rtol=0)


def test_seeded_rows_repeat_whatever_the_batch():
    logits = torch.randn(3, 1000)
    gens = [torch.Generator().manual_seed(7), None, torch.Generator().manual_seed(7)]
    tokens, _ = run(logits[[0, 1, 0]], generators=gens)
    assert tokens[0] == tokens[2]
    alone, _ = run(logits[:1], generators=[torch.Generator().manual_seed(7)])
    assert alone[0] == tokens[0]
