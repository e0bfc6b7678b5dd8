"""A tiny model-server stand-in that reports who served each request and what it received.

    python tests/backend_app.py --ports 8001,8002 --names be1,be2

Each port is one "model server". Every POST answers JSON naming the server (``served_by``,
also the ``x-served-by`` response header) and describing the request as received
(byte count, sha256, Content-Length, Transfer-Encoding, the destination header, the model).
``"stream": true`` answers OpenAI-style SSE: ``max_tokens`` events ``delay`` seconds apart
(each carrying its send time), a usage event, then ``[DONE]``. ``GET /metrics`` serves a
minimal idle vLLM page so metric collectors see a healthy server.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time

from aiohttp import web

METRICS = b"""# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.0
"""


def make_app(name: str, port: int) -> web.Application:
    async def post(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        model = doc.get("model", "")
        info = {
            "served_by": name,
            "port": port,
            "path": request.path,
            "recv_bytes": len(raw),
            "recv_sha256": hashlib.sha256(raw).hexdigest(),
            "recv_content_length": request.headers.get("Content-Length"),
            "recv_transfer_encoding": request.headers.get("Transfer-Encoding"),
            "recv_destination": request.headers.get("x-gateway-destination-endpoint"),
            "recv_headers": {k.lower(): v for k, v in request.headers.items() if k.lower().startswith(("x-", "test-"))},
        }
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if doc.get("stream") is True:
            n = int(doc.get("max_tokens", 5))
            delay = float(doc.get("delay", 0.0))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-served-by": name,
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            for i in range(n):
                event = {"id": "cmpl-1", "object": "text_completion", "model": model, "served_by": name,
                         "sent_at": time.time(), "choices": [{"index": 0, "text": f"tok{i} ", "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if delay:
                    await asyncio.sleep(delay)
            final = {"id": "cmpl-1", "object": "text_completion", "model": model, "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            return resp
        body = {"id": "cmpl-1", "object": "text_completion", "model": model,
                "choices": [{"index": 0, "text": "hello", "finish_reason": "stop"}], "usage": usage, **info}
        return web.json_response(body, headers={"x-served-by": name})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=METRICS, content_type="text/plain")

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}], "served_by": name},
                                 headers={"x-served-by": name})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/{tail:.*}", post)
    return app


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ports", required=True)
    ap.add_argument("--names", default="")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    names = args.names.split(",") if args.names else [f"be{i + 1}" for i in range(len(ports))]
    runners = []
    for port, name in zip(ports, names):
        runner = web.AppRunner(make_app(name, port), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, port).start()
        runners.append(runner)
    print(f"backend ready ports={args.ports}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for r in runners:
            await r.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
