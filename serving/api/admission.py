"""Gateway admission shared by HTTP and gRPC: readiness, draining and the queue bound."""

from __future__ import annotations

from serving.api.engine_client import EngineClient


class Unavailable(RuntimeError):
    """Not serving now (starting or draining): HTTP 503 / gRPC UNAVAILABLE."""


class Overloaded(RuntimeError):
    """The queue is full: HTTP 429 / gRPC RESOURCE_EXHAUSTED."""


class Admission:
    def __init__(self, max_queued_requests: int | None = None) -> None:
        self.client: EngineClient | None = None  # set once the model is loaded
        self.max_queued_requests = max_queued_requests
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.client is not None and not self.draining

    def admit(self) -> EngineClient:
        """The engine to use for a new request, or the reason it cannot be taken now."""
        if self.client is None:
            raise Unavailable("the model is still loading; retry shortly")
        if self.draining:
            raise Unavailable("the server is shutting down")
        if self.max_queued_requests is not None:
            # Accepted but not yet running (includes requests not yet seen by the engine loop).
            waiting = self.client.num_in_flight() - self.client.stats().num_running
            if waiting >= self.max_queued_requests:
                raise Overloaded(f"{waiting} requests are queued (limit {self.max_queued_requests}); "
                                 "retry later")
        return self.client
