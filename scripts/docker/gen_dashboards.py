"""Generate the Grafana dashboards in deploy/grafana/dashboards/ from one readable table of panels.

Why generated: four dashboards of hand-edited Grafana JSON drift (duplicate ids, wrong datasource uids, broken
grid positions). Here each panel is one line — title, unit, PromQL queries — and the JSON is derived. The e2e suite
runs every `expr` below against the stack's real Prometheus and requires data, so a renamed metric fails CI.

    python scripts/docker/gen_dashboards.py          # rewrite the JSON files
    python scripts/docker/gen_dashboards.py --check  # exit 1 if the files are not what this script generates
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "dlt-prometheus"}

# (title, unit, [(expr, legend)]) per panel.
Panel = tuple[str, str, list[tuple[str, str]]]

DASHBOARDS: dict[str, tuple[str, list[Panel]]] = {
    "training": (
        "dist-llm-train / training progress",
        [
            ("Parameter version (global step)", "short", [("max by (job) (dlt_ps_version)", "job {{job}}")]),
            ("Training loss per worker", "none", [("dlt_worker_loss", "{{instance}}")]),
            ("Tokens per second (all workers)", "short", [("sum(dlt_worker_tokens_per_second)", "tokens/s")]),
            ("Tasks by state", "short", [("sum by (state) (dlt_controller_tasks)", "{{state}}")]),
            ("Jobs by state", "short", [("sum by (state) (dlt_controller_jobs)", "{{state}}")]),
            ("Updates pushed per second", "ops", [("sum(rate(dlt_worker_steps_total[1m]))", "steps/s")]),
        ],
    ),
    "paramserver": (
        "dist-llm-train / parameter server",
        [
            ("Pushes by outcome", "ops", [("sum by (outcome) (rate(dlt_ps_pushes_total[1m]))", "{{outcome}}")]),
            ("Push latency p50 / p95", "s", [
                ("histogram_quantile(0.5, sum by (le) (rate(dlt_ps_push_latency_seconds_bucket[1m])))", "p50"),
                ("histogram_quantile(0.95, sum by (le) (rate(dlt_ps_push_latency_seconds_bucket[1m])))", "p95"),
            ]),
            ("Sync round duration p50", "s", [
                ("histogram_quantile(0.5, sum by (le) (rate(dlt_ps_round_seconds_bucket[2m])))", "p50"),
            ]),
            ("Payload bytes per second", "Bps", [
                ("rate(dlt_ps_bytes_received_total[1m])", "received"),
                ("rate(dlt_ps_bytes_sent_total[1m])", "sent"),
            ]),
            ("Round membership", "short", [("dlt_ps_members", "job {{job}}")]),
            ("Parameter version", "short", [("dlt_ps_version", "job {{job}}")]),
        ],
    ),
    "workers": (
        "dist-llm-train / workers",
        [
            ("Workers by state (controller)", "short", [("sum by (state) (dlt_controller_workers)", "{{state}}")]),
            ("Worker scrape targets up", "short", [("sum(up{job=\"worker\"})", "up")]),
            ("Step time p50 per worker", "s", [
                ("histogram_quantile(0.5, sum by (instance, le) (rate(dlt_worker_step_seconds_bucket[1m])))",
                 "{{instance}}"),
            ]),
            ("Compute time p50 per worker", "s", [
                ("histogram_quantile(0.5, sum by (instance, le) (rate(dlt_worker_compute_seconds_bucket[1m])))",
                 "{{instance}}"),
            ]),
            ("Heartbeats per second", "ops", [("rate(dlt_controller_heartbeats_total[1m])", "heartbeats/s")]),
            ("Deaths and reassignments", "short", [
                ("dlt_controller_worker_deaths_total", "deaths"),
                ("dlt_controller_reassignments_total", "reassigned tasks"),
            ]),
            ("PS version seen by each worker", "short", [("dlt_worker_ps_version", "{{instance}}")]),
        ],
    ),
    "network": (
        "dist-llm-train / network fidelity (configured vs measured)",
        [
            ("Worker -> PS round trip: configured vs measured", "s", [
                ("dlt_link_configured_rtt_seconds", "configured {{src}}->{{dst}}"),
                ("dlt_link_measured_rtt_seconds", "measured {{src}}->{{dst}}"),
            ]),
            ("Round-trip loss: configured vs measured", "percentunit", [
                ("dlt_link_configured_loss_ratio", "configured {{src}}->{{dst}}"),
                ("dlt_link_measured_loss_ratio", "measured {{src}}->{{dst}}"),
            ]),
            ("Measured / configured RTT", "none", [
                ("dlt_link_measured_rtt_seconds / dlt_link_configured_rtt_seconds", "{{src}}->{{dst}} ({{backend}})"),
            ]),
            ("Configured bottleneck rate", "bps", [("dlt_link_configured_rate_bits_per_second", "{{src}}->{{dst}}")]),
            ("Worker -> PS payload throughput", "Bps", [("deriv(dlt_worker_ps_bytes_sent[1m])", "{{instance}}")]),
        ],
    ),
}


def panel_json(pid: int, panel: Panel) -> dict[str, Any]:
    title, unit, queries = panel
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * ((pid - 1) % 2), "y": 8 * ((pid - 1) // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard_json(uid: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    return {
        "uid": f"dlt-{uid}",
        "title": title,
        "tags": ["dist-llm-train"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "panels": [panel_json(i + 1, p) for i, p in enumerate(panels)],
    }


def render() -> dict[Path, str]:
    return {
        OUT / f"{uid}.json": json.dumps(dashboard_json(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only verify the files are up to date")
    args = ap.parse_args()
    stale = [p for p, text in render().items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p} (run scripts/docker/gen_dashboards.py)", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for p, text in render().items():
        p.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
