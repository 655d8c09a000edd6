"""example.py's default run compresses the long answer and reports it (shorter answers here)."""


def test_the_example_compresses_the_long_answer_and_says_so(smollm2_path, capsys):
    import example  # after the fixture: it needs smollm2's gguf, which a GPU machine may lack

    # 128 generated tokens take the story past N_max = 128 / 16 + 1 = 9 full blocks.
    outputs = example.main(["--max-tokens", "128"])
    story, capital, _ = outputs
    assert story["num_compressions"] > 0 and story["peak_kv_blocks"] == 9
    assert capital["num_compressions"] == 0 and "Paris" in capital["text"]
    printed = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct (135M parameters, 4-bit GGUF)" in printed
    assert f"after {story['num_compressions']} compressions; peak 9 KV blocks" in printed
