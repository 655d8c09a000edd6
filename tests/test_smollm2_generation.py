"""Real weights: SmolLM2-135M-Instruct greedy output identical to transformers (CPU, float32)."""

import torch
import transformers

from nanozipage import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "How many legs does a spider have?",
    "Give me one tip for learning Python.",
]


def test_smollm2_greedy_matches_transformers(smollm2_path):
    llm = LLM(smollm2_path, block_size=16, max_model_len=1024, dtype="float32")
    prompts = [
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in QUESTIONS
    ]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
        assert out["token_ids"] == ref[0, len(prompt) :].tolist()
    assert any(len(out["token_ids"]) == 64 for out in outputs)
