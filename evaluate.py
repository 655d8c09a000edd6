"""Answer quality under KV compression: `python evaluate.py --task math|fidelity|policies`.

math: `python evaluate.py --task math [--data FILE] [--format gsm8k|amc|auto]
[--question-field F --answer-field F] [--num-problems N] [--samples n] [--max-tokens T]
[--budgets full,2048,1024] [--policy zipage] [--block-size B] [--model DIR]`
samples n replies per problem (temperature 0.6, top_p 0.95, one seed per sample) with full KV
and each budget, grades the last \\boxed{} of each reply (eval_math.py), and reports pass@1
(mean over samples), the share of replies with a \\boxed{} at all, mean output length and
output tok/s. Readers: GSM8K (answer after '####'), AMC23/AIME24 layouts (`question` or
`problem`; `answer`, or `solution` and its last \\boxed{}). --save FILE writes every reply.

fidelity: `python evaluate.py --task fidelity [--num-problems 64] [--max-tokens 512]
[--block-size 32] [--budgets 128,256] [--policies zipage,streamingllm] [--model DIR]
[--plot PNG]`
decodes the first N questions greedily with full KV and each (policy, budget), then re-scores
every generated sequence with transformers in full attention and reports, per configuration,
the share of generated positions where the engine's token is full attention's argmax
(agreement), and the mean |engine logprob - full-attention logprob| of the chosen tokens (gap).

policies: `python evaluate.py --task policies [--policies all] [--budgets 64,128,256]
[--num-cases 24] [--num-problems 4] [--max-tokens 256] [--plot docs/policies.png]`
runs every policy at each budget and full KV, in blocks of 16 with a window of 8, on two tests:
passkey, the share of retrieval cases answered (a key hidden at a random depth in 400-1,000
tokens of filler, asked for at the end; keys are numbers of 3-8 digits, word pairs, letter
codes and letter-digit codes; fillers are a repeated sentence, natural text written for this
test and, when --data exists, GSM8K questions), counting only the cases full KV answers; and
fidelity as above, on the first N questions. One engine serves every configuration: its budget
is never reached by a test's request, each request lowers it (`SamplingParams(kv_budget=...)`),
and the prompts stay in its prefix cache while the policy changes.

math and fidelity use chat prompts with the system prompt below, and build one engine per
configuration (freed before the next). Every task defaults to SmolLM2-135M-Instruct and GSM8K's
test set (../shared/data/gsm8k_test.jsonl), and prints a table, then one JSON line. On a shared
CPU, OMP_NUM_THREADS=1 avoids thread contention, which makes small PyTorch ops orders of
magnitude slower.
"""

import argparse
import gc
import json
import os
import random
import re
import sys
import time

import torch
from tqdm import tqdm

from eval_math import is_correct, last_boxed, reference
from nanozipage import LLM, SamplingParams
from nanozipage.policy import POLICIES

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
    "math": {
        "budgets": "full,2048,1024",
        "block_size": 256,
        "num_problems": None,
        "max_tokens": 512,
    },
    "fidelity": {
        "budgets": "128,256",
        "block_size": 32,
        "num_problems": 64,
        "max_tokens": 512,
        "policies": "zipage,streamingllm",
    },
    "policies": {
        "budgets": "64,128,256",
        "num_problems": 4,
        "max_tokens": 256,
        "policies": ",".join(POLICIES),
    },
}
# The passkey test: fillers, key formats and the sentences that hide and ask for a key.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NATURAL = [  # written for this test
    "The morning market opens early, so people buy apples while the bread is still rising.",
    "Our neighbour keeps a small boat on the lake and paints it a new colour every spring.",
    "A train leaves the northern station every forty minutes, except on public holidays.",
    "The library on the hill lends out tools as well as books, from ladders to drills.",
    "The town's old streets bend around the wells that were dug there long ago.",
    "When the river floods, the ducks move into the park and the children feed them.",
    "The recipe calls for two cups of flour, a spoon of honey and a pinch of salt.",
    "Every autumn the school holds a fair where students sell jam and paper lanterns.",
    "The lighthouse keeper writes down the weather three times a day in a green notebook.",
    "Some people walk to work along the canal, where the herons stand very still.",
    "The museum's oldest clock still keeps time, though it loses a minute each week.",
    "In summer the pool stays open late, and the lifeguards play cards between shifts.",
    "The farmer plants beans one year and wheat the next, to keep the soil healthy.",
    "A tailor on the corner shortens trousers while you wait and drink a cup of tea.",
    "The bus driver greets every passenger by name and knows the stop each one needs.",
    "After the storm, volunteers cleared the branches and stacked the wood for winter.",
    "The orchestra rehearses on Thursday evenings in the church hall, for its echo.",
    "Hikers are told to carry water, a map and a warm layer, even on sunny days.",
    "The old bridge was mended with stones from the quarry that built it long ago.",
    "A cat sleeps in the window of the bookshop and is more famous than the owner.",
    "The radio plays old songs on Sunday mornings and the news every hour on the hour.",
    "Children learn to ride bicycles in the empty car park behind the supermarket.",
    "The pharmacist keeps a jar of sweets on the counter for anyone who has to wait.",
    "Gardeners in the valley compete to grow the heaviest pumpkin of the year.",
    "The harbour is busiest at dawn, when the boats return and the gulls follow them.",
    "On cold nights the café serves soup in large bowls and stays open for students.",
    "The new road will shorten the trip to the coast, but many prefer the scenic route.",
    "A group of friends meets every Tuesday to repair broken toys for the hospital.",
    "The weather office predicts a dry week, though the clouds look less certain.",
    "The oak tree in the park is said to be older than the town itself.",
]
WORDS = (  # a key of the "words" format is one of each
    ["silver", "amber", "quiet", "rapid", "crimson", "frozen", "golden", "hollow"],
    ["falcon", "lantern", "harbor", "meadow", "canyon", "whistle", "orchard", "pebble"],
)
LETTERS, DIGITS = "ABCDEFGHJKLMNPQRSTUVWXYZ", "23456789"
KEY_FORMATS = ("number", "words", "letters", "mixed")
NEEDLES = [  # (the sentence hiding the key, the question asking for it)
    ("The pass key is {k}. Remember it. {k} is the pass key.", "What is the pass key?"),
    (
        "The secret code is {k}. Keep it in mind: the secret code is {k}.",
        "What is the secret code?",
    ),
    ("Important: the magic word is {k}. The magic word is {k}.", "What is the magic word?"),
]
PASSKEY_INTRO = (
    "There is an important piece of information hidden in this text. Find it and memorize it."
)
PASSKEY_TOKENS = (400, 1000)  # prompt lengths, chat template included
PASSKEY_ANSWER = 32  # tokens of an answer: with the prompt, below the engine's budget + a block
PASSKEY_BLOCK = 16  # the policies task's block size, on which the `early` cases depend


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
    llm = LLM(model, kv_budget=budget, block_size=block_size, policy=policy)
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
        row |= fidelity(hf, prompts, outputs, row["budget"], block_size)
    return [row for _, _, row in runs]


def fidelity(hf, prompts, outputs, budget: int | None, block_size: int) -> dict:
    """Greedy outputs teacher-forced through `hf` in full attention: agreement, logprob gap."""
    agree, gaps, compressed = [], [], []
    for prompt, out in zip(prompts, outputs):
        chosen = torch.tensor(out["token_ids"])
        ids = torch.tensor([prompt + out["token_ids"]])
        logits = hf(ids, logits_to_keep=len(chosen) + 1).logits[0, :-1]
        logprobs = logits.float().log_softmax(-1)
        agree.append(logprobs.argmax(-1) == chosen)
        full = logprobs.gather(1, chosen[:, None]).squeeze(1)
        gaps.append((full - torch.tensor(out["logprobs"])).abs())
        start = first_compressed(len(prompt), budget, block_size)
        compressed.append(torch.arange(len(chosen)) >= start)
    agree, gaps, compressed = torch.cat(agree).float(), torch.cat(gaps), torch.cat(compressed)
    return {
        "agreement": agree.mean().item(),
        "logprob_gap": gaps.mean().item(),
        "compressed_share": compressed.float().mean().item(),
        "agreement_compressed": agree[compressed].mean().item() if compressed.any() else None,
    }


def passkey_key(rng: random.Random, fmt: str) -> str:
    """A number of 3-8 digits, an adjective and a noun, 3-6 letters, or 4 or 6 letters and
    digits in turn."""
    if fmt == "number":
        n = rng.randint(3, 8)
        return str(rng.randrange(10 ** (n - 1), 10**n))
    if fmt == "words":
        return " ".join(rng.choice(words) for words in WORDS)
    if fmt == "letters":
        return "".join(rng.choices(LETTERS, k=rng.randint(3, 6)))
    return "".join(rng.choice(DIGITS if i % 2 else LETTERS) for i in range(rng.choice([4, 6])))


def passkey_cases(tokenizer, num_cases: int, questions=None, seed: int = 0) -> list[dict]:
    """Retrieval cases, each key format with each filler in turn (GSM8K `questions` as a third
    filler if given): consecutive filler sentences from a random start up to a random length,
    the key's sentence at a random depth, the question at the end."""
    rng = random.Random(seed)
    fillers = {"repeated": [FILLER], "natural": NATURAL}
    if questions:
        fillers["questions"] = questions
    cases = []
    for i in range(num_cases):
        fmt, filler = KEY_FORMATS[i % 4], list(fillers)[i // 4 % len(fillers)]
        key, (needle, question) = passkey_key(rng, fmt), rng.choice(NEEDLES)
        pool, length, depth = fillers[filler], rng.randint(*PASSKEY_TOKENS), rng.random()
        start, sentences, needle = rng.randrange(len(pool)), [], needle.format(k=key)
        while len(ids := passkey_prompt(tokenizer, sentences, needle, depth, question)) < length:
            sentences.append(pool[(start + len(sentences)) % len(pool)])
        if len(ids) > PASSKEY_TOKENS[1]:
            ids = passkey_prompt(tokenizer, sentences[:-1], needle, depth, question)
        # Early: compressed before an answer can reach the key ("The pass key is")
        early = ("early",) if -len(ids) % PASSKEY_BLOCK < 6 else ()
        cases.append({"ids": ids, "key": key, "groups": (fmt, filler, *early), "depth": depth})
    return cases


def passkey_prompt(tokenizer, sentences, needle, depth, question) -> list[int]:
    at = round(depth * len(sentences))
    text = " ".join([*sentences[:at], needle, *sentences[at:]])
    message = f"{PASSKEY_INTRO}\n\n{text}\n\n{question} Answer with it only."
    chat = [{"role": "user", "content": message}]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)


def found(text: str, key: str) -> bool:
    """The key, whole (not inside a longer number or word), in any case."""
    return (
        re.search(rf"(?<![0-9A-Za-z]){re.escape(key)}(?![0-9A-Za-z])", text, re.IGNORECASE)
        is not None
    )


@torch.inference_mode()
def evaluate_policies(
    model: str,
    num_cases: int,
    questions,
    num_problems: int,
    policies,
    budgets,
    max_tokens=256,
    seed=0,
    chunk=12,
) -> list[dict]:
    """Passkey accuracy and fidelity of every (policy, budget) and full KV, in blocks of 16 with
    a window of 8. One engine: its budget exceeds every request here, so a request at full KV is
    never compressed, and a request lowers it with `SamplingParams(kv_budget=...)`. The
    compressor reads `config.policy` at each compression, so the policy changes between runs
    while the prompts stay in the prefix cache (`chunk` cases at a time fit the CPU's pool)."""
    from transformers import AutoModelForCausalLM

    block, full_budget = PASSKEY_BLOCK, 1024
    assert PASSKEY_TOKENS[1] + PASSKEY_ANSWER <= full_budget + block  # never compressed
    llm = LLM(model, kv_budget=full_budget, block_size=block, window=8)
    cases = passkey_cases(llm.tokenizer, num_cases, questions, seed)
    prompts = [chat_prompt(llm.tokenizer, q) for q in questions[:num_problems]]
    configs = [(None, None)] + [(p, b) for p in policies for b in budgets]
    chunks = [cases[i : i + chunk] for i in range(0, len(cases), chunk)]
    progress = tqdm(total=len(configs) * (len(chunks) + 1), desc="policies", file=sys.stderr)

    def run(config, prompts, holders, **params) -> list[dict]:
        """Greedy outputs at one (policy, budget). `holders` run at full KV beside them until past
        the first compression, which then finds the prompts' blocks shared, writes fresh ones,
        and leaves the prompts in the prefix cache for the next configuration."""
        policy, budget = config
        llm.config.policy = policy or llm.config.policy
        params = [SamplingParams(temperature=0, kv_budget=budget, **params)] * len(prompts)
        params += [SamplingParams(max_tokens=block + 1, ignore_eos=True)] * len(holders)
        outputs = llm.generate(prompts + holders, params, use_tqdm=False)[: len(prompts)]
        assert budget or not any(o["num_compressions"] for o in outputs)
        return outputs

    hits = {config: [] for config in configs}
    for part in chunks:
        ids = [c["ids"] for c in part]
        for config in configs:
            outputs = run(config, ids, ids if config[1] else [], max_tokens=PASSKEY_ANSWER)
            hits[config] += [found(o["text"], c["key"]) for o, c in zip(outputs, part)]
            progress.update()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32) if prompts else None
    rows, answered = [], hits[None, None]
    for (policy, budget), mine in hits.items():
        row = {"config": f"{policy} {budget}" if budget else "full KV", "policy": policy}
        row |= {"budget": budget, "passkey": share(mine, cases, answered)}
        for group in (*KEY_FORMATS, "repeated", "natural", "questions", "early"):
            row[f"passkey_{group}"] = share(mine, cases, answered, group)
        row |= dict.fromkeys(("agreement", "agreement_compressed", "logprob_gap"))
        if prompts:
            outputs = run((policy, budget), prompts, [], max_tokens=max_tokens, logprobs=True)
            row |= fidelity(hf, prompts, outputs, budget, block)
        rows.append(row)
        progress.update()
    progress.close()
    rows[0]["passkey_cases"] = f"{sum(answered)} of {len(cases)} answered with full KV"
    return rows


def share(hits: list[bool], cases, answered: list[bool], group: str | None = None) -> float | None:
    """The share of hits among the cases full KV answered (of one group: a key format...)."""
    counted = [full and group in (None, *c["groups"]) for c, full in zip(cases, answered)]
    mine = [hit for hit, count in zip(hits, counted) if count]
    return sum(mine) / len(mine) if mine else None


def plot(rows: list[dict], path: str, panels: dict, title: str):
    """Each panel's key (one of `rows`) against budget, one line per policy, full KV dashed."""
    try:
        import matplotlib  # optional: pip install -e '.[plot]'
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels.items()):
        for policy in dict.fromkeys(r["policy"] for r in rows if r["budget"]):
            points = sorted(
                (r["budget"], r[key]) for r in rows if r["budget"] and r["policy"] == policy
            )
            ax.plot(*zip(*points), marker="o", label=policy)
        ax.axhline(rows[0][key], linestyle="--", color="gray", label="full KV")
        ax.set(xlabel="kv_budget (tokens per layer and KV head)", ylabel=name)
        ax.legend()
    fig.suptitle(title)
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
    parser.add_argument("--num-cases", type=int, default=24, help="policies: passkey cases")
    parser.add_argument("--samples", type=int, default=1, help="replies per problem (math)")
    parser.add_argument("--max-tokens", type=int, help="math, fidelity: 512; policies: 256")
    parser.add_argument("--budgets", help="comma-separated; 'full' is full KV")
    parser.add_argument("--policy", default="zipage", help="eviction policy (math)")
    parser.add_argument("--policies", help="fidelity: zipage,streamingllm; policies: all")
    parser.add_argument("--block-size", type=int, help="math: 256; fidelity: 32")
    parser.add_argument("--seed", type=int, default=0, help="sample i has seed + i (math)")
    parser.add_argument("--plot", help="fidelity, policies: PNG by budget (e.g. docs/policies.png)")
    parser.add_argument("--save", help="math: JSONL of every reply with its grade")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        from smollm2 import smollm2_dir

        args.model = smollm2_dir()
    budgets = [None if b == "full" else int(b) for b in args.budgets.split(",")]
    problems, limit = [], None if args.task == "policies" else args.num_problems
    if args.task != "policies" or os.path.isfile(args.data):  # passkey runs without them
        names = ("data", "format", "question_field", "answer_field")
        problems = load_problems(*[vars(args)[k] for k in names], limit)
    else:
        print(
            f"no --data file at {args.data}: fidelity is skipped and the passkey test runs "
            "without GSM8K fillers (GSM8K's test.jsonl: github.com/openai/grade-school-math)",
            file=sys.stderr,
        )
    if args.task == "math":
        names = ("samples", "max_tokens", "policy", "block_size", "seed")
        rows = evaluate_math(args.model, problems, budgets, **{k: vars(args)[k] for k in names})
        columns = ["config", "pass@1", "boxed", "mean_output_tokens", "tok_per_s", "preemptions"]
        if args.save:
            replies = [{"config": row["config"], **r} for row in rows for r in row["replies"]]
            with open(args.save, "w") as f:
                f.writelines(json.dumps(reply) + "\n" for reply in replies)
    elif args.task == "policies":
        questions = [q for q, _ in problems]
        rows = evaluate_policies(
            args.model,
            args.num_cases,
            questions,
            args.num_problems,
            args.policies.split(","),
            budgets,
            args.max_tokens,
            args.seed,
        )
        columns = ["config", "passkey", *(f"passkey_{f}" for f in (*KEY_FORMATS, "early"))]
        columns += ["agreement"]
        columns += ["agreement_compressed", "logprob_gap"]
        if args.plot:
            panels = {"passkey": "passkey accuracy", "agreement": "top-1 agreement (fidelity)"}
            panels = {key: name for key, name in panels.items() if rows[0][key] is not None}
            plot(rows, args.plot, panels, "Eviction policies, SmolLM2-135M-Instruct, blocks of 16")
    else:
        configs = [(p, b) for p in args.policies.split(",") for b in budgets if b is not None]
        rows = evaluate_fidelity(
            args.model, [q for q, _ in problems], configs, args.max_tokens, args.block_size
        )
        columns = ["config", "agreement", "logprob_gap", "compressed_share"]
        columns += ["agreement_compressed", "mean_output_tokens", "preemptions"]
        if args.plot:
            panels = {"agreement": "top-1 agreement", "logprob_gap": "mean |logprob gap|"}
            plot(rows, args.plot, panels, "Greedy decoding vs full attention (transformers)")
    print(" | ".join(f"{c:>18}" for c in columns))
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(" | ".join(f"{c:>18}" for c in cells))
    results = [{k: v for k, v in row.items() if k != "replies"} for row in rows]
    print(json.dumps({**vars(args), "results": results}))
    return rows


if __name__ == "__main__":
    main()
