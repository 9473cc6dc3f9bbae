"""Prometheus text exposition of the engine's stats and the gateway's counters."""

from __future__ import annotations

from collections import Counter

from serving.engine.stats import EngineStats, Histogram, ReplicaState


class GatewayCounters:
    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()  # (route, status) -> count

    def observe(self, route: str, status: int) -> None:
        self.responses[(route, status)] += 1


def _histogram(name: str, help_text: str, h: Histogram, model: str) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, n in zip((*h.buckets, float("inf")), h.counts):
        cumulative += n
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{model_name="{model}",le="{le}"}} {cumulative}')
    lines += [f'{name}_sum{{model_name="{model}"}} {h.total}', f'{name}_count{{model_name="{model}"}} {h.count}']
    return lines


def _replica_lines(replicas: list[ReplicaState], model: str) -> list[str]:
    series = [("replica_up", "gauge", "1 while the replica is in rotation", lambda r: int(r.healthy)),
              ("replica_restarts_total", "counter", "Times the replica was rebuilt after dying", lambda r: r.restarts),
              ("replica_num_requests_running", "gauge", "Requests running on the replica",
               lambda r: r.stats.num_running if r.stats else 0),
              ("replica_kv_cache_usage_perc", "gauge", "The replica's KV-cache blocks in use",
               lambda r: r.stats.kv_usage if r.stats else 0),
              ("replica_prompt_tokens_total", "counter", "Prompt tokens the replica received since it started",
               lambda r: r.stats.prompt_tokens if r.stats else 0)]
    lines = []
    for name, kind, help_text, value in series:
        lines += [f"# HELP herd:{name} {help_text}", f"# TYPE herd:{name} {kind}"]
        lines += [f'herd:{name}{{model_name="{model}",replica="{r.index}"}} {value(r)}' for r in replicas]
    return lines


def render(stats: EngineStats | None, model: str, gateway: GatewayCounters, ready: bool,
           replicas: list[ReplicaState] = ()) -> str:
    label = f'{{model_name="{model}"}}'
    lines = ["# HELP herd:ready 1 when the model is loaded and the server accepts requests",
             "# TYPE herd:ready gauge", f"herd:ready{label} {int(ready)}"]
    if stats is not None:
        gauges = [("num_requests_running", "Requests running on the engine", stats.num_running),
                  ("num_requests_waiting", "Requests waiting to be scheduled", stats.num_waiting),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use", stats.kv_usage),
                  ("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / queried",
                   stats.prefix_hit_rate)]
        counters = [("prompt_tokens_total", "Prompt tokens received", stats.prompt_tokens),
                    ("generation_tokens_total", "Tokens generated", stats.generation_tokens),
                    ("num_preemptions_total", "Sequences preempted for KV space", stats.num_preemptions),
                    ("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache",
                     stats.prefix_queried_tokens),
                    ("prefix_cache_hits_total", "Prompt tokens found in the prefix cache",
                     stats.prefix_hit_tokens)]
        for name, help_text, value in gauges:
            lines += [f"# HELP herd:{name} {help_text}", f"# TYPE herd:{name} gauge", f"herd:{name}{label} {value}"]
        for name, help_text, value in counters:
            lines += [f"# HELP herd:{name} {help_text}", f"# TYPE herd:{name} counter", f"herd:{name}{label} {value}"]
        lines += ["# HELP herd:request_success_total Finished requests by finish reason",
                  "# TYPE herd:request_success_total counter"]
        for reason, n in sorted(stats.requests_finished.items()):
            lines.append(f'herd:request_success_total{{model_name="{model}",finished_reason="{reason}"}} {n}')
        lines += _histogram("herd:time_to_first_token_seconds", "Time to first token", stats.ttft, model)
        lines += _histogram("herd:inter_token_latency_seconds", "Time between output tokens", stats.itl, model)
        lines += _histogram("herd:e2e_request_latency_seconds", "Arrival to finish", stats.e2e, model)
    lines += _replica_lines(list(replicas), model)
    lines += ["# HELP herd:http_responses_total HTTP responses by route and status",
              "# TYPE herd:http_responses_total counter"]
    for (route, status), n in sorted(gateway.responses.items()):
        lines.append(f'herd:http_responses_total{{route="{route}",status="{status}"}} {n}')
    return "\n".join(lines) + "\n"
