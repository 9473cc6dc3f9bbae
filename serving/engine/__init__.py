"""Paged-KV continuous-batching engine: scheduler (policy), block manager (KV blocks, prefix
hashes), model runner (executes a step), sampler, output processor."""

from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.outputs import CompletionOutput, Logprob, RequestOutput
from serving.engine.sampling_params import ParamError, SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "LLMEngine", "Logprob", "ParamError", "RequestOutput",
           "SamplingParams"]
