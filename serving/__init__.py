"""Serving: the engine, its offline API, the gateway, the Ray cluster and batch inference.

    from serving import LLM, SamplingParams
"""

from serving.engine.sampling_params import SamplingParams
from serving.llm import LLM

__all__ = ["LLM", "SamplingParams"]
