"""SamplingParams: every bad value is refused when it is made, naming the field."""

import pytest

from nanozipage.sampling_params import SamplingParams

NAN, INF = float("nan"), float("inf")
BAD = {
    "temperature": [-0.1, INF, NAN, "0.5", None, True],
    "top_k": [-2, 2**40, 2.0, "5", True],
    "top_p": [0.0, 1.5, NAN, "1"],
    "max_tokens": [0, True, 2.5, "8", None],
    "ignore_eos": [1, "yes", None],
    "logprobs": [0, "no"],
    "seed": [-1, 2**64, 2**70, 1.0, "x", True],
    "kv_budget": [0, 2.0, True],
    "n": [0, -1, 1.0, True],
    "min_p": [-0.1, 1.5, NAN, "0"],
    "repetition_penalty": [0.0, -1.0, INF, NAN, "1"],
    "frequency_penalty": [-2.5, 2.5, NAN, INF, "0"],
    "presence_penalty": [-2.5, 2.5, NAN, -INF, "0"],
    "stop": ["", [""], [1], ["a", None], 5, 0, b"x"],
    "stop_token_ids": [[-1], [1.0], [True], ["1"], 3, 0, "1"],
    "min_tokens": [-1, 65, 1.0, True],  # 65 > max_tokens (64 by default)
    "include_stop_str_in_output": [1, None],
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in BAD.items() for v in values])
def test_a_bad_value_raises_a_value_error_naming_its_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_good_values_are_kept_and_stops_become_lists():
    params = SamplingParams(
        temperature=0,
        top_k=-1,
        top_p=1,
        seed=2**64 - 1,
        min_p=1,
        repetition_penalty=1.3,
        frequency_penalty=-2,
        presence_penalty=2,
        stop="###",
        stop_token_ids=(7, 9),
        min_tokens=64,
        n=3,
    )
    assert params.stop == ["###"] and params.stop_token_ids == [7, 9]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams(top_k=2**31 - 1, stop=["a", "bc"]).stop == ["a", "bc"]
    assert params.top_k == -1 and params.min_tokens == params.max_tokens
