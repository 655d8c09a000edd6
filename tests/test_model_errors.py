"""Model paths expand `~`, and the errors say what to do: a command that exists, the smallest
kv_budget accepted."""

import os
from types import SimpleNamespace

import pytest

from nanozipage.config import check_kv_budget, model_dir


def test_a_model_path_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    assert model_dir("~/model") == os.path.join(str(tmp_path), "model")


def test_a_missing_path_is_not_offered_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match="pass a checkpoint directory") as error:
        model_dir("~/missing/model")
    assert str(tmp_path / "missing" / "model") in str(error.value)
    assert "download" not in str(error.value)


def test_a_missing_hub_id_is_offered_the_hf_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="`hf download org/not-cached`"):
        model_dir("org/not-cached")


@pytest.mark.parametrize(
    "block_size, window, num_sinks, smallest",
    [(256, 16, 0, 512), (16, 16, 0, 32), (16, 8, 0, 32), (16, 4, 30, 48), (16, 8, 25, 48)],
)
def test_the_kv_budget_error_names_the_smallest_budget_accepted(
    block_size, window, num_sinks, smallest
):
    """The budget holds the window and a block to choose from, or the sinks if they are more."""
    config = SimpleNamespace(block_size=block_size, window=window, num_sinks=num_sinks)
    for budget in (smallest - 1, smallest - block_size):
        with pytest.raises(ValueError, match=rf"\({smallest}, {smallest + block_size}, \.\.\.\)"):
            check_kv_budget(budget, config)
    check_kv_budget(smallest, config)
