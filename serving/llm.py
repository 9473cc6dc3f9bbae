"""Offline inference with vLLM's call shapes: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from serving.engine.config import EngineConfig, default_compile
from serving.engine.engine import LLMEngine, PromptInput
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams


def compile_choice(device: str, enforce_eager: bool | None, compile: bool | None) -> bool:
    """As vLLM's LLM, the decode step is compiled unless `enforce_eager=True` (by default on
    CPU only, see `default_compile`); `compile` is herd's name for the opposite switch."""
    if enforce_eager is not None and compile is not None and compile == enforce_eager:
        raise ValueError(f"enforce_eager={enforce_eager} contradicts compile={compile}: give one of them")
    return default_compile(device, compile if enforce_eager is None else not enforce_eager)


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", *, quantization: str | None = None,
                 seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float | None = None, memory_utilization: float = 0.5,
                 device: str = "cpu", enforce_eager: bool | None = None, compile: bool | None = None,
                 **kwargs: Any) -> None:
        self.engine = LLMEngine.from_config(EngineConfig(
            model=model, dtype=dtype, quantization=quantization, seed=seed, max_model_len=max_model_len,
            device=device, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            compile=compile_choice(device, enforce_eager, compile),
            memory_utilization=gpu_memory_utilization or memory_utilization, **kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """The offline API over an engine built elsewhere (e.g. a tensor-parallel replica's)."""
        llm = cls.__new__(cls)
        llm.engine, llm._ids = engine, itertools.count()
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [{"prompt_token_ids": tok.encode_chat(conv, add_generation_prompt=add_generation_prompt,
                                                        tools=tools)} for conv in conversations]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[PromptInput], params, use_tqdm: bool) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        order: dict[str, int] = {}
        for prompt, p in zip(prompts, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, prompt, p)
            order[rid] = len(order)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm, unit="req")
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id in results:
                        results[out.request_id].merge(out)
                    else:
                        results[out.request_id] = out
                    if out.finished:
                        bar.update(1)
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        for out in results.values():
            out.delta = False
        return sorted(results.values(), key=lambda o: order[o.request_id])
