"""Request counts and latencies per route and per explanation method, in Prometheus' text format."""

from __future__ import annotations

import threading


class Metrics:
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str, int], int] = {}
        self.histograms: dict[tuple[str, str], list[float]] = {}

    def observe(self, family: str, label: str, seconds: float, status: int = 200) -> None:
        with self._lock:
            self.counts[(family, label, status)] = self.counts.get((family, label, status), 0) + 1
            buckets = self.histograms.setdefault((family, label), [0.0] * (len(self.BUCKETS) + 2))
            for i, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            buckets[-2] += 1  # +Inf / count
            buckets[-1] += seconds  # sum

    def render(self, *, gauges: dict[str, float], counters: dict[str, float] | None = None) -> str:
        """The text exposition: ``gauges`` typed gauge, ``counters`` (names ending in ``_total``) typed counter."""
        lines = ["# TYPE handlens_requests_total counter"]
        with self._lock:
            for (family, label, status), count in sorted(self.counts.items()):
                key = "route" if family == "http" else "method"
                lines.append(f'handlens_requests_total{{kind="{family}",{key}="{_escape(label)}",status="{status}"}} '
                             f"{count}")
            lines.append("# TYPE handlens_request_seconds histogram")
            for (family, label), buckets in sorted(self.histograms.items()):
                key = "route" if family == "http" else "method"
                base = f'kind="{family}",{key}="{_escape(label)}"'
                for bound, value in zip(self.BUCKETS, buckets, strict=False):
                    lines.append(f'handlens_request_seconds_bucket{{{base},le="{bound}"}} {value:g}')
                lines.append(f'handlens_request_seconds_bucket{{{base},le="+Inf"}} {buckets[-2]:g}')
                lines.append(f"handlens_request_seconds_count{{{base}}} {buckets[-2]:g}")
                lines.append(f"handlens_request_seconds_sum{{{base}}} {buckets[-1]:.6f}")
        for name, value in (counters or {}).items():
            lines += [f"# TYPE {name} counter", f"{name} {value:g}"]
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
