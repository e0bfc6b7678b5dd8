"""How the three maintained async Kubernetes clients compare on the EPP's workload.

The numbers behind the client choice in the README's dependency table. Not part of
``epp bench all``: it needs the three clients installed side by side (they are not EPP
dependencies), e.g. ``python -m venv /tmp/kc && /tmp/kc/bin/pip install kubernetes-asyncio
kr8s lightkube aiohttp pyyaml`` then ``PYTHONPATH=. /tmp/kc/bin/python -m epp.bench.kubeclients``.

Each client runs in its own process against ``epp.bench.kubeapi`` (also its own process, so
its CPU is not counted): import + client construction (time, RSS), listing 1,000 pods, and
consuming a burst of pod MODIFIED watch events, each through the client's own typed API and
through its raw HTTP layer (what an informer that keeps plain JSON uses). Then behaviour:
whether a watch can ask for bookmarks and surfaces them, and what the client does with the
410 Gone the server sends inside a 200 watch stream when the resourceVersion is too old.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLIENTS = tuple(os.environ.get("KC_CLIENTS", "kubernetes_asyncio,lightkube,kr8s").split(","))
NS = "default"
LISTS = 20
EVENTS = 4000


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _kubeconfig(url: str, path: Path) -> None:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": NS}}],
    }))


class _Churn:
    """Tells the API-server process to write pod updates ("churn RATE SECONDS" on its stdin)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def burst(self, n: int, rate: float = 4000.0) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"churn {rate} {n / rate}\n".encode())
        self.proc.stdin.flush()


async def _measure(name: str, url: str, kubeconfig: str) -> dict[str, Any]:
    out: dict[str, Any] = {"client": name}
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    c0 = time.process_time()
    api = await _Adapter.create(name, kubeconfig)
    out["import_and_config_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    out["import_cpu_ms"] = round((time.process_time() - c0) * 1e3, 1)
    out["rss_after_import_mb"] = round(_rss_mb() - rss0, 1)
    for mode in ("typed", "raw"):
        await api.list(mode)  # warm up (connection, lazy imports)
        c0 = time.process_time()
        for _ in range(LISTS):
            n, rv = await api.list(mode)
        out[f"list_1000_{mode}_cpu_ms"] = round((time.process_time() - c0) * 1e3 / LISTS, 2)
        assert n == 1000, n
        print(name, mode, "listed", file=sys.stderr, flush=True)
        out[f"watch_{mode}_cpu_us_per_event"] = round(await api.watch_burst(mode, rv) * 1e6, 1)
    out["rss_end_mb"] = round(_rss_mb() - rss0, 1)
    out.update(await api.behaviour())
    return out


class _Adapter:
    """One client behind the same four calls."""

    churn_fd: Any = None

    @staticmethod
    async def create(name: str, kubeconfig: str) -> "_Adapter":
        return await {"kubernetes_asyncio": _KA, "lightkube": _LK, "kr8s": _K8}[name].make(kubeconfig)

    async def watch_burst(self, mode: str, rv: str) -> float:
        """CPU seconds per event while consuming EVENTS events written as fast as the server can."""
        seen = 0
        c0 = 0.0
        it = self.watch(mode, rv)
        send_churn()
        async for _ in it:
            if seen == 0:
                c0 = time.process_time()
            seen += 1
            if seen == EVENTS:
                break
        return (time.process_time() - c0) / (EVENTS - 1)


def send_churn() -> None:
    sys.stdout.write(f"CHURN {EVENTS}\n")
    sys.stdout.flush()
    sys.stdin.readline()  # the parent says when the server accepted it


class _KA(_Adapter):
    @classmethod
    async def make(cls, kubeconfig: str) -> "_KA":
        from kubernetes_asyncio import client, config, watch

        self = cls()
        await config.load_kube_config(config_file=kubeconfig)
        self.api = client.ApiClient()
        self.v1 = client.CoreV1Api(self.api)
        self.watch_mod = watch
        return self

    async def list(self, mode: str) -> tuple[int, str]:
        if mode == "typed":
            pods = await self.v1.list_namespaced_pod(NS)
            return len(pods.items), pods.metadata.resource_version
        resp = await self.v1.list_namespaced_pod(NS, _preload_content=False)
        doc = json.loads(await resp.read())
        return len(doc["items"]), doc["metadata"]["resourceVersion"]

    async def watch(self, mode: str, rv: str):
        if mode == "typed":
            w = self.watch_mod.Watch()
            async for ev in w.stream(self.v1.list_namespaced_pod, NS, resource_version=rv, allow_watch_bookmarks=True):
                obj = ev["object"]  # BOOKMARK objects stay dicts
                yield ev["type"], obj["metadata"] if isinstance(obj, dict) else obj.metadata.resource_version
            return
        resp = await self.v1.list_namespaced_pod(NS, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                                 _preload_content=False)
        async for line in resp.content:
            ev = json.loads(line)
            yield ev["type"], ev["object"]["metadata"]["resourceVersion"]

    async def behaviour(self) -> dict[str, Any]:
        w = self.watch_mod.Watch()
        try:
            async for _ in w.stream(self.v1.list_namespaced_pod, NS, resource_version="1"):
                break
            gone = "no error surfaced"
        except Exception as e:  # noqa: BLE001
            gone = f"raises {type(e).__name__} {getattr(e, 'status', '')} (after one retry with the same version)"
        return {"bookmarks": "allow_watch_bookmarks=True; BOOKMARK events surfaced, version advanced",
                "gone_410": gone}


class _LK(_Adapter):
    @classmethod
    async def make(cls, kubeconfig: str) -> "_LK":
        from lightkube import AsyncClient, KubeConfig
        from lightkube.config import client_adapter
        from lightkube.config.client_adapter import ConnectionParams
        from lightkube.resources.core_v1 import Pod

        self = cls()
        cfg = KubeConfig.from_file(kubeconfig)
        self.client = AsyncClient(cfg)
        self.http = client_adapter.AsyncClient(cfg.get(), ConnectionParams())
        self.base = cfg.get().cluster.server
        self.Pod = Pod
        return self

    async def list(self, mode: str) -> tuple[int, str]:
        if mode == "typed":
            it = self.client.list(self.Pod, namespace=NS)
            items = [p async for p in it]
            return len(items), it.resourceVersion
        r = await self.http.get(f"{self.base}/api/v1/namespaces/{NS}/pods")
        doc = r.json()
        return len(doc["items"]), doc["metadata"]["resourceVersion"]

    async def watch(self, mode: str, rv: str):
        if mode == "typed":
            async for typ, obj in self.client.watch(self.Pod, namespace=NS, resource_version=rv):
                yield typ, obj.metadata.resourceVersion
            return
        params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true"}
        async with self.http.stream("GET", f"{self.base}/api/v1/namespaces/{NS}/pods", params=params,
                                    timeout=None) as r:
            async for line in r.aiter_lines():
                ev = json.loads(line)
                yield ev["type"], ev["object"]["metadata"]["resourceVersion"]

    async def behaviour(self) -> dict[str, Any]:
        try:
            async for _ in self.client.watch(self.Pod, namespace=NS, resource_version="1"):
                break
            gone = "no error surfaced"
        except Exception as e:  # noqa: BLE001
            gone = f"raises {type(e).__name__} (on_error hook may restart without a version: no relist/diff)"
        return {"bookmarks": "watch() cannot ask for them (no allowWatchBookmarks parameter); raw httpx can",
                "gone_410": gone}


class _K8(_Adapter):
    @classmethod
    async def make(cls, kubeconfig: str) -> "_K8":
        import kr8s.asyncio

        self = cls()
        self.api = await kr8s.asyncio.api(kubeconfig=kubeconfig)
        return self

    async def list(self, mode: str) -> tuple[int, str]:
        if mode == "typed":
            pods = [p async for p in self.api.async_get("pods", namespace=NS)]
            return len(pods), "1000"
        async with self.api.call_api("GET", version="v1", url="pods", namespace=NS) as r:
            doc = r.json()
        return len(doc["items"]), doc["metadata"]["resourceVersion"]

    async def watch(self, mode: str, rv: str):
        if mode == "typed":
            async for typ, obj in self.api.async_watch("pods", namespace=NS, since=rv):
                yield typ, obj.metadata.resourceVersion
            return
        async with self.api.call_api("GET", version="v1", url="pods", namespace=NS, stream=True,
                                     params={"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true"},
                                     timeout=None) as r:
            async for line in r.aiter_lines():
                ev = json.loads(line)
                yield ev["type"], ev["object"]["metadata"]["resourceVersion"]

    async def behaviour(self) -> dict[str, Any]:
        async def first() -> None:
            async for _ in self.api.async_watch("pods", namespace=NS, since="1"):
                break

        c0 = time.process_time()
        try:
            await asyncio.wait_for(first(), 3.0)
            gone = "no error surfaced"
        except asyncio.TimeoutError:
            gone = (f"loops: restarts the watch at the same expired version forever "
                    f"({time.process_time() - c0:.1f} s CPU in 3 s)")
        except Exception as e:  # noqa: BLE001
            gone = f"raises {type(e).__name__}"
        return {"bookmarks": "watch() cannot ask for them (only resourceVersion is passed)", "gone_410": gone}


def _child(name: str, url: str, kubeconfig: str) -> None:
    result = asyncio.run(_measure(name, url, kubeconfig))
    print("RESULT " + json.dumps(result), flush=True)


def run() -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CLIENTS:
            api = subprocess.Popen([sys.executable, "-m", "epp.bench.kubeapi", "--pods", "1000",
                                    "--bookmark-interval", "0.5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert api.stdout is not None
            url = api.stdout.readline().decode().split("url=")[1].split()[0]
            kc = Path(tmp) / "kubeconfig"
            _kubeconfig(url, kc)
            child = subprocess.Popen([sys.executable, "-m", "epp.bench.kubeclients", "--child", name, url, str(kc)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            churn = _Churn(api)
            assert child.stdout is not None and child.stdin is not None
            for raw in child.stdout:
                line = raw.decode()
                if line.startswith("CHURN"):
                    churn.burst(int(line.split()[1]))
                    child.stdin.write(b"go\n")
                    child.stdin.flush()
                elif line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
            child.wait(60)
            api.kill()
            api.wait()
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:5])
    else:
        for r in run():
            print(json.dumps(r, indent=1))
