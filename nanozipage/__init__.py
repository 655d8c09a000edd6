"""nanozipage: a small paged LLM inference engine (see README.md for a tour of the code)."""

from nanozipage.llm_engine import LLMEngine
from nanozipage.sampling_params import SamplingParams


class LLM(LLMEngine):
    pass


__all__ = ["LLM", "SamplingParams"]
