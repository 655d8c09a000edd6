"""nanozipage: a small paged LLM inference engine (see README.md for a tour of the code)."""

from nanozipage.llm_engine import LLMEngine as LLM
from nanozipage.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
