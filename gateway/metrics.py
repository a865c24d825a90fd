"""Prometheus metrics of SPEC §9, rendered as text on the admin listener.

Each process counts its own; with several workers the admin listener's process adds up the snapshots the
workers publish (see workers.py), so every counter is the sum over processes.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[tuple[str, str], ...]

# Every metric of SPEC §9 with its HELP text: each is declared in the output even before its first sample, so
# dashboards and alerts can tell "zero so far" from "not exported".
COUNTERS = {
    "gateway_requests_total": "Requests answered, by HTTP status code.",
    "gateway_logins_total": "Sign-in attempts, by result (success or the refusal/error code).",
    "gateway_group_sync_changes_total": "Memberships added or removed by group sync, by op.",
    "gateway_gitlab_requests_total": "Requests made to GitLab, by endpoint and HTTP status code.",
    "gateway_resync_total": "Re-checks of users with GitLab (SPEC §11), by result.",
}
HISTOGRAMS = {
    "gateway_request_duration_seconds": "Time to answer a request, in seconds.",
    "gateway_upstream_duration_seconds": "Time the upstream took to send its response headers, in seconds.",
}
GAUGES = {
    "gateway_sessions_active": "Sessions neither revoked nor expired.",
    "gateway_resync_lag_seconds": "How far past due the oldest due re-check is, in seconds.",
}
# SPEC §12: the newest automatic provisioning run (whichever replica ran it), read from the database at scrape.
AUTOPROV_GAUGES = {
    "gateway_autoprov_last_run_timestamp_seconds": "When the last automatic provisioning run finished (Unix time).",
    "gateway_autoprov_last_run_success": "1 when the last automatic provisioning run applied, 0 when it failed.",
    "gateway_autoprov_last_run_duration_seconds": "How long the last automatic provisioning run took, in seconds.",
    "gateway_autoprov_last_run_gitlab_calls": "GitLab API calls the last automatic provisioning run made.",
    "gateway_autoprov_last_run_changes": "What the last automatic provisioning run changed, by kind.",
}


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total


_CODE_LABELS: dict[int, Labels] = {}


@dataclass
class Metrics:
    counters: dict[str, dict[Labels, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    histograms: dict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    sessions_active: int = 0
    resync_lag: float = 0.0
    # SPEC §12: gauge name -> value, and kind -> count for gateway_autoprov_last_run_changes (empty: no run yet)
    autoprov: dict[str, float] = field(default_factory=dict)
    autoprov_changes: dict[str, int] = field(default_factory=dict)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, seconds: float) -> None:
        self.histograms[name].observe(seconds)

    # Named helpers so call sites cannot misspell a metric.
    def request(self, code: int, seconds: float) -> None:
        # Called for every proxied request: skip inc()'s label sorting, the key for a code never changes.
        key = _CODE_LABELS.get(code)
        if key is None:
            key = _CODE_LABELS.setdefault(code, (("code", str(code)),))
        self.counters["gateway_requests_total"][key] += 1
        self.histograms["gateway_request_duration_seconds"].observe(seconds)

    def upstream(self, seconds: float) -> None:
        self.observe("gateway_upstream_duration_seconds", seconds)

    def login(self, result: str) -> None:
        self.inc("gateway_logins_total", result=result)

    def group_changes(self, added: int, removed: int) -> None:
        if added:
            self.inc("gateway_group_sync_changes_total", added, op="add")
        if removed:
            self.inc("gateway_group_sync_changes_total", removed, op="remove")

    def gitlab_request(self, endpoint: str, code: int) -> None:
        self.inc("gateway_gitlab_requests_total", endpoint=endpoint, code=str(code))

    # ---- cross-process -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        return {
            "counters": {n: [[list(map(list, k)), v] for k, v in c.items()] for n, c in self.counters.items()},
            "histograms": {n: [h.counts, h.total] for n, h in self.histograms.items()},
        }

    def merge_snapshot(self, snap: dict[str, object]) -> None:
        counters = snap.get("counters", {})
        assert isinstance(counters, dict)
        for name, items in counters.items():
            for key, value in items:
                self.counters[name][tuple((str(a), str(b)) for a, b in key)] += float(value)
        histograms = snap.get("histograms", {})
        assert isinstance(histograms, dict)
        for name, (counts, total) in histograms.items():
            self.histograms[name].merge(Histogram(list(counts), float(total)))

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for name in sorted(COUNTERS.keys() | self.counters.keys()):
            lines.append(f"# HELP {name} {COUNTERS.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            for labels, value in sorted(self.counters.get(name, {}).items()):
                lines.append(f"{name}{_labels(labels)} {_num(value)}")
        for name in sorted(HISTOGRAMS.keys() | self.histograms.keys()):
            h = self.histograms.get(name) or Histogram()
            lines.append(f"# HELP {name} {HISTOGRAMS.get(name, name)}")
            lines.append(f"# TYPE {name} histogram")
            running = 0
            for bound, count in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{name}_bucket{{le="{le}"}} {running}')
            lines.append(f"{name}_sum {h.total!r}")
            lines.append(f"{name}_count {running}")
        lines.append(f"# HELP gateway_sessions_active {GAUGES['gateway_sessions_active']}")
        lines.append("# TYPE gateway_sessions_active gauge")
        lines.append(f"gateway_sessions_active {self.sessions_active}")
        lines.append(f"# HELP gateway_resync_lag_seconds {GAUGES['gateway_resync_lag_seconds']}")
        lines.append("# TYPE gateway_resync_lag_seconds gauge")
        lines.append(f"gateway_resync_lag_seconds {self.resync_lag!r}")
        for name, help_text in AUTOPROV_GAUGES.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            if name == "gateway_autoprov_last_run_changes":
                lines.extend(f'{name}{{kind="{_escape(k)}"}} {v}' for k, v in sorted(self.autoprov_changes.items()))
            elif name in self.autoprov:
                lines.append(f"{name} {_num(self.autoprov[name])}")
        return "\n".join(lines) + "\n"


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    """Label values escape backslash, double quote and newline (the text format's only escapes)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)
