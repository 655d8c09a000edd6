"""evaluate.py: answer grading on real GSM8K solutions and tricky cases, reading problem
files, and both tasks end to end on SmolLM2 with tiny settings."""

import json
import os

import pytest
import torch

from eval_math import is_correct, last_boxed, reference, to_number
from evaluate import (
    DATA,
    KEY_FORMATS,
    PASSKEY_TOKENS,
    SYSTEM,
    chat_prompt,
    first_compressed,
    found,
    load_problems,
    main,
    passkey_cases,
)
from nanozipage import LLM, SamplingParams

PROBLEMS = [  # long enough that a 32-token budget compresses the prompt
    {
        "question": "Tom has 3 boxes with 12 pencils in each box. He gives 7 pencils to his sister "
        "and buys 5 more at the shop. How many pencils does Tom have now?",
        "answer": "#### 34",
    },
    {
        "question": "A train travels 60 miles per hour for 2 hours, then 40 miles per hour for 3 "
        "hours. How many miles does it travel in total?",
        "answer": "#### 240",
    },
]


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return str(path)


def test_last_boxed_takes_the_last_complete_box_with_nested_braces():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed {x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{7} and a cut-off \boxed{\frac{1}{") == "7"
    assert last_boxed("no box here, 42") is None


@pytest.mark.skipif(not os.path.isfile(DATA), reason=f"{DATA} is absent")
def test_real_gsm8k_solutions_grade_their_own_answer_and_not_a_neighbour():
    with open(DATA) as f:
        records = [json.loads(line) for line in f]
    refs = [reference(r["answer"]) for r in records]
    assert refs[0] == "18" and all(to_number(ref) is not None for ref in refs)
    assert any("," in ref for ref in refs)  # e.g. "2,125": thousands separators must parse
    for record, ref in list(zip(records, refs))[:50] + [
        (r, a) for r, a in zip(records, refs) if "," in a
    ]:
        worked = record["answer"].split("####")[0]
        assert is_correct(worked + rf"The answer is \boxed{{{ref}}}.", ref)
        assert is_correct(rf"\boxed{{{int(to_number(ref))}}}", ref)  # 2,125 written as 2125
        assert not is_correct(rf"\boxed{{{int(to_number(ref)) + 1}}}", ref)
        assert not is_correct(worked, ref)  # no box, no credit


@pytest.mark.parametrize(
    "boxed, ref",
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{3}{4}", "0.75"),
        (r"\frac12", "1/2"),
        (r"-\frac{1}{4}", "-0.25"),
        ("1,000", "1000"),
        ("1,234,567.5", "1234567.5"),
        (r"\$18", "18"),
        ("$18$", "18"),
        ("18 dollars", "18"),
        (r"18\text{ dollars}", "18"),
        (r"\text{18 dollars.}", "18"),
        (r"50\%", "50"),
        ("x = 5", "5"),
        ("90^\\circ", "90"),
        ("0.3333333", "0.33333333"),  # within 1e-6 relative
        (r"\left( 3, 4 \right)", "(3,4)"),  # not numbers: normalised strings
        (r"\text{(B)}", "(b)"),
        (r"x^{2}\!+1.", "x^{2}+1"),
    ],
)
def test_equivalent_answers_match(boxed, ref):
    assert is_correct(rf"so \boxed{{{boxed}}}", ref)


@pytest.mark.parametrize(
    "boxed, ref",
    [
        ("18", "180"),
        ("1,000", "100"),
        ("1,2", "12"),  # a list, not a thousands separator
        (r"\frac{1}{2}", "2"),
        ("0.5", "0.51"),
        ("0.333", "1/3"),  # outside the tolerance
        ("3x", "3"),  # a variable is not a unit
        ("x+1", "x-1"),
        ("", "0"),
        (r"\frac{1}{0}", "0"),
    ],
)
def test_different_answers_do_not_match(boxed, ref):
    assert not is_correct(rf"\boxed{{{boxed}}}", ref)


def test_load_problems_reads_gsm8k_amc_and_aime_layouts(tmp_path):
    files = {
        "gsm8k": {"question": "Q1", "answer": "work\n#### 1,200"},
        "amc": {"question": "Q2", "answer": 27.0},
        "aime": {"problem": "Q3", "solution": r"so \boxed{\frac{1}{3}}. Then \boxed{204}."},
        "custom": {"prompt": "Q4", "target": "7"},
    }
    for name, record in files.items():
        (tmp_path / name).write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    assert load_problems(str(tmp_path / "gsm8k")) == [("Q1", "1,200")] * 2
    assert load_problems(str(tmp_path / "amc"), "amc", limit=1) == [("Q2", "27.0")]
    assert load_problems(str(tmp_path / "aime"), limit=1) == [("Q3", "204")]
    custom = load_problems(str(tmp_path / "custom"), question_field="prompt", answer_field="target")
    assert custom[0] == ("Q4", "7")
    with pytest.raises(ValueError, match="line 1"):
        load_problems(str(tmp_path / "custom"))


def test_math_end_to_end_grades_what_the_engine_samples(smollm2_path, problems_file, tmp_path):
    args = [
        "--task",
        "math",
        "--model",
        smollm2_path,
        "--data",
        problems_file,
        "--samples",
        "2",
        "--max-tokens",
        "16",
        "--block-size",
        "16",
        "--budgets",
        "full,32",
        "--save",
        str(tmp_path / "replies.jsonl"),
    ]
    full, compressed = main(args)
    saved = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert saved == [
        {"config": r["config"], **reply} for r in (full, compressed) for reply in r["replies"]
    ]
    assert (full["config"], compressed["config"]) == ("full KV", "zipage 32")
    refs = ["34", "34", "240", "240"]
    for row in (full, compressed):
        assert len(row["replies"]) == 4 and row["mean_output_tokens"] <= 16
        assert [(r["problem"], r["reference"]) for r in row["replies"]] == list(
            zip([0, 0, 1, 1], refs)
        )
        grades = [is_correct(r["text"], ref) for r, ref in zip(row["replies"], refs)]
        assert [r["correct"] for r in row["replies"]] == grades
        assert row["pass@1"] == sum(grades) / 4
        assert row["boxed"] == sum(last_boxed(r["text"]) is not None for r in row["replies"]) / 4
    # The replies are the engine's own for the chat prompt with the system prompt, seed per sample.
    llm = LLM(smollm2_path, kv_budget=None, block_size=16)
    prompt = chat_prompt(llm.tokenizer, PROBLEMS[1]["question"])
    assert SYSTEM in llm.tokenizer.decode(prompt)
    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=16, seed=3)
    assert llm.generate([prompt], params, use_tqdm=False)[0]["text"] == full["replies"][3]["text"]


def test_fidelity_end_to_end_full_kv_is_exact_and_compression_is_not(
    smollm2_path, problems_file, tmp_path
):
    plot = tmp_path / "fidelity.png"
    args = [
        "--task",
        "fidelity",
        "--model",
        smollm2_path,
        "--data",
        problems_file,
        "--max-tokens",
        "16",
        "--block-size",
        "16",
        "--budgets",
        "32",
        "--policies",
        "zipage,recency",
        "--plot",
        str(plot),
    ]
    rows = main(args)
    assert [r["config"] for r in rows] == ["full KV", "zipage 32", "recency 32"]
    full = rows[0]
    assert full["agreement"] == 1 and full["logprob_gap"] < 1e-4
    assert full["compressed_share"] == 0 and full["agreement_compressed"] is None
    for row in rows[1:]:
        assert 0 < row["agreement"] <= 1 and row["logprob_gap"] > 1e-3
        assert 0 < row["compressed_share"] < 1 and 0 <= row["agreement_compressed"] <= 1
    assert plot.stat().st_size > 0


def test_first_compressed_is_where_a_budget_starts_to_change_the_outputs(smollm2_path):
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=True)
    outputs = []
    for budget in (None, 32):
        llm = LLM(smollm2_path, kv_budget=budget, block_size=16)
        prompt = chat_prompt(llm.tokenizer, PROBLEMS[0]["question"])
        outputs.append(llm.generate([prompt], params, use_tqdm=False)[0])
    full, compressed = outputs
    start = first_compressed(len(prompt), 32, 16)
    assert 0 < start < 32 and first_compressed(len(prompt), None, 16) == float("inf")
    assert full["token_ids"][:start] == compressed["token_ids"][:start]
    torch.testing.assert_close(full["logprobs"][:start], compressed["logprobs"][:start])
    assert (
        full["token_ids"][start] != compressed["token_ids"][start]
        or abs(full["logprobs"][start] - compressed["logprobs"][start]) > 1e-4
    )


def test_policies_end_to_end_counts_only_what_full_kv_answers(smollm2_path, tmp_path, capsys):
    plot = tmp_path / "policies.png"
    options = {
        "--model": smollm2_path,
        "--data": str(tmp_path / "none"),
        "--num-cases": "4",
        "--policies": "spans,recency",
        "--budgets": "64",
        "--plot": str(plot),
    }
    rows = main(["--task", "policies", *(x for item in options.items() for x in item)])
    assert [r["config"] for r in rows] == ["full KV", "spans 64", "recency 64"]
    answered = int(rows[0]["passkey_cases"].split()[0])
    assert answered > 0 and rows[0]["passkey"] == 1
    for row in rows:
        assert 0 <= row["passkey"] <= 1 and row["agreement"] is None  # no questions: no fidelity
    assert plot.stat().st_size > 0
    assert f"no --data file at {tmp_path / 'none'}: fidelity is skipped" in capsys.readouterr().err


def test_passkey_cases_hide_every_key_format_in_every_filler(smollm2_path):
    tokenizer = LLM(smollm2_path, kv_budget=None, block_size=16).tokenizer
    cases = passkey_cases(tokenizer, 12, ["How many apples are left?"])
    fillers = ("repeated", "natural", "questions")
    assert {c["groups"][:2] for c in cases} == {
        (f, filler) for f in KEY_FORMATS for filler in fillers
    }
    for case in cases:
        assert PASSKEY_TOKENS[0] <= len(case["ids"]) <= PASSKEY_TOKENS[1]
        assert case["key"] in tokenizer.decode(case["ids"])
    assert found("The pass key is 4821.", "4821") and not found("48210", "4821")
    assert found("the magic word is Golden Canyon", "golden canyon")
