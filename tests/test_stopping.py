"""Stop conditions end to end: EOS ids, stop token ids, stop strings, min_tokens, max_tokens.

Token-level stops run on a tiny random Qwen3 (no tokenizer, no EOS of its own: the tests give it
one); stop strings run on SmolLM2-135M-Instruct, whose text they need. Every expectation comes
from a greedy free run (ignore_eos, no stop) of the same prompt: a stopped run must be that run
cut right after the token that stops it. The overlapped and the plain loop must agree.
"""

import functools
import json
import random
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
from helpers import make_tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nanozipage import LLM, SamplingParams
from nanozipage.llm_engine import eos_token_ids
from nanozipage.sequence import Sequence
from nanozipage.stop import StopConditions

FREE = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(256) for _ in range(_rng.randint(3, 40))] for _ in range(4)][1:]
TINY_CONFIG = {"kv_budget": None, "block_size": 16, "num_kvcache_blocks": 64}


def cut(tokens: list[int], stop_ids, min_tokens: int = 0) -> list[int]:
    """tokens up to and including the first stop id at or after the min_tokens-th token."""
    i = next((i for i, t in enumerate(tokens) if t in stop_ids and i + 1 >= min_tokens), None)
    return tokens if i is None else tokens[: i + 1]


def without_request_id(outputs, also=()) -> list[dict]:
    return [{k: v for k, v in o.items() if k not in ("request_id", *also)} for o in outputs]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def free(tiny_dir) -> list[list[int]]:
    outputs = LLM(tiny_dir, **TINY_CONFIG).generate(PROMPTS, FREE, use_tqdm=False)
    return [o["token_ids"] for o in outputs]


@pytest.fixture(scope="module")
def eos_list(free) -> list[int]:
    """Two EOS ids: the first stops prompt 1 early, the second (the one a single-id reading of
    the list misses) stops prompt 0 early; prompt 2 meets neither before its third token."""
    second = free[0][2]
    first = next(t for t in free[1][:4] if t != second)
    assert first not in free[0][:3] and second not in free[1][: free[1].index(first)]
    return [first, second]


def with_generation_config(src: str, dst, generation_config: dict) -> str:
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(generation_config))
    return str(dst)


@pytest.fixture(scope="module")
def eos_dir(tiny_dir, eos_list, tmp_path_factory) -> str:
    dst = tmp_path_factory.mktemp("eos") / "model"
    return with_generation_config(tiny_dir, dst, {"eos_token_id": eos_list})


def test_eos_ids_come_from_generation_config_else_config_json_else_the_tokenizer(tmp_path):
    tokenizer = SimpleNamespace(eos_token_id=7)
    assert eos_token_ids(str(tmp_path), {"eos_token_id": [3, 4]}, tokenizer) == {3, 4}
    assert eos_token_ids(str(tmp_path), {"eos_token_id": 5}, tokenizer) == {5}
    assert eos_token_ids(str(tmp_path), {}, tokenizer) == {7}
    assert eos_token_ids(str(tmp_path), {}, None) == set()
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 9, 8]}')
    assert eos_token_ids(str(tmp_path), {"eos_token_id": 5}, tokenizer) == {1, 9, 8}
    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 1}')  # no EOS there
    assert eos_token_ids(str(tmp_path), {"eos_token_id": 5}, tokenizer) == {5}


def test_every_id_of_an_eos_list_stops_a_request(eos_dir, eos_list, free):
    outputs = LLM(eos_dir, **TINY_CONFIG).generate(
        PROMPTS, replace(FREE, ignore_eos=False), use_tqdm=False
    )
    for out, tokens in zip(outputs, free):
        assert out["token_ids"] == cut(tokens, eos_list)
        stopped = out["token_ids"] != tokens
        assert (out["finish_reason"], out["stop_reason"]) == ("stop" if stopped else "length", None)
    assert [o["token_ids"][-1] for o in outputs[:2]] == [eos_list[1], eos_list[0]]


def test_stop_token_ids_stop_and_are_the_stop_reason(tiny_dir, free):
    stop = free[0][5]
    params = replace(FREE, stop_token_ids=[stop, 255])
    outputs = LLM(tiny_dir, **TINY_CONFIG).generate(PROMPTS, params, use_tqdm=False)
    for out, tokens in zip(outputs, free):
        assert out["token_ids"] == cut(tokens, {stop, 255})
        if out["token_ids"] != tokens:
            assert (out["finish_reason"], out["stop_reason"]) == ("stop", out["token_ids"][-1])
    assert outputs[0]["stop_reason"] == stop and len(outputs[0]["token_ids"]) <= 6


def test_ignore_eos_disables_only_eos_not_stop_token_ids(eos_dir, eos_list, free):
    stop = next(t for t in free[0][3:] if t not in eos_list)  # after prompt 0's EOS
    params = replace(FREE, ignore_eos=True, stop_token_ids=[stop])
    out = LLM(eos_dir, **TINY_CONFIG).generate(PROMPTS[0], params, use_tqdm=False)
    assert len(out) == 1
    assert out[0]["token_ids"] == cut(free[0], {stop})
    assert (out[0]["finish_reason"], out[0]["stop_reason"]) == ("stop", stop)


@pytest.mark.parametrize("kind", ["eos", "stop_token_ids"])
def test_min_tokens_bans_stop_ids_until_that_many_tokens(tiny_dir, free, tmp_path, kind):
    # A token that a run emits twice, at least two tokens apart: min_tokens between them.
    prompt, tokens, first, stop = next(
        (prompt, tokens, tokens.index(t), t)
        for prompt, tokens in zip(PROMPTS, free)
        for i, t in enumerate(tokens)
        if t in tokens[: max(i - 1, 0)]
    )
    min_tokens = first + 2  # the first occurrence is too early
    params = replace(FREE, ignore_eos=False, min_tokens=min_tokens)
    if kind == "eos":
        model = with_generation_config(tiny_dir, tmp_path / "model", {"eos_token_id": [stop]})
    else:
        model, params = tiny_dir, replace(params, stop_token_ids=[stop])
    llm = LLM(model, **TINY_CONFIG)
    early, late = llm.generate(
        [prompt] * 2, [replace(params, min_tokens=0), params], use_tqdm=False
    )
    assert early["token_ids"] == tokens[: first + 1]
    # As vLLM: the stop id is not sampled before min_tokens, so the run takes another token
    # where it came first, and from there goes its own way.
    late = late["token_ids"]
    assert late[:first] == tokens[:first] and late[first] != stop
    assert stop not in late[:min_tokens] and len(late) > min_tokens


def test_an_eos_id_beyond_the_vocabulary_is_no_error_under_min_tokens(tiny_dir, tmp_path):
    model = with_generation_config(tiny_dir, tmp_path / "model", {"eos_token_id": [300, 301]})
    out = LLM(model, **TINY_CONFIG).generate(
        [1, 2, 3], replace(FREE, ignore_eos=False, min_tokens=3), use_tqdm=False
    )
    assert len(out[0]["token_ids"]) == FREE.max_tokens


def test_a_request_without_a_stop_ends_at_max_tokens_with_reason_length(tiny_dir):
    out = LLM(tiny_dir, **TINY_CONFIG).generate(
        [1, 2, 3], replace(FREE, max_tokens=7), use_tqdm=False
    )
    assert len(out) == 1 and len(out[0]["token_ids"]) == 7
    assert (out[0]["finish_reason"], out[0]["stop_reason"]) == ("length", None)
    assert out[0]["prompt_token_ids"] == [1, 2, 3]


def test_token_stops_give_the_same_outputs_in_the_overlapped_and_the_plain_loop(
    eos_dir, eos_list, free
):
    stop = free[2][4]
    params = [
        replace(FREE, ignore_eos=False),
        replace(FREE, ignore_eos=False, stop_token_ids=[stop]),
        replace(FREE, ignore_eos=True, stop_token_ids=[stop]),
        replace(FREE, ignore_eos=False, min_tokens=6),
        replace(FREE, max_tokens=5),
    ]
    params = [replace(p, logprobs=True) for p in params]
    prompts = [p for p in PROMPTS for _ in params]
    outputs = {
        overlap: LLM(eos_dir, overlap_scheduling=overlap, **TINY_CONFIG).generate(
            prompts, params * len(PROMPTS), use_tqdm=False
        )
        for overlap in (True, False)
    }
    assert without_request_id(outputs[True]) == without_request_id(outputs[False])
    assert all(len(o["logprobs"]) == len(o["token_ids"]) for o in outputs[True])
    reasons = {(o["finish_reason"], o["stop_reason"]) for o in outputs[True]}
    assert {("stop", None), ("stop", stop), ("length", None)} <= reasons


def sentencepiece_model(path) -> str:
    """A tiny Llama with a tokenizer that decodes as Llama-2's (SentencePiece): id i is the word
    "w{i}" after a space, and the decoder drops the space before the first word it decodes."""
    make_tiny_model("llama", path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"\u2581w{i}": i for i in range(3, 256)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.save(str(path / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def test_the_text_reads_on_from_the_prompt_with_a_sentencepiece_tokenizer(tmp_path):
    """The text is what decoding prompt and completion together adds to the prompt's text (as
    vLLM's), not the completion decoded alone, which loses its first space; a stop string that
    begins with that space is found in the first token."""
    llm = LLM(sentencepiece_model(tmp_path), **TINY_CONFIG)
    free = llm.generate(["w5 w6 w7"], replace(FREE, max_tokens=6), use_tqdm=False)[0]
    prompt, tokens = free["prompt_token_ids"], free["token_ids"]
    decode = functools.partial(llm.tokenizer.decode, skip_special_tokens=True)
    assert free["text"] == decode(prompt + tokens)[len(decode(prompt)) :]
    assert free["text"].startswith(" w")
    stop = " " + free["text"].split()[0]
    stopped = llm.generate(["w5 w6 w7"], replace(FREE, max_tokens=6, stop=[stop]), use_tqdm=False)[
        0
    ]
    assert (stopped["token_ids"], stopped["text"]) == (tokens[:1], "")


def test_a_tokenizer_that_cleans_up_spaces_still_finds_a_stop_after_a_space():
    """Prompt "x ", completion ".y": decoded together they read "x.y" (clean-up), so cutting off
    the prompt's "x " would lose the "."; the completion is then decoded alone."""
    vocab = {"<unk>": 0, "x": 1, " ": 2, ".": 3, "y": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", clean_up_tokenization_spaces=True
    )
    stop = StopConditions(set(), tokenizer)
    seq = Sequence([1, 2, 3, 4], SamplingParams(max_tokens=4, stop=["."]), 4)
    seq.num_prompt_tokens = 2  # completion ".y"
    assert stop.text(seq) == ".y"
    assert stop.check(seq, 3) and seq.stop_reason == "."


def test_stop_strings_without_a_tokenizer_are_refused(tiny_dir):
    llm = LLM(tiny_dir, **TINY_CONFIG)
    with pytest.raises(ValueError, match="stop"):
        llm.generate([1, 2, 3], replace(FREE, stop="x"), use_tqdm=False)


# Stop strings, on SmolLM2's text.


def occurrences(text: str, s: str) -> list[int]:
    return [i for i in range(len(text)) if text.startswith(s, i)]


def expected_stop(
    tokens: list[int], pieces: list[str], stops: list[str], min_tokens=0, include=False
) -> tuple[list[int], str, str | None]:
    """The free run cut at the first token, from the min_tokens-th on, in whose text a stop
    string's occurrence ends (the earliest occurrence if several do): its tokens, its text and
    the stop string. `pieces` is the text of each token."""
    text, ends = "".join(pieces), [sum(map(len, pieces[: j + 1])) for j in range(len(pieces))]
    for j in range(min_tokens - 1 if min_tokens else 0, len(tokens)):
        start = ends[j - 1] if j else 0
        found = [
            (p, s) for s in stops for p in occurrences(text, s) if start < p + len(s) <= ends[j]
        ]
        if found:
            p, s = min(found)
            return tokens[: j + 1], text[: p + len(s) * include], s
    return tokens, text, None


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> dict[bool, LLM]:
    """Two SmolLM2 engines: overlapped (True) and plain (False) loop."""
    config = {
        "block_size": 16,
        "max_model_len": 512,
        "dtype": "float32",
        "kv_budget": None,
        "num_kvcache_blocks": 64,
    }
    return {o: LLM(smollm2_path, overlap_scheduling=o, **config) for o in (True, False)}


def chat_ids(llm: LLM, question: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return llm.tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def stopped(smollm2) -> dict:
    """A batch of stopped requests, run by both loops, with what each must return: stop strings
    found in the text of a long free greedy answer, and EOS, stop token and length on a short
    answer that ends with EOS. name -> (overlapped output, plain output, expected)."""
    llm = smollm2[True]
    haiku, capital = (
        chat_ids(llm, q) for q in ("Write a haiku about autumn.", "What is the capital of France?")
    )
    free_params = replace(FREE, max_tokens=32)
    free = llm.generate([haiku, capital], free_params, use_tqdm=False)
    tokens = free[0]["token_ids"]
    pieces = [llm.tokenizer.decode([t], skip_special_tokens=True) for t in tokens]
    text = "".join(pieces)
    assert free[0]["text"] == text and len(tokens) == 32
    ends = [sum(map(len, pieces[: j + 1])) for j in range(len(pieces))]
    # Inside one token: the middle of the first word of 4+ letters, at its first occurrence.
    j = next(j for j, piece in enumerate(pieces) if len(piece.strip()) >= 4)
    inside = pieces[j].strip()[1:-1]
    assert ends[j - 1] < text.find(inside) and text.find(inside) + len(inside) <= ends[j]
    # Spanning three tokens: from inside token j + 1 to inside token j + 3.
    spanning = text[ends[j] + 1 : ends[j + 3] - 1]
    assert text.find(spanning) == ends[j] + 1 and len(spanning) > 4
    # A word the answer says again two or more tokens later: min_tokens skips its first time.
    again = next(
        i
        for i, p in enumerate(pieces)
        if len(p.strip()) >= 3 and p.strip() in "".join(pieces[: max(i - 1, 0)])
    )
    twice, first_end = pieces[again].strip(), text.find(pieces[again].strip())
    min_tokens = next(j for j, end in enumerate(ends) if end >= first_end) + 2
    cases = {
        "spanning": (haiku, replace(free_params, stop=spanning)),
        "inside": (haiku, replace(free_params, stop=inside)),
        "spanning kept": (
            haiku,
            replace(free_params, stop=spanning, include_stop_str_in_output=True),
        ),
        "inside kept": (haiku, replace(free_params, stop=inside, include_stop_str_in_output=True)),
        "earliest": (haiku, replace(free_params, stop=[spanning, inside])),
        "same token": (haiku, replace(free_params, stop=[inside, pieces[j].strip()])),
        "min_tokens": (haiku, replace(free_params, stop=[twice], min_tokens=min_tokens)),
    }
    expected = {
        name: expected_stop(
            tokens, pieces, params.stop, params.min_tokens, params.include_stop_str_in_output
        )
        for name, (_, params) in cases.items()
    }
    # The short answer: EOS (<|im_end|>, 2) a few tokens in; with ignore_eos it goes on.
    short = free[1]["token_ids"]
    eos = short.index(2)
    assert 2 < eos < 24
    stop_id = short[eos - 2]
    cases |= {
        "eos": (capital, replace(free_params, ignore_eos=False)),
        "eos, min_tokens": (capital, replace(free_params, ignore_eos=False, min_tokens=eos + 3)),
        "stop id": (capital, replace(free_params, ignore_eos=False, stop_token_ids=[stop_id])),
        "length": (capital, replace(free_params, max_tokens=eos)),
    }
    expected |= {
        "eos": (short[: eos + 1], llm.tokenizer.decode(short[:eos]), None),
        "eos, min_tokens": (short[:eos], None, None),  # the tokens before EOS, then others
        "stop id": (short[: eos - 1], None, stop_id),
        "length": (short[:eos], llm.tokenizer.decode(short[:eos]), None),
    }
    prompts, params = ([case[i] for case in cases.values()] for i in (0, 1))
    outputs = {o: e.generate(prompts, params, use_tqdm=False) for o, e in smollm2.items()}
    return {
        name: (outputs[True][i], outputs[False][i], expected[name]) for i, name in enumerate(cases)
    }


def check(output: dict, expected: tuple, finish_reason: str = "stop"):
    tokens, text, stop_reason = expected
    assert output["token_ids"] == tokens
    if text is not None:
        assert output["text"] == text
    assert (output["finish_reason"], output["stop_reason"]) == (finish_reason, stop_reason)


def test_a_stop_string_spanning_tokens_ends_the_text_right_before_it(stopped, smollm2):
    output, _, expected = stopped["spanning"]
    check(output, expected)
    decode = smollm2[True].tokenizer.decode
    assert len(output["token_ids"]) < 32
    assert decode(output["token_ids"][-3:]).count(output["stop_reason"]) == 1
    assert output["stop_reason"] not in decode(output["token_ids"][-2:])


def test_a_stop_string_inside_the_last_token_cuts_that_tokens_text(stopped, smollm2):
    output, _, expected = stopped["inside"]
    check(output, expected)
    decode = smollm2[True].tokenizer.decode
    assert output["stop_reason"] in decode(output["token_ids"][-1:])
    assert len(decode(output["token_ids"][:-1])) < len(output["text"])


@pytest.mark.parametrize("name", ["spanning kept", "inside kept"])
def test_include_stop_str_in_output_keeps_the_stop_string(stopped, name):
    output, _, expected = stopped[name]
    check(output, expected)
    assert output["text"].endswith(output["stop_reason"])


def test_the_earliest_of_several_stop_strings_stops(stopped):
    output, _, expected = stopped["earliest"]
    check(output, expected)
    assert output == {**stopped["inside"][0], "request_id": output["request_id"]}
    # Two that end in the same token: the one that starts first (a word, not its middle).
    output, _, expected = stopped["same token"]
    check(output, expected)
    assert len(output["text"]) < len(stopped["inside"][0]["text"])


def test_min_tokens_suppresses_a_stop_string_and_bans_eos_until_that_many_tokens(stopped):
    output, _, expected = stopped["min_tokens"]
    check(output, expected)
    stop = expected[2]
    assert stop in output["text"]  # an earlier occurrence, within the first min_tokens tokens
    output, _, expected = stopped["eos, min_tokens"]  # EOS (2) is not sampled before then
    tokens, min_tokens = output["token_ids"], len(expected[0]) + 3
    assert tokens[: len(expected[0])] == expected[0] and 2 not in tokens[:min_tokens]
    assert len(tokens) > min_tokens and output["finish_reason"] in ("stop", "length")


def test_eos_stop_token_and_length_say_why_the_request_ended(stopped):
    check(stopped["eos"][0], stopped["eos"][2])
    check(stopped["stop id"][0], stopped["stop id"][2])
    check(stopped["length"][0], stopped["length"][2], "length")


def test_stop_strings_give_the_same_outputs_in_the_overlapped_and_the_plain_loop(stopped):
    overlapped, plain = zip(*[(o, p) for o, p, _ in stopped.values()])
    # Only the overlapped engine ran the free runs first: its prefix cache holds more.
    also = ["num_cached_tokens"]
    assert without_request_id(overlapped, also) == without_request_id(plain, also)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "plain"])
def test_a_failed_steps_requests_come_back_with_the_text_of_their_tokens(
    smollm2, overlap, monkeypatch
):
    """Ctrl-C inside a step: the requests it touched come back from the next `step()` as
    "abort", with the text of the tokens they have (a token still in flight is not one)."""
    llm, params = smollm2[overlap], replace(FREE, max_tokens=20)
    ids = [llm.add_request(prompt, params) for prompt in ("Hello world", "Good morning")]
    run, calls = llm.model_runner.run, []

    def interrupted_run(*args, **kwargs):
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return run(*args, **kwargs)

    monkeypatch.setattr(llm.model_runner, "run", interrupted_run)
    with pytest.raises(KeyboardInterrupt):
        while not llm.is_finished():
            llm.step()
    outputs, _ = llm.step()
    assert sorted(o["request_id"] for o in outputs) == ids and llm.is_finished()
    for output in outputs:
        assert output["finish_reason"] == "abort" and 0 < len(output["token_ids"]) < 20
        assert output["text"] == llm.tokenizer.decode(output["token_ids"], skip_special_tokens=True)
