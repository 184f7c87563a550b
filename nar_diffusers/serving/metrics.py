"""`GET /metrics`: the engine's `EngineStats` in the Prometheus text format (through `prometheus_client`)."""

from __future__ import annotations

from .stats import LATENCY_BUCKETS


def prometheus_text(engine) -> str:
    """The engine's gauges (queue depth, active slots, tokens/s, outputs/s), counters and latency histogram."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    stats = engine.stats

    class EngineCollector:
        def collect(self):
            tokens_per_second, outputs_per_second = stats.rates()
            yield GaugeMetricFamily("nar_queue_depth", "Requests waiting for batch slots.", value=engine.queue_depth)
            yield GaugeMetricFamily("nar_active_slots", "Outputs in flight.", value=engine.active_outputs)
            yield GaugeMetricFamily("nar_max_batch", "Batch slots.", value=engine.max_batch)
            yield GaugeMetricFamily("nar_tokens_per_second", "Tokens drawn per second (recent).", value=tokens_per_second)
            yield GaugeMetricFamily("nar_images_per_second", "Outputs finished per second (recent).",
                                    value=outputs_per_second)  # fmt: skip
            requests = CounterMetricFamily("nar_requests", "Requests by outcome.", labels=["outcome"])
            with stats._lock:
                outcomes = {"submitted": stats.submitted, "rejected": stats.rejected, "finished": stats.finished,
                            **stats.failed}  # fmt: skip
                counts, total, passes, tokens = list(stats.latency_counts), stats.latency_sum, stats.forward_passes, stats.tokens
                skipped = stats.skipped_previews
            for outcome, value in outcomes.items():
                requests.add_metric([outcome], value)
            yield requests
            yield CounterMetricFamily("nar_forward_passes", "Model forward passes (prefills and decode steps).", value=passes)
            yield CounterMetricFamily("nar_tokens", "Tokens drawn.", value=tokens)
            yield CounterMetricFamily("nar_skipped_previews", "Streamed previews replaced by a newer one before they "
                                      "were decoded (decoding lagged).", value=skipped)  # fmt: skip
            cumulative, buckets = 0, []
            for edge, count in zip(list(LATENCY_BUCKETS) + [float("inf")], counts):
                cumulative += count
                buckets.append(("+Inf" if edge == float("inf") else str(edge), cumulative))
            yield HistogramMetricFamily("nar_request_latency_seconds", "Submission to result, finished requests.",
                                        buckets=buckets, sum_value=total)  # fmt: skip

    registry = CollectorRegistry()
    registry.register(EngineCollector())
    return generate_latest(registry).decode()
