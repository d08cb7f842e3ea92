"""/metrics in Prometheus' text format (prometheus_client): the engine's state, read when scraped, and the
latency histograms the engine thread fills as tokens leave it. Names follow vLLM's where they exist (vLLM's
`vllm:` prefix is `gptlab_` here), the speculative-decoding counters included (only with a draft model):
acceptance rate = accepted_tokens / draft_tokens, mean tokens per round = 1 + accepted_tokens / drafts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _EngineState:
    """A collector reading engine.stats() at scrape time (a gauge per state, a counter per total)."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, key, doc in (("gptlab_num_requests_running", "running", "requests in the running batch"),
                               ("gptlab_num_requests_waiting", "waiting", "requests queued for the batch"),
                               ("gptlab_kv_cache_usage_perc", "kv_cache_usage", "share of KV-cache blocks in use")):
            yield GaugeMetricFamily(name, doc, value=s[key])
        for name, key, doc in (("gptlab_prompt_tokens", "prompt_tokens", "prompt tokens computed (cached ones not)"),
                               ("gptlab_generation_tokens", "generated_tokens", "tokens generated"),
                               ("gptlab_prefix_cache_queries", "prefix_cache_queries", "prompt tokens looked up"),
                               ("gptlab_prefix_cache_hits", "prefix_cache_hits", "prompt tokens found cached"),
                               ("gptlab_num_preemptions", "preemptions", "sequences preempted for KV space")):
            yield CounterMetricFamily(name, doc, value=s[key])
        if "spec_drafts" not in s:
            return
        for name, key, doc in (("gptlab_spec_decode_num_drafts", "spec_drafts", "rounds of draft proposals verified"),
                               ("gptlab_spec_decode_num_draft_tokens", "spec_draft_tokens", "draft tokens proposed"),
                               ("gptlab_spec_decode_num_accepted_tokens", "spec_accepted_tokens",
                                "draft tokens accepted")):
            yield CounterMetricFamily(name, doc, value=s[key])
        per_pos = CounterMetricFamily("gptlab_spec_decode_num_accepted_tokens_per_pos",
                                      "rounds whose proposal at this position was accepted", labels=["position"])
        for i, n in enumerate(s["spec_accepted_per_pos"]):
            per_pos.add_metric([str(i)], n)
        yield per_pos


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineState(stats))
        self.ttft = Histogram("gptlab_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("gptlab_inter_token_latency_seconds", "time between a sample's tokens",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.done = Counter("gptlab_request_success", "finished samples by reason", ["finished_reason"],
                            registry=self.registry)

    # the AsyncEngine's observer
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, reason: str) -> None:
        self.done.labels(finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
