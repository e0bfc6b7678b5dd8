"""The ``overload`` workload of ``epp bench quality``: does flow control protect a light tenant?

Offered load is twice the fleet's capacity for the workload's duration: tenant A sends 20 % of
capacity, tenant B floods with the rest, and a few requests carry a high-priority objective
(epp/bench/workloads.py ``overload``). Policies: the EPP without flow control, with flow control
and global-strict fairness, with flow control and round-robin fairness, and the peer routers.

Reported per tenant: success rate, TTFT p50/p90, time queued in the EPP (its
``x-llm-d-flow-queue-duration-ms`` response header), goodput (successful requests per model
second whose TTFT met ``GOODPUT_TTFT_SLO``), and how requests failed. Tenant A's TTFT on an idle
fleet (tenant A's requests alone) is the yardstick of the targets. After each EPP run the EPP's
own counters are read: every request must have one flow-control outcome, and the queue and
in-flight gauges must be back at zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from epp.bench import report
from epp.bench.loadgen import RequestResult

GROUPS = ("A", "B", "high")
GOODPUT_TTFT_SLO = 2.0  # model seconds
POLICIES = ("epp-default", "epp-flow-strict", "epp-flow-rr", "vllm-router-power_of_two", "smg-least_load")
FLOW_POLICIES = ("epp-flow-strict", "epp-flow-rr")
IDLE_POLICY = "epp-flow-rr"  # runs tenant A alone for the idle-fleet yardstick


def runs_on(policy: str, workload: str) -> bool:
    """Which policies the quality benchmark runs on which workload."""
    if workload == "overload":
        return policy in POLICIES
    return policy not in FLOW_POLICIES


def _pct(values: Sequence[float], q: float) -> float | None:
    return report.percentile(values, q) if values else None


def group_stats(results: Sequence[RequestResult], time_scale: float) -> dict[str, Any]:
    """Per tenant: success, TTFT, EPP queue time, goodput, failures."""
    out: dict[str, Any] = {}
    start = min((r.scheduled for r in results), default=0.0)
    end = max((r.scheduled + r.lag + (r.e2e or 0.0) for r in results if r.ok), default=start)
    span_model = (end - start) / time_scale
    for group in GROUPS:
        mine = [r for r in results if r.group == group]
        if not mine:
            continue
        ok = [r for r in mine if r.ok]
        ttft = [r.ttft / time_scale for r in ok if r.ttft is not None]
        queued = [r.queue_ms / 1000.0 / time_scale for r in ok if r.queue_ms is not None]
        failures: dict[str, int] = {}
        for r in mine:
            if not r.ok:
                key = f"{r.status} {r.dropped}".strip() if r.status else (r.error[:60] or "error")
                failures[key] = failures.get(key, 0) + 1
        good = sum(1 for x in ttft if x <= GOODPUT_TTFT_SLO)
        out[group] = {
            "requests": len(mine),
            "ok": len(ok),
            "success_rate": len(ok) / len(mine),
            "ttft_p50": _pct(ttft, 50),
            "ttft_p90": _pct(ttft, 90),
            "ttft_max": max(ttft, default=None),
            "queue_p50": _pct(queued, 50),
            "queue_p90": _pct(queued, 90),
            "queue_max": max(queued, default=None),
            "goodput_rps": good / span_model if span_model > 0 else float("nan"),
            "failures": failures,
        }
    return out


def accounted(results: Sequence[RequestResult], acc: Mapping[str, float] | None, flow_control: bool) -> bool:
    """Every request ended (a response or an error the client saw); with flow control, each has
    one outcome in the EPP's counter; nothing is left in the EPP's queue or in-flight gauges."""
    if any(not r.ok and not r.status and not r.error for r in results):
        return False
    if acc is None:
        return True
    if flow_control and int(acc["flow_requests"]) != len(results):
        return False
    return acc["queue_size"] == 0 and acc["queue_bytes"] == 0 and acc["running_requests"] == 0


def epp_accounting(metrics_text: str) -> dict[str, float]:
    """Totals from the EPP's /metrics after a run: flow-control outcomes and leftover gauges."""
    out = {"flow_requests": 0.0, "flow_dispatched": 0.0, "queue_size": 0.0, "queue_bytes": 0.0,
           "running_requests": 0.0}
    for line in metrics_text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        if name == "llm_d_epp_flow_control_requests_total":
            out["flow_requests"] += value
            if 'outcome="Dispatched"' in line:
                out["flow_dispatched"] += value
        elif name == "llm_d_epp_flow_control_queue_size":
            out["queue_size"] += value
        elif name == "llm_d_epp_flow_control_queue_bytes":
            out["queue_bytes"] += value
        elif name == "inference_objective_running_requests":
            out["running_requests"] += value
    return out


def evaluate(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for the flow-control policies."""
    idle = (entry.get("idle_baseline") or {}).get("groups", {}).get("A", {}).get("ttft_p90")
    rows = []
    for policy in FLOW_POLICIES:
        run = entry["runs"].get(policy) or {}
        groups = run.get("groups") or {}
        a, high, b = groups.get("A"), groups.get("high"), groups.get("B")
        if not a:
            continue
        ratio = a["ttft_p90"] / idle if idle and a.get("ttft_p90") is not None else None
        rows.append({
            "policy": policy,
            "a_ttft_p90": a.get("ttft_p90"), "idle_a_ttft_p90": idle, "a_ratio": ratio,
            "a_ratio_met": None if ratio is None else ratio <= 2.0,
            "a_success": a["success_rate"], "a_success_met": a["success_rate"] >= 0.99,
            # "never waits behind lower bands": a high-priority request waits at most for the next
            # free slot, far less than what tenant B waits
            "high_queue_max": high.get("queue_max") if high else None,
            "b_queue_p90": b.get("queue_p90") if b else None,
            "high_met": (None if not high or high.get("queue_max") is None
                         else high["queue_max"] <= max(0.5, 0.1 * ((b or {}).get("queue_p90") or 0.0))),
            "accounted": run.get("accounted"),
        })
    return rows


def verdict(v: bool | None) -> str:
    return "n/a" if v is None else ("**met**" if v else "**missed**")


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(entry: Mapping[str, Any], policies: Sequence[str]) -> list[str]:
    """The per-tenant tables and the targets of the overload workload."""
    lines: list[str] = []
    idle = entry.get("idle_baseline")
    if idle and "groups" in idle:
        a = idle["groups"].get("A", {})
        lines += [f"Idle fleet (tenant A's requests alone, `{IDLE_POLICY}`): TTFT p50 {_f(a.get('ttft_p50'))} s, "
                  f"p90 {_f(a.get('ttft_p90'))} s.", ""]
    rows = []
    for p in policies:
        run = entry["runs"].get(p)
        if not run or "groups" not in run:
            continue
        for g in GROUPS:
            s = run["groups"].get(g)
            if not s:
                continue
            fails = ", ".join(f"{k}: {v}" for k, v in sorted(s["failures"].items())) or "-"
            rows.append([p if g == "A" else "", g, f"{s['ok']}/{s['requests']} ({s['success_rate']:.1%})",
                         _f(s["ttft_p50"]), _f(s["ttft_p90"]), _f(s["queue_p50"]), _f(s["queue_p90"]),
                         _f(s["queue_max"]), _f(s["goodput_rps"], 2), fails])
    if rows:
        lines += [report.markdown_table(
            ["policy", "tenant", "success", "TTFT p50 (s)", "TTFT p90 (s)", "queued p50 (s)", "queued p90 (s)",
             "queued max (s)", f"goodput (req/s, TTFT <= {GOODPUT_TTFT_SLO:g} s)", "failures"], rows), ""]
    acc_rows = []
    for p in policies:
        run = entry["runs"].get(p) or {}
        acc = run.get("accounting")
        if acc:
            acc_rows.append([p, run.get("requests"), int(acc["flow_requests"]), int(acc["flow_dispatched"]),
                             int(acc["queue_size"]), int(acc["running_requests"]),
                             "yes" if run.get("accounted") else "**no**"])
    if acc_rows:
        lines += ["Accounting after each run (the EPP's own counters): every request has exactly one "
                  "flow-control outcome; queue and in-flight gauges are back at zero.", "",
                  report.markdown_table(["policy", "requests sent", "flow-control outcomes", "dispatched",
                                         "queue_size left", "running left", "all accounted"], acc_rows), ""]
    targets = evaluate(entry)
    if targets:
        rows = []
        for t in targets:
            rows.append([t["policy"], f"{_f(t['a_ttft_p90'])} / {_f(t['idle_a_ttft_p90'])} = "
                         f"{_f(t['a_ratio'], 2)}x {verdict(t['a_ratio_met'])}",
                         f"{t['a_success']:.1%} {verdict(t['a_success_met'])}",
                         f"{_f(t['high_queue_max'])} s (B p90 {_f(t['b_queue_p90'])} s) {verdict(t['high_met'])}",
                         verdict(t["accounted"])])
        lines += ["Targets (round-robin is the one that must meet them): tenant A's TTFT p90 at most 2x idle "
                  "with at least 99 % success; high-priority requests never wait behind lower bands (longest "
                  "queue time at most 0.5 s or a tenth of B's p90); every request accounted for.", "",
                  report.markdown_table(["policy", "A TTFT p90 / idle", "A success", "high-priority queued max",
                                         "accounted"], rows), ""]
    return lines
