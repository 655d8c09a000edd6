"""Sampling: greedy, penalties, min-p, top-k, top-p, seeds, and logprobs of the chosen token."""

import random

import torch

from nanozipage.sampler import TokenCounts, _top_k_top_p, sample


def run(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=None, generators=None, **penalized):
    """sample() with the same settings on every row; penalized: token_counts, rows, penalties."""
    b = logits.shape[0]
    filtered = top_k != 0 or top_p < 1
    return sample(
        logits,
        torch.full((b,), float(temperature)),
        generators or [None] * b,
        greedy=temperature == 0,
        want_logprobs=True,
        top_ks=torch.full((b,), top_k, dtype=torch.int32) if filtered else None,
        top_ps=torch.full((b,), top_p) if filtered else None,
        min_ps=None if min_p is None else torch.full((b,), min_p),
        **penalized,
    )


def seeded(n):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def reference_penalties(logits, prompt, output, repetition, frequency, presence):
    """vLLM's penalties for one row, token by token in plain Python."""
    out = logits.tolist()
    for t in range(len(out)):
        if t in prompt or t in output:
            out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
        out[t] -= frequency * output.count(t) + presence * (t in output)
    return torch.tensor(out)


def random_histories(batch, vocab, rng):
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(batch)]
    outputs = [[rng.randrange(vocab) for _ in range(rng.randint(0, 30))] for _ in range(batch)]
    weights = [
        [rng.uniform(0.5, 2.0), rng.uniform(-2, 2), rng.uniform(-2, 2)] for _ in range(batch)
    ]
    return prompts, outputs, weights


def test_penalties_match_a_reference_loop_and_steer_greedy_choice():
    rng, vocab = random.Random(0), 40
    logits = torch.randn(6, vocab) * 3
    prompts, outputs, weights = random_histories(6, vocab, rng)
    counts = TokenCounts(vocab, "cpu")
    rows = torch.tensor([counts.add_row(p, o) for p, o in zip(prompts, outputs)])
    penalties = torch.tensor(weights)
    history = zip(logits, prompts, outputs, weights)
    expected = torch.stack([reference_penalties(x, p, o, *w) for x, p, o, w in history])
    torch.testing.assert_close(counts.penalize(logits, rows, penalties), expected)
    tokens, logprobs = run(logits, 0.0, token_counts=counts, rows=rows, penalties=penalties)
    assert torch.equal(tokens, expected.argmax(-1))
    # The logprob stays the model's own, before any penalty.
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])


def test_recorded_counts_equal_counting_the_history_over_several_steps():
    rng, vocab = random.Random(1), 30
    prompts, outputs, weights = random_histories(7, vocab, rng)  # 7 rows: the tensors grow twice
    counts = TokenCounts(vocab, "cpu")
    rows = [counts.add_row(p, o) for p, o in zip(prompts, outputs)]
    counts.free_row(rows[2])  # a finished request's row is handed out again, refilled
    rows[2] = counts.add_row(prompts[2], outputs[2])
    batch = torch.tensor(rows + [-1])  # and a request without penalties
    penalties = torch.tensor(weights + [[1.0, 0.0, 0.0]])
    for _ in range(5):
        tokens, _ = run(torch.randn(8, vocab), token_counts=counts, rows=batch, penalties=penalties)
        for output, token in zip(outputs, tokens.tolist()):
            output.append(token)
    for row, prompt, output in zip(rows, prompts, outputs):
        assert torch.equal(
            counts.counts[row], torch.bincount(torch.tensor(output), minlength=vocab)
        )
        assert counts.in_prompt[row].nonzero().flatten().tolist() == sorted(set(prompt))
    assert not counts.counts[-1].any() and not counts.in_prompt[-1].any()  # what row -1 reads


def test_rows_without_penalties_are_unchanged():
    counts, logits = TokenCounts(20, "cpu"), torch.randn(3, 20)
    row = counts.add_row([1, 2, 3], [4, 4, 5])
    rows = torch.tensor([-1, row, -1])
    penalties = torch.tensor([[1.0, 0.0, 0.0], [1.5, 0.5, 0.5], [1.0, 0.0, 0.0]])
    penalized = counts.penalize(logits, rows, penalties)
    assert torch.equal(penalized[[0, 2]], logits[[0, 2]])
    assert not torch.equal(penalized[1], logits[1])
    tokens, _ = run(
        logits, generators=seeded(3), token_counts=counts, rows=rows, penalties=penalties
    )
    alone, _ = run(logits, generators=seeded(3))
    assert tokens[0] == alone[0] and tokens[2] == alone[2]


def test_an_engine_without_penalties_allocates_nothing():
    counts = TokenCounts(151_936, "cpu")
    assert counts.counts.numel() == 0 and counts.in_prompt.numel() == 0


def test_greedy_takes_argmax_and_reports_its_logprob():
    logits = torch.randn(5, 100)
    tokens, logprobs = run(logits, temperature=0.0)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).max(-1).values)


def test_zero_temperature_rows_are_greedy_in_a_sampled_batch():
    logits = torch.randn(4, 50)
    temps = torch.tensor([0.0, 1.0, 0.0, 1.0])
    top_ks, top_ps, min_ps = torch.tensor([0, 5, -1, 1]), torch.ones(4), torch.full((4,), 0.5)
    tokens, _ = sample(logits, temps, [None] * 4, False, False, top_ks, top_ps, min_ps)
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


def test_the_likeliest_token_stays_however_small_top_p_is():
    logits = torch.randn(50, 20)
    for top_p in (1e-3, 1e-50):  # 1e-50 is 0 in float32: every token would reach it
        tokens, _ = run(logits, top_p=top_p, generators=seeded(50))
        assert torch.equal(tokens, logits.argmax(-1))


def test_top_p_of_one_keeps_every_token_beside_a_row_that_filters():
    """A row's support does not depend on its batch: with another row's top-k the filter runs on
    every row, and the float32 sum of a peaked row reaches 1 after its first token."""
    logits = torch.zeros(2, 10)
    logits[:, 0] = 30
    filtered = _top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert torch.isinf(filtered[0]).sum() == 8 and not torch.isinf(filtered[1]).any()


def test_banned_tokens_are_never_chosen_nor_change_the_logprobs():
    logits = torch.randn(3, 10)
    top = logits.argmax(-1)
    banned = (torch.tensor([0, 0, 2]), torch.stack([top[0], (top[0] + 1) % 10, top[2]]))
    for temperature in (0, 1.0):
        tokens, logprobs = sample(
            logits,
            torch.full((3,), float(temperature)),
            [None] * 3,
            temperature == 0,
            True,
            banned=banned,
        )
        assert tokens[0] not in banned[1][:2] and tokens[2] != top[2]
        assert temperature or tokens[1] == top[1]
        assert torch.allclose(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])


def test_min_p_keeps_the_tokens_at_least_min_p_times_as_likely_as_the_top_one():
    logits = torch.randn(1, 20).repeat(3000, 1)
    probs = (logits[0] / 0.7).softmax(-1)  # min_p reads the probabilities after temperature
    allowed = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    tokens, _ = run(logits, temperature=0.7, min_p=0.2)
    assert set(tokens.tolist()) == allowed and len(allowed) > 1


def test_top_k_minus_one_zero_and_above_the_vocabulary_are_all_off():
    logits = torch.randn(4, 30)
    unfiltered, _ = run(logits, generators=seeded(4))
    for top_k in (-1, 2**31 - 1):
        tokens, _ = run(logits, top_k=top_k, generators=seeded(4))
        assert torch.equal(tokens, unfiltered)


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
