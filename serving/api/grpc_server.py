"""gRPC gateway (grpc.aio): the herd.v1.Herd service over the same EngineClient as HTTP, with
the standard health service, server reflection and Bearer-key auth."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos.herd.v1 import herd_pb2 as pb
from protos.herd.v1 import herd_pb2_grpc as pb_grpc
from serving.api.admission import Admission, Overloaded, Unavailable
from serving.api.chat_tools import ChatTools
from serving.api.engine_client import EngineClient
from serving.api.grpc_convert import ResponseBuilder, chat_structured, chat_tools, sampling_params
from serving.api.openai_responses import TokenNames
from serving.api.openai_schema import template_arguments
from serving.engine.async_engine import EngineDeadError
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import ParamError

SERVICE = pb.DESCRIPTOR.services_by_name["Herd"].full_name
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # no key needed
_ROLES = {"system", "developer", "user", "assistant", "tool"}


class HerdService(pb_grpc.HerdServicer):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def _client(self, model: str, context) -> EngineClient:
        try:
            client = self.admission.admit()
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except Overloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        if model and model not in {m.id for m in client.models()}:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: `{model}` is not served here")
        return client

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        client = await self._client(request.model, context)
        kind = request.WhichOneof("prompt")
        if kind is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: set text or token_ids")
        prompt = request.text if kind == "text" else {"prompt_token_ids": list(request.token_ids.ids)}
        async for msg in self._run(client, prompt, request, kind, context):
            yield msg

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        client = await self._client(request.model, context)
        if not request.messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "messages: at least one is required")
        messages = []
        for i, m in enumerate(request.messages):
            if m.role not in _ROLES:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"messages[{i}].role: must be one of {sorted(_ROLES)}, got {m.role!r}")
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            msg.update({k: getattr(m, k) for k in ("name", "tool_call_id") if getattr(m, k)})
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": template_arguments(c.arguments)}} for c in m.tool_calls]
            messages.append(msg)
        add_prompt = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        try:
            tools = chat_tools(request, client.tokenizer.chat_template, client.tool_call_parser)
            structured = chat_structured(request, tools)
        except ParamError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        messages, template_tools = tools.render(messages) if tools else (messages, None)
        try:
            ids = client.tokenizer.encode_chat(messages, add_generation_prompt=add_prompt, tools=template_tools)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"messages: {e}")
        async for msg in self._run(client, {"prompt_token_ids": ids}, request, "messages", context,
                                   tools, structured):
            yield msg

    async def _run(self, client: EngineClient, prompt, request, prompt_field: str, context,
                   tools: ChatTools | None = None, structured=None) -> AsyncIterator[pb.GenerateResponse]:
        """Streams one engine request. A cancelled call or an expired deadline cancels this
        coroutine, and leaving the engine's iterator aborts the request."""
        try:
            params = sampling_params(request.params)
        except ParamError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        params.structured = structured
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
        builder = ResponseBuilder(rid, params, TokenNames(client.tokenizer), tools)
        merged: RequestOutput | None = None
        stream = client.generate(prompt, params, rid)
        try:
            async for out in stream:
                if request.stream:
                    yield builder.message(out)
                elif merged is None:
                    merged = out
                else:
                    merged.merge(out)
        except ParamError as e:
            field = (prompt_field if e.param == "prompt" else e.param if structured is not None and
                     e.param == structured.param else f"params.{e.param}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {str(e).split(': ', 1)[-1]}")
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            await stream.aclose()
        if merged is not None:
            yield builder.message(merged)

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        client = await self._client("", context)
        return pb.ListModelsResponse(models=[
            pb.Model(id=m.id, created=m.created, max_model_len=m.max_model_len, owned_by=m.owned_by)
            for m in client.models()])

    async def GetStats(self, request, context) -> pb.Stats:
        client = self.admission.client
        if client is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        s = client.stats()
        return pb.Stats(num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
                        num_kv_blocks=s.num_kv_blocks, num_free_kv_blocks=s.num_free_kv_blocks,
                        prefix_cache_hit_rate=s.prefix_hit_rate, num_preemptions=s.num_preemptions,
                        prompt_tokens=s.prompt_tokens, generation_tokens=s.generation_tokens,
                        requests_in_flight=client.num_in_flight())


class _BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str) -> None:
        self.expected = f"Bearer {api_key}"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_SERVICES):
            return handler
        if dict(details.invocation_metadata or ()).get("authorization") == self.expected:
            return handler
        message = "missing or wrong API key; send metadata 'authorization: Bearer KEY'"

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raises

        ser = {"request_deserializer": handler.request_deserializer,
               "response_serializer": handler.response_serializer}
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **ser)
        return grpc.unary_unary_rpc_method_handler(deny_unary, **ser)


class GrpcGateway:
    """The running server; `bound_port` is the real port (useful with port 0)."""

    def __init__(self, server: grpc.aio.Server, bound_port: int, health_task: asyncio.Task) -> None:
        self.server, self.bound_port, self._health_task = server, bound_port, health_task

    async def stop(self, grace: float | None = None) -> None:
        self._health_task.cancel()
        await self.server.stop(grace)


async def _track_health(admission: Admission, health: health_aio.HealthServicer) -> None:
    """NOT_SERVING while the model loads and while draining, SERVING in between."""
    last = None
    while True:
        status = (health_pb2.HealthCheckResponse.SERVING if admission.ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != last:
            for name in ("", SERVICE):
                await health.set(name, status)
            last = status
        await asyncio.sleep(0.05)


async def start_grpc_server(admission: Admission, host: str, port: int, api_key: str | None = None,
                            max_message_bytes: int = 8 * 2**20) -> GrpcGateway:
    server = grpc.aio.server(
        interceptors=[_BearerAuth(api_key)] if api_key else None,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes)])
    pb_grpc.add_HerdServicer_to_server(HerdService(admission), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC: cannot bind {host}:{port}")
    await server.start()
    task = asyncio.create_task(_track_health(admission, health))
    return GrpcGateway(server, bound, task)
