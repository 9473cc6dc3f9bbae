"""The one interface the HTTP and gRPC servers talk to: "an engine", in-process or a Ray cluster.

Servers translate and delegate: they never touch tensors or the scheduler, only this.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from models.llama4.tokenizer import Tokenizer
from serving.engine.engine import PromptInput
from serving.engine.outputs import ModelCard, RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineStats, ReplicaState


class EngineClient(Protocol):
    tokenizer: Tokenizer
    tool_call_parser: str | None  # None: the chat template decides (serving/api/tool_parsers.py)

    def models(self) -> list[ModelCard]: ...

    def generate(self, prompt: PromptInput, params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Delta outputs until finished; raises ParamError for a bad request before any output.
        Closing the iterator early aborts the request."""

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def replica_states(self) -> list[ReplicaState]: ...

    def num_in_flight(self) -> int: ...

    def shutdown(self) -> None: ...
