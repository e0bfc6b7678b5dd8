"""The metrics port: ``/metrics``, ``/healthz``, ``/readyz``, ``/debug/decisions``, ``/debug``.

Runs on the same event loop as the ext_proc server; every handler only reads snapshots.
"""

from __future__ import annotations

import html
import json
import time
from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.datalayer.endpoint import now
from epp.datalayer.pool import EndpointPool
from epp.observability import deferred
from epp.observability.decisions import DecisionLog, decision_json
from epp.observability.metrics import REGISTRY


class DebugState:
    """What the debug pages show; ``decisions`` follows the live director (config reloads)."""

    def __init__(self, pool: EndpointPool, decisions: Callable[[], DecisionLog],
                 in_flight: Callable[[], int] = lambda: 0, started: float | None = None,
                 plugins: Callable[[], list] = list,
                 flow: Callable[[], dict | None] = lambda: None,
                 discovery: Callable[[], dict] | None = None) -> None:
        self.pool = pool
        self.decisions = decisions
        self.in_flight = in_flight
        self.started = started or time.time()
        self.plugins = plugins  # the live config's plugins; those with debug_state() get a section
        self.flow = flow  # flow control's queue state (None: the feature gate is off)
        # where the endpoints come from and how that source is doing (Kubernetes watches, outages)
        self.discovery = discovery or (lambda: {"ready": pool.synced})

    def plugin_states(self) -> list[dict]:
        out = []
        for p in self.plugins():
            state = getattr(p, "debug_state", None)
            if callable(state):
                try:
                    out.append({"plugin": getattr(p, "name", ""), "type": getattr(p, "plugin_type", ""), **state()})
                except Exception as e:  # a debug view must never break the page
                    out.append({"plugin": getattr(p, "name", ""), "error": f"{type(e).__name__}: {e}"})
        return out


def endpoint_rows(pool: EndpointPool) -> list[dict]:
    t = now()
    rows = []
    for ep in pool.endpoints():
        mt = ep.metrics
        age = mt.age(t)
        rows.append({
            "endpoint": ep.key, "name": ep.metadata.name, "reachable": ep.reachable,
            "scrape_failures": ep.failures, "excluded": bool(ep.excluded_at),
            "metrics_age_s": None if age == float("inf") else round(age, 3),
            "waiting_queue_size": mt.waiting_queue_size, "running_requests": mt.running_requests,
            "kv_cache_usage": round(mt.kv_cache_usage, 4),
            "custom": dict(mt.custom),
        })
    return rows


def build_app(state: DebugState) -> web.Application:
    async def metrics(_req: web.Request) -> web.Response:
        deferred.flush()  # request-path histogram observations, binned in bulk
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_req: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_req: web.Request) -> web.Response:
        if state.discovery().get("ready"):
            return web.Response(text="ready\n")
        return web.Response(status=503, text="endpoint pool not synced yet\n")

    async def decisions(req: web.Request) -> web.Response:
        try:
            n = int(req.query.get("n", "50"))
        except ValueError:
            return web.json_response({"error": "n must be an integer"}, status=400)
        return web.json_response({"decisions": state.decisions().as_json(max(0, n))},
                                 dumps=lambda o: json.dumps(o, indent=1))

    async def endpoints(_req: web.Request) -> web.Response:
        return web.json_response({"pool": state.pool.name, "synced": state.pool.synced,
                                  "discovery": state.discovery(), "in_flight": state.in_flight(),
                                  "endpoints": endpoint_rows(state.pool)})

    async def discovery(_req: web.Request) -> web.Response:
        return web.json_response(state.discovery(), dumps=lambda o: json.dumps(o, indent=1))

    async def plugin_debug(_req: web.Request) -> web.Response:
        return web.json_response({"plugins": state.plugin_states()}, dumps=lambda o: json.dumps(o, indent=1))

    async def flowcontrol(_req: web.Request) -> web.Response:
        return web.json_response({"enabled": (snap := state.flow()) is not None, "state": snap},
                                 dumps=lambda o: json.dumps(o, indent=1))

    async def page(_req: web.Request) -> web.Response:
        return web.Response(text=render_page(state), content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/decisions", decisions)
    app.router.add_get("/debug/endpoints", endpoints)
    app.router.add_get("/debug/plugins", plugin_debug)
    app.router.add_get("/debug/flowcontrol", flowcontrol)
    app.router.add_get("/debug/discovery", discovery)
    app.router.add_get("/debug", page)
    return app


def _age(age: float | None) -> str:
    return "never" if age is None else f"{age:.3f}s"


def render_page(state: DebugState, n_decisions: int = 20) -> str:
    e = html.escape
    rows = endpoint_rows(state.pool)
    ep_html = "".join(
        f"<tr><td>{e(r['endpoint'])}</td><td>{e(r['name'])}</td>"
        f"<td class={'ok' if r['reachable'] else 'bad'}>{'yes' if r['reachable'] else 'NO'}</td>"
        f"<td>{_age(r['metrics_age_s'])}</td>"
        f"<td>{r['waiting_queue_size']}</td><td>{r['running_requests']}</td><td>{r['kv_cache_usage']:.3f}</td></tr>"
        for r in rows) or "<tr><td colspan=7>no endpoints</td></tr>"
    dec_rows = []
    for d in state.decisions().recent(n_decisions):
        dj = decision_json(d)
        prof = dj["profiles"].get(dj["primary_profile"]) or {"candidates": []}
        scores = "<br>".join(
            e(f"{c['endpoint']}: {c['total']:.3f} (" +
              ", ".join(f"{k} {v['raw']:.2f}->{v['weighted']:.2f}" for k, v in c["scorers"].items()) + ")")
            for c in prof["candidates"][:8])
        dec_rows.append(
            f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(d.at))}</td><td>{e(d.request_id)}</td>"
            f"<td>{e(d.model)}{'' if d.target_model == d.model else ' &rarr; ' + e(d.target_model)}</td>"
            f"<td>{d.candidates}</td><td><b>{e(d.target)}</b></td><td>{scores}</td>"
            f"<td>{dj['timing_ms']['scheduling']:.3f} / {dj['timing_ms']['total']:.3f}</td>"
            f"<td>{dj['timing_ms']['queued']:.1f}</td></tr>")
    dec_html = "".join(dec_rows) or "<tr><td colspan=8>no decisions yet</td></tr>"
    kv_html = "".join(_kv_events_section(ps) for ps in state.plugin_states() if "subscriptions" in ps)
    return f"""<!doctype html><html><head><meta charset=utf-8><title>EPP debug</title>
<meta http-equiv=refresh content=5>
<style>body{{font:14px sans-serif;margin:1em}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}}th{{background:#eee}}
.ok{{color:#070}}.bad{{color:#b00;font-weight:bold}}</style></head><body>
<h1>Endpoint picker</h1>
<p>pool <b>{e(state.pool.name or '-')}</b>, synced: {state.pool.synced}, endpoints: {len(rows)},
requests in flight: {state.in_flight()}, up {time.time() - state.started:.0f}s.
JSON: <a href="/debug/decisions">/debug/decisions</a>, <a href="/debug/endpoints">/debug/endpoints</a>,
<a href="/debug/plugins">/debug/plugins</a>, <a href="/metrics">/metrics</a></p>
{_discovery_line(state.discovery())}
<h2>Endpoints</h2><table><tr><th>endpoint</th><th>name</th><th>reachable</th><th>metrics age</th>
<th>queue</th><th>running</th><th>KV usage</th></tr>{ep_html}</table>{kv_html}
{render_flow(state.flow())}
<h2>Recent decisions</h2><table><tr><th>time</th><th>request</th><th>model</th><th>candidates</th><th>pick</th>
<th>scores (raw&rarr;weighted)</th><th>ms sched / total</th><th>ms queued</th></tr>{dec_html}</table></body></html>"""


def render_flow(snap: dict | None) -> str:
    """The flow-control section of /debug: saturation, and every band and flow with its backlog."""
    if snap is None:
        return "<h2>Flow control</h2><p>off (feature gate <code>flowControl</code> not set)</p>"
    e = html.escape
    rows = []
    for b in snap["bands"]:
        flows = ", ".join(f"{e(f['fairness_id'])}: {f['queued']} (oldest {f['oldest_wait_s']:.3f}s)"
                          for f in b["flows"]) or "-"
        rows.append(f"<tr><td>{b['priority']}</td><td>{b['queued']} / {b['max_requests']}</td><td>{b['bytes']}</td>"
                    f"<td>{e(b['fairness'])} / {e(b['ordering'])}</td><td>{flows}</td></tr>")
    stages = ", ".join(f"{k} {v:.3f}" for k, v in snap["stages"].items())
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(snap["outcomes"].items())) or "none yet"
    return (f"<h2>Flow control</h2><p>queued {snap['queued']} ({snap['bytes']} bytes), saturation "
            f"{snap['saturation']:.3f}{' (' + stages + ')' if stages else ''}, in flight "
            f"{sum(snap['in_flight'].values())}{', pool empty' if snap['pool_empty'] else ''}. Outcomes: {outcomes}. "
            f"JSON: <a href=\"/debug/flowcontrol\">/debug/flowcontrol</a></p>"
            "<table><tr><th>priority</th><th>queued / max</th><th>bytes</th><th>fairness / ordering</th>"
            f"<th>flows (queued, oldest wait)</th></tr>{''.join(rows)}</table>")


def _kv_events_section(ps: dict) -> str:
    """A precise prefix producer: its index and one row per KV-event subscription."""
    e = html.escape
    idx = ps.get("index", {})
    rows = "".join(
        f"<tr><td>{e(str(s['endpoint']))}</td><td>{e(str(s.get('address', '')))}</td>"
        f"<td class={'ok' if s.get('connected') else 'bad'}>{'yes' if s.get('connected') else 'NO'}</td>"
        f"<td>{s.get('last_seq')}</td><td>{s.get('messages')}</td><td>{s.get('gaps')}</td>"
        f"<td>{s.get('replays')} ({s.get('replay_failures')} failed)</td><td>{s.get('restarts')}</td>"
        f"<td>{s.get('delivery_lag_s')}s / {_age(s.get('idle_s'))}</td><td>{s.get('blocks')}</td>"
        f"<td>{idx.get('per_endpoint', {}).get(s['endpoint'], 0)}</td><td>{e(str(s.get('errors') or ''))}</td></tr>"
        for s in ps.get("subscriptions", [])) or "<tr><td colspan=12>no subscriptions</td></tr>"
    return (f"<h2>KV events ({e(str(ps.get('plugin')))}, {e(str(ps.get('subscriber_mode')))})</h2>"
            f"<p>index entries {idx.get('entries', 0)} of {idx.get('capacity', 0)}, evicted by the bound "
            f"{idx.get('evictions', 0)}; lookups {e(str(ps.get('lookups', {})))}; events {e(str(ps.get('events', {})))}</p>"
            "<table><tr><th>endpoint</th><th>publisher</th><th>connected</th><th>last seq</th><th>messages</th>"
            "<th>gaps</th><th>replays</th><th>restarts</th><th>lag / idle</th><th>engine blocks</th>"
            f"<th>index entries</th><th>errors</th></tr>{rows}</table>")


def _discovery_line(status: dict) -> str:
    """One paragraph on the discovery source; an API-server outage in red."""
    e = html.escape
    if status.get("source") != "kubernetes":
        return f"<p>discovery: {e(str(status.get('source', '-')))}</p>"
    what = (f"InferencePool {status.get('namespace')}/{status.get('pool')} ({status.get('group')})"
            if status.get("mode") == "pool" else f"pods in {status.get('namespace')}")
    parts = [f"discovery: Kubernetes, {e(what)}, selector <code>{e(str(status.get('selector', '-')))}</code>, "
             f"target ports {e(str(status.get('target_ports', '-')))}, ready: {status.get('ready')}"]
    for w in status.get("watches", []):
        if w.get("connected"):
            parts.append(f"watch {e(w['resource'])}: connected, {w['objects']} object(s), rv {e(str(w['resource_version']))}")
        else:
            parts.append(f"<span class=bad>watch {e(w['resource'])}: API server unreachable for {w['outage_seconds']}s "
                         f"({e(w['last_error'][:200])}); using the last known {w['objects']} object(s)</span>")
    return "<p>" + "<br>".join(parts) + "</p>"


async def start_http_server(state: DebugState, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port  # type: ignore[union-attr]
    return runner, bound
