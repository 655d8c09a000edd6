"""The figures of docs/DESIGN.md and the README: `python docs/figures.py` (matplotlib).

block_tables.png: one request's block table before and after a compression (block size 16,
budget 128, N_max 9), drawn by hand to match how `BlockManager.plan_compression` plans it.
sawtooth.png: KV tokens per (layer, KV head) of one request against its generated tokens, from
two real runs of SmolLM2-135M on the CPU, full KV and compressed (about a minute).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from nanozipage import LLM, SamplingParams
from smollm2 import smollm2_dir

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK, BUDGET = 16, 128
N_MAX = BUDGET // BLOCK + 1
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def draw_table(ax, y: float, table: list[int], colors: list[str], label: str):
    ax.text(-0.3, y + 0.4, label, ha="right", va="center")
    for i, (block_id, color) in enumerate(zip(table, colors)):
        ax.add_patch(plt.Rectangle((i, y), 0.9, 0.8, color=color))
        ax.text(i + 0.45, y + 0.4, str(block_id), ha="center", va="center")


def block_tables(path: str):
    """Two cases: a request that grew by decoding holds N_max blocks and keeps them all; one
    with a prompt of 180 tokens holds 12 blocks at its first compression and frees 3."""
    full, kept, spare, freed = "#9ecae1", "#3182bd", "#ffffff", "#fc9272"
    fig, ax = plt.subplots(figsize=(10, 3.6))
    decode = [5, 2, 9, 0, 7, 3, 11, 6, 8]
    draw_table(ax, 4.2, decode, [full] * 9, "144 tokens, before")
    draw_table(ax, 3.2, decode, [kept] * 8 + [spare], "after")
    prompt = [14, 1, 4, 10, 12, 13, 15, 16, 17, 18, 19, 20]
    draw_table(ax, 1.2, prompt, [full] * 12, "192 tokens, before")
    draw_table(ax, 0.2, prompt, [kept] * 8 + [spare] + [freed] * 3, "after")
    for y in (3.2, 0.2):
        ax.add_patch(plt.Rectangle((8, y), 0.9, 0.8, fill=False, edgecolor="black"))
    ax.set(xlim=(-4, 16), ylim=(0, 5.2), title="Block tables at a compression (block ids)")
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, ec="black") for c in (full, kept, spare, freed)]
    labels = [
        "full block",
        f"kept tokens ({BUDGET} per KV head)",
        "empty, for the next 16",
        "freed",
    ]
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(0.78, 0.5), fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def kv_tokens(kv_budget: int | None) -> tuple[list[int], list[int]]:
    """(generated tokens, cached tokens per (layer, KV head)) after every step of one request."""
    llm = LLM(smollm2_dir(), block_size=BLOCK, kv_budget=kv_budget)
    params = SamplingParams(temperature=0, repetition_penalty=1.1, max_tokens=320)
    text = llm.tokenizer.apply_chat_template(STORY, tokenize=False, add_generation_prompt=True)
    llm.add_request(llm.tokenizer.encode(text, add_special_tokens=False), params)
    generated, cached = [], []
    while not llm.is_finished():
        llm.step()
        for seq in llm.scheduler.running:
            generated.append(len(seq) - seq.num_prompt_tokens)
            cached.append(seq.cache_len)
    return generated, cached


def sawtooth(path: str):
    fig, ax = plt.subplots(figsize=(8, 4))
    for kv_budget, label in ((None, "full KV"), (BUDGET, f"compressed, kv_budget={BUDGET}")):
        ax.plot(*kv_tokens(kv_budget), label=label)
    ax.axhline(BUDGET, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="generated tokens", ylabel="KV tokens per (layer, KV head)")
    ax.set_title(f"SmolLM2-135M, blocks of {BLOCK}: one request's cache")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    block_tables(os.path.join(HERE, "block_tables.png"))
    sawtooth(os.path.join(HERE, "sawtooth.png"))
