"""Answer quality under KV compression: `python evaluate.py --task math|fidelity [options]`.

math: `python evaluate.py --task math [--data FILE] [--format gsm8k|amc|auto]
[--question-field F --answer-field F] [--num-problems N] [--samples n] [--max-tokens T]
[--budgets full,2048,1024] [--policy zipage] [--block-size B] [--model DIR]`
samples n replies per problem (temperature 0.6, top_p 0.95, one seed per sample) with full KV
and each budget, grades the last \\boxed{} of each reply (eval_math.py), and reports pass@1
(mean over samples), the share of replies with a \\boxed{} at all, mean output length and
output tok/s. Readers: GSM8K (answer after '####'), AMC23/AIME24 layouts (`question` or
`problem`; `answer`, or `solution` and its last \\boxed{}). --save FILE writes every reply.

fidelity: `python evaluate.py --task fidelity [--num-problems 64] [--max-tokens 512]
[--block-size 32] [--budgets 128,256] [--policies zipage,recency] [--model DIR] [--plot PNG]`
decodes the first N questions greedily with full KV and each (policy, budget), then re-scores
every generated sequence with transformers in full attention and reports, per configuration,
the share of generated positions where the engine's token is full attention's argmax
(agreement), and the mean |engine logprob - full-attention logprob| of the chosen tokens (gap).

Both tasks use chat prompts with the system prompt below, default to SmolLM2-135M-Instruct and
GSM8K's test set (../shared/data/gsm8k_test.jsonl), build one engine per configuration (freed
before the next), and print a table, then one JSON line. On a shared CPU, OMP_NUM_THREADS=1
avoids thread contention, which makes small PyTorch ops orders of magnitude slower.
"""

import argparse
import gc
import json
import os
import sys
import time

import torch

from eval_math import is_correct, last_boxed, reference
from nanozipage import LLM, SamplingParams

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
ROOT = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(ROOT, "../shared/data/gsm8k_test.jsonl"))
# Field names per layout, tried in order: GSM8K, and AMC23 / AIME24.
FIELDS = {
    "gsm8k": (["question"], ["answer"]),
    "amc": (["question", "problem"], ["answer", "solution"]),
}
# Per task: the paper's reasoning setting for math, a CPU-sized one for fidelity.
DEFAULTS = {
    "math": {"budgets": "full,2048,1024", "block_size": 256, "num_problems": None},
    "fidelity": {"budgets": "128,256", "block_size": 32, "num_problems": 64},
}


def load_problems(
    path: str,
    fmt: str = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
) -> list[tuple[str, str]]:
    """The first `limit` (question, reference answer) pairs of a JSONL file."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()][:limit]
    if fmt == "auto":
        fmt = "gsm8k" if "####" in str(records[0].get("answer", "")) else "amc"
    questions = [question_field] if question_field else FIELDS[fmt][0]
    answers = [answer_field] if answer_field else FIELDS[fmt][1]
    problems = []
    for i, record in enumerate(records):
        q = next((record[k] for k in questions if k in record), None)
        a = next((record[k] for k in answers if k in record), None)
        if q is None or a is None:
            raise ValueError(f"{path} line {i + 1}: needs one of {questions} and of {answers}")
        problems.append((q, reference(a)))
    return problems


def chat_prompt(tokenizer, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def generate(model: str, policy: str, budget: int | None, block_size: int, questions, params):
    """One engine (budget None: full KV), freed before returning: prompts, outputs, a row of
    timing figures."""
    sinks = 4 if policy == "recency" else 0  # recency with 4 sinks is StreamingLLM
    llm = LLM(model, kv_budget=budget, block_size=block_size, policy=policy, num_sinks=sinks)
    prompts = [chat_prompt(llm.tokenizer, q) for q in questions]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o["token_ids"]) for o in outputs)
    row = {
        "config": "full KV" if budget is None else f"{policy} {budget}",
        "policy": None if budget is None else policy,
        "budget": budget,
        "mean_output_tokens": tokens / len(outputs),
        "tok_per_s": tokens / seconds,
        "preemptions": llm.scheduler.num_preemptions,
    }
    del llm
    gc.collect()
    print(f"{row['config']}: {tokens} tokens in {seconds:.0f} s", file=sys.stderr, flush=True)
    return prompts, outputs, row


def evaluate_math(
    model: str,
    problems,
    budgets,
    samples=1,
    max_tokens=512,
    policy="zipage",
    block_size=256,
    seed=0,
) -> list[dict]:
    """One row per budget (None: full KV), with pass@1 and each reply with its grade."""
    questions = [q for q, _ in problems for _ in range(samples)]
    refs = [a for _, a in problems for _ in range(samples)]
    params = [
        SamplingParams(temperature=0.6, top_p=0.95, max_tokens=max_tokens, seed=seed + i)
        for i in range(len(questions))
    ]
    rows = []
    for budget in budgets:
        _, outputs, row = generate(model, policy, budget, block_size, questions, params)
        correct = [is_correct(o["text"], ref) for o, ref in zip(outputs, refs)]
        row["pass@1"] = sum(correct) / len(correct)
        row["boxed"] = sum(last_boxed(o["text"]) is not None for o in outputs) / len(outputs)
        row["replies"] = [
            {"problem": i // samples, "reference": ref, "text": o["text"], "correct": c}
            for i, (o, ref, c) in enumerate(zip(outputs, refs, correct))
        ]
        rows.append(row)
    return rows


def first_compressed(prompt_len: int, budget: int | None, block_size: int) -> float:
    """Index of the first output token predicted from a compressed cache (inf for full KV):
    the engine compresses before a decode step whose preceding tokens fill N_max = budget /
    block_size + 1 whole blocks, so from the first block boundary at or past budget + block_size
    (and past the prompt) on."""
    if budget is None:
        return float("inf")
    filled = -(-max(budget + block_size, prompt_len) // block_size) * block_size
    return filled + 1 - prompt_len


@torch.inference_mode()
def evaluate_fidelity(model: str, questions, configs, max_tokens=512, block_size=32) -> list[dict]:
    """Full KV, then each (policy, budget) of `configs`: greedy engine outputs, teacher-forced
    through transformers in full attention (float32, one forward per sequence)."""
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=True)
    runs = [
        generate(model, p, b, block_size, questions, params)
        for p, b in [("zipage", None), *configs]
    ]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    for prompts, outputs, row in runs:
        agree, gaps, compressed = [], [], []
        for prompt, out in zip(prompts, outputs):
            chosen = torch.tensor(out["token_ids"])
            ids = torch.tensor([prompt + out["token_ids"]])
            logits = hf(ids, logits_to_keep=len(chosen) + 1).logits[0, :-1]
            logprobs = logits.float().log_softmax(-1)
            agree.append(logprobs.argmax(-1) == chosen)
            full = logprobs.gather(1, chosen[:, None]).squeeze(1)
            gaps.append((full - torch.tensor(out["logprobs"])).abs())
            start = first_compressed(len(prompt), row["budget"], block_size)
            compressed.append(torch.arange(len(chosen)) >= start)
        agree, gaps, compressed = torch.cat(agree).float(), torch.cat(gaps), torch.cat(compressed)
        row["agreement"], row["logprob_gap"] = agree.mean().item(), gaps.mean().item()
        row["compressed_share"] = compressed.float().mean().item()
        row["agreement_compressed"] = agree[compressed].mean().item() if compressed.any() else None
    return [row for _, _, row in runs]


def plot(rows: list[dict], path: str):
    """Agreement and logprob gap against budget, one line per policy, full KV dashed."""
    try:
        import matplotlib  # optional: pip install -e '.[plot]'
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in zip(
        axes, ("agreement", "logprob_gap"), ("top-1 agreement", "mean |logprob gap|")
    ):
        for policy in dict.fromkeys(r["policy"] for r in rows if r["budget"]):
            points = sorted(
                (r["budget"], r[key]) for r in rows if r["budget"] and r["policy"] == policy
            )
            ax.plot(*zip(*points), marker="o", label=policy)
        ax.axhline(rows[0][key], linestyle="--", color="gray", label="full KV")
        ax.set(xlabel="kv_budget (tokens per layer and KV head)", ylabel=name)
        ax.legend()
    fig.suptitle("Greedy decoding vs full attention (transformers)")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(DEFAULTS), required=True)
    parser.add_argument("--model", help="checkpoint dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=DATA, help="JSONL of problems (default: GSM8K test)")
    parser.add_argument("--format", choices=["auto", *FIELDS], default="auto")
    parser.add_argument("--question-field", help="overrides the format's question field")
    parser.add_argument("--answer-field", help="overrides the format's answer field")
    parser.add_argument("--num-problems", type=int, help="first N (math: all; fidelity: 64)")
    parser.add_argument("--samples", type=int, default=1, help="replies per problem (math)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--budgets", help="comma-separated; 'full' is full KV")
    parser.add_argument("--policy", default="zipage", help="eviction policy (math)")
    parser.add_argument("--policies", default="zipage,recency", help="fidelity")
    parser.add_argument("--block-size", type=int, help="math: 256; fidelity: 32")
    parser.add_argument("--seed", type=int, default=0, help="sample i has seed + i (math)")
    parser.add_argument("--plot", help="fidelity: PNG of agreement and gap against budget")
    parser.add_argument("--save", help="math: JSONL of every reply with its grade")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        from smollm2 import smollm2_dir

        args.model = smollm2_dir()
    budgets = [None if b == "full" else int(b) for b in args.budgets.split(",")]
    problems = load_problems(
        args.data, args.format, args.question_field, args.answer_field, args.num_problems
    )
    if args.task == "math":
        names = ("samples", "max_tokens", "policy", "block_size", "seed")
        rows = evaluate_math(args.model, problems, budgets, **{k: vars(args)[k] for k in names})
        columns = ["config", "pass@1", "boxed", "mean_output_tokens", "tok_per_s", "preemptions"]
        if args.save:
            replies = [{"config": row["config"], **r} for row in rows for r in row["replies"]]
            with open(args.save, "w") as f:
                f.writelines(json.dumps(reply) + "\n" for reply in replies)
    else:
        configs = [(p, b) for p in args.policies.split(",") for b in budgets if b is not None]
        rows = evaluate_fidelity(
            args.model, [q for q, _ in problems], configs, args.max_tokens, args.block_size
        )
        columns = ["config", "agreement", "logprob_gap", "compressed_share"]
        columns += ["agreement_compressed", "mean_output_tokens", "preemptions"]
        if args.plot:
            plot(rows, args.plot)
    print(" | ".join(f"{c:>18}" for c in columns))
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(" | ".join(f"{c:>18}" for c in cells))
    results = [{k: v for k, v in row.items() if k != "replies"} for row in rows]
    print(json.dumps({**vars(args), "results": results}))
    return rows


if __name__ == "__main__":
    main()
