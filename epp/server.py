"""Process assembly for ``epp serve``: pool, discovery, config, plugins, collector, servers.

``run(options)`` is what the CLI calls; it returns the exit code (2 for a configuration the
EPP cannot use, 1 for a port it cannot bind). ``EppServer`` is the same thing as an object
for tests and embedders: ``await start()``, read the bound ports, ``await stop()``.

Shutdown (SIGINT/SIGTERM) stops, in order: the gRPC servers (in-flight streams get a short
grace period), the metrics server, the config watcher, the collector, discovery, and the
plugins. With Kubernetes discovery it first drains, as upstream: readiness NOT_SERVING, the
leader Lease released, ext_proc served for ``--drain-timeout`` (a second signal ends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from epp.config.errors import ConfigError
from epp.config.model import LoadedConfig
from epp.datalayer.pool import EndpointPool
from epp.extproc.grpcserver import GrpcServers, PortInUseError, start_grpc_servers
from epp.extproc.h2.limits import Limits as H2Limits
from epp.extproc.health import HealthService
from epp.extproc.service import ExtProcService
from epp.extproc.stream import StreamSettings
from epp.framework.handle import PluginHandle, logging_warn
from epp.framework.plugin import RuntimeSettings
from epp.observability import deferred
from epp.observability import metrics as m
from epp.observability.httpserver import DebugState, start_http_server
from epp.observability.pool_gauges import PoolGauges
from epp.options import ServeOptions
from epp.requestcontrol.director import Director, DirectorOptions

log = logging.getLogger("epp.server")

EXIT_CONFIG = 2
EXIT_STARTUP = 1


async def _start_plugins(config: LoadedConfig, pool: EndpointPool, settings: RuntimeSettings) -> None:
    handle = PluginHandle(config.plugins, pool=pool, settings=settings, warn=logging_warn)
    for plugin in config.plugins.values():
        await plugin.start(handle)


async def _close_plugins(config: LoadedConfig) -> None:
    for plugin in config.plugins.values():
        try:
            await plugin.close()
        except Exception:
            log.exception("closing plugin %s failed", plugin.name)


def _make_discovery(options: ServeOptions, config: LoadedConfig) -> Any:
    """The one discovery source: the config's discovery plugin, Kubernetes (--pool-name /
    --endpoint-selector), or static (--endpoint / --endpoints-file); None if there is none."""
    flags = [f for f, given in (("--pool-name", options.pool_name), ("--endpoint-selector", options.endpoint_selector),
                                ("--endpoint", options.endpoints), ("--endpoints-file", options.endpoints_file))
             if given]
    if config.discovery is not None:
        if flags:
            raise ConfigError([f"discovery: the config's discovery plugin {config.discovery.name!r} and {flags[0]} "
                               "are two discovery sources; use one"])
        return config.discovery
    if options.kubernetes_discovery:
        return _make_kubernetes_discovery(options)
    if not options.endpoints and not options.endpoints_file:
        return None
    from epp.discovery.static import StaticDiscovery

    return StaticDiscovery.from_options(options.endpoints, options.endpoints_file)


def _make_kube_client(options: ServeOptions) -> Any:
    from epp.discovery.kubeclient import KubeClient, KubeConfigError

    try:
        return KubeClient.from_options(options.kubeconfig)
    except KubeConfigError as e:
        raise ConfigError([f"Kubernetes discovery: {e}"]) from None


def _make_kubernetes_discovery(options: ServeOptions) -> Any:
    from epp.discovery.kubernetes import KubernetesDiscovery

    return KubernetesDiscovery(_make_kube_client(options), options.pool_namespace, pool_name=options.pool_name,
                               pool_group=options.pool_group, endpoint_selector=options.endpoint_selector,
                               target_ports=tuple(options.endpoint_target_ports))


def _make_collector(options: ServeOptions, pool: EndpointPool, config: LoadedConfig) -> Any:
    if not config.sources:
        return None
    from epp.datalayer.process import make_collector

    # --collector-mode: "process" (the data layer's default: scraping off the serving loop)
    # or "inprocess".
    mode = options.collector_mode or "process"
    return make_collector(mode, pool, config.sources, interval=options.refresh_metrics_interval)


def _log_discovery_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("endpoint discovery stopped: %s; the pool keeps its last state", task.exception())


class EppServer:
    def __init__(self, options: ServeOptions, *, config: LoadedConfig | None = None,
                 pool: EndpointPool | None = None) -> None:
        """``config``/``pool`` let embedders and tests supply a prebuilt configuration and pool
        (the options' config file/text are then not read)."""
        self.options = options
        self._prebuilt = config
        self.settings = options.runtime_settings()
        self.pool = pool if pool is not None else EndpointPool(options.pool_name, options.pool_namespace)
        self.config: LoadedConfig | None = None
        self.director: Director | None = None
        self.grpc: GrpcServers | None = None
        self.grpc_port = self.health_port = self.metrics_port = 0
        self._collector: Any = None
        self._discovery: Any = None
        self.health: HealthService | None = None
        self._elector: Any = None
        self._elector_task: asyncio.Task | None = None
        self._crds: Any = None
        self._tasks: list[asyncio.Task] = []
        self._http: Any = None
        self._reload_lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        opts = self.options
        # ConfigError propagates: nothing is started yet.
        config = self._prebuilt if self._prebuilt is not None else opts.load_config(self.pool)
        for w in config.warnings:
            log.warning("config: %s", w)
        self.config = config
        await _start_plugins(config, self.pool, self.settings)

        self._discovery = _make_discovery(opts, config)
        if self._discovery is not None and hasattr(self._discovery, "ready"):
            # Kubernetes: the API server may be slow or away; health says when the pool is known.
            self._start_background_discovery(self._discovery)
        elif self._discovery is not None:
            await self._start_discovery(self._discovery)
        else:
            log.warning("no endpoint discovery configured (--endpoint / --endpoints-file): every request gets 503")
            self.pool.sync([])
        self._collector = _make_collector(opts, self.pool, config)
        if self._collector is not None:
            await self._collector.start()

        self.director = Director(config, self.pool, DirectorOptions(
            disable_subset_filter=opts.disable_endpoint_subset_filter,
            enable_debug_headers=opts.enable_debug_headers,
            response_body_policy=opts.response_body_policy,
            pool_name=opts.pool_name,
            destination_fallbacks=opts.destination_fallbacks,
            decision_log_size=opts.decision_log_size,
        ))
        self._start_crd_sync()
        stream_settings = StreamSettings(max_body_bytes=opts.max_request_body_bytes,
                                         request_timeout=opts.request_timeout or 1e9)
        service = ExtProcService(self.director, stream_settings)
        self._elector = self._make_elector()
        self.health = health = HealthService(
            self.ready, leader_election=self._elector is not None,
            is_leader=(lambda: self._elector.is_leader) if self._elector is not None else None)
        self.grpc = await start_grpc_servers(service, health, host=opts.bind_address, port=opts.grpc_port,
                                             health_port=opts.grpc_health_port, secure=opts.secure_serving,
                                             cert_path=opts.cert_path, max_body_bytes=opts.max_request_body_bytes,
                                             core=opts.extproc_core,  # None: $EPP_EXTPROC_CORE or fast
                                             limits=H2Limits(max_concurrent_streams=opts.extproc_max_concurrent_streams,
                                                             max_connections=opts.extproc_max_connections,
                                                             idle_timeout=opts.extproc_idle_timeout))
        self.grpc_port, self.health_port = self.grpc.extproc_port, self.grpc.health_port or 0

        director = self.director
        state = DebugState(self.pool, lambda: director.decisions, lambda: director.in_flight,
                           plugins=lambda: list(director.config.plugins.values()), flow=director.flow_snapshot,
                           discovery=self.discovery_status)
        self._http, self.metrics_port = await start_http_server(state, opts.bind_address, opts.metrics_port)
        gauges = PoolGauges(self.pool, opts.pool_name, opts.metrics_staleness_threshold)
        self._tasks.append(asyncio.create_task(gauges.run(opts.refresh_prometheus_metrics_interval), name="gauges"))
        self._tasks.append(asyncio.create_task(deferred.run_flusher(0.1), name="histogram-flush"))
        if opts.config_reload and opts.config_file:
            self._tasks.append(asyncio.create_task(self._watch_config(opts.config_file), name="config-watch"))
        m.INFO.labels(os.environ.get("EPP_COMMIT", "dev"), os.environ.get("EPP_BUILD_REF", "dev")).set(1)
        log.info("epp ready grpc_port=%d health_port=%d metrics_port=%d secure=%s core=%s",
                 self.grpc_port, self.health_port, self.metrics_port, opts.secure_serving, self.grpc.core)

    async def stop(self) -> None:
        await self._stop_election()
        if self.director is not None:
            self.director.close()  # queued requests are answered 503 rejected-shutting-down
        if self.grpc is not None:
            await self.grpc.stop(grace=1.0)
        if self._http is not None:
            await self._http.cleanup()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._collector is not None:
            with contextlib.suppress(Exception):
                await self._collector.stop()
        client = getattr(self._discovery, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if self.config is not None:
            await _close_plugins(self.config)

    def ready(self) -> bool:
        """The pool is known: synced (static) or the InferencePool and its pods listed (Kubernetes)."""
        ready = getattr(self._discovery, "ready", None)
        return ready() if ready is not None else self.pool.synced

    def discovery_status(self) -> dict[str, Any]:
        status = getattr(self._discovery, "status", None)
        out = status() if status is not None else {
            "source": "static" if self._discovery is not None else "none", "ready": self.pool.synced}
        if self._elector is not None:
            out["leader_election"] = self._elector.status()
        if self._crds is not None:
            out["crds"] = self._crds.status()
        if self.health is not None and self.health.draining:
            out["draining"] = True
        return out

    def _start_crd_sync(self) -> None:
        """Pool mode: InferenceObjective / InferenceModelRewrite objects feed the Director."""
        from epp.discovery.kubernetes import KubernetesDiscovery

        disc = self._discovery
        if not isinstance(disc, KubernetesDiscovery) or disc.standalone or self.director is None:
            return
        from epp.discovery.crds import CrdSync

        self._crds = CrdSync(disc.client, disc.namespace, disc.pool_name, disc.pool_group,
                             apply=self.director.set_cluster_objects)
        self._crds.pool_changed(disc.pool_spec)
        disc.listeners.append(self._crds.pool_changed)
        self._tasks.append(asyncio.create_task(self._crds.run(), name="kubernetes-crds"))

    def _make_elector(self) -> Any:
        opts = self.options
        if not opts.ha_enable_leader_election:
            return None
        from epp.discovery.leader import LeaderElector, deployment_name, lease_name

        name = opts.pool_name
        if not name:  # standalone: upstream names the Lease after the EPP's Deployment ($POD_NAME)
            try:
                name = deployment_name(os.environ.get("POD_NAME", ""))
            except ValueError as e:
                raise ConfigError([f"--ha-enable-leader-election with --endpoint-selector needs $POD_NAME: {e}"]) from None
        client = getattr(self._discovery, "client", None) or _make_kube_client(opts)
        elector = LeaderElector(client, opts.pool_namespace, lease_name(opts.pool_namespace, name),
                                lease_duration=opts.lease_duration, renew_deadline=opts.renew_deadline,
                                retry_period=opts.retry_period)
        self._elector_task = asyncio.create_task(elector.run(), name="leader-election")
        return elector

    @property
    def drains(self) -> bool:
        """Whether SIGTERM starts a drain (Kubernetes discovery: the Gateway needs time to move)."""
        return self.options.kubernetes_discovery and self.options.drain_timeout > 0

    async def begin_drain(self) -> None:
        """SIGTERM: readiness NOT_SERVING and the Lease released now; ext_proc keeps serving."""
        if self.health is not None:
            self.health.draining = True
        await self._stop_election()

    async def _stop_election(self) -> None:
        task, self._elector_task = self._elector_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._elector is not None:
            await self._elector.release()

    def _start_background_discovery(self, discovery: Any) -> None:
        task = asyncio.create_task(discovery.run(self.pool), name="discovery")
        task.add_done_callback(_log_discovery_end)
        self._tasks.append(task)

    async def _start_discovery(self, discovery: Any, first_sync_timeout: float = 10.0) -> None:
        """Run discovery in the background; a failing first load (e.g. a bad endpoints file)
        is a startup error, later failures keep the pool as it was."""
        task = asyncio.create_task(discovery.run(self.pool), name="discovery")
        self._tasks.append(task)
        loop = asyncio.get_running_loop()
        end = loop.time() + first_sync_timeout
        while not self.pool.synced and not task.done() and loop.time() < end:
            await asyncio.sleep(0.01)
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise ConfigError([f"endpoint discovery: {task.exception()}"])
        task.add_done_callback(_log_discovery_end)


    # --- config reload ---------------------------------------------------------------------
    async def _watch_config(self, path: str, interval: float = 1.0) -> None:
        def stamp() -> tuple[int, int] | None:
            try:
                st = os.stat(path)
                return (st.st_mtime_ns, st.st_size)
            except OSError:
                return None

        last = stamp()
        while True:
            await asyncio.sleep(interval)
            current = stamp()
            if current is None or current == last:
                continue
            last = current
            await self.reload_config()

    async def reload_config(self) -> bool:
        """Load the config file again; on success swap it in, else keep the running one."""
        async with self._reload_lock:
            try:
                new = self.options.load_config(self.pool)
                await _start_plugins(new, self.pool, self.settings)
            except ConfigError as e:
                m.CONFIG_RELOADS.labels("failure").inc()
                log.error("config reload rejected, keeping the running configuration:\n%s", e)
                return False
            except Exception:
                m.CONFIG_RELOADS.labels("failure").inc()
                log.exception("config reload failed, keeping the running configuration")
                return False
            old = self.config
            assert self.director is not None
            self.director.swap_config(new)
            self.config = new
            if self._collector is not None:
                await self._collector.stop()
            self._collector = _make_collector(self.options, self.pool, new)
            if self._collector is not None:
                await self._collector.start()
            m.CONFIG_RELOADS.labels("success").inc()
            log.info("configuration reloaded (%d plugins)", len(new.plugins))
        if old is not None:
            asyncio.get_running_loop().call_later(30.0, lambda: asyncio.ensure_future(_close_plugins(old)))
        return True


async def serve(options: ServeOptions) -> None:
    """Run until SIGINT/SIGTERM. Raises ConfigError / PortInUseError on startup failures."""
    server = EppServer(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        # Everything alive now (config, plugins, servers) moves out of the collector's way and
        # young collections run every few dozen requests instead of several times per request.
        from epp.scheduling.gctuning import tune_gc_for_serving

        tune_gc_for_serving()
        await stop.wait()
        if server.drains:
            log.info("draining: readiness NOT_SERVING, lease released, ext_proc served for %gs more "
                     "(a second signal stops at once)", options.drain_timeout)
            stop.clear()
            await server.begin_drain()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), options.drain_timeout)
        log.info("shutting down")
    finally:
        await server.stop()


def run(options: ServeOptions) -> int:
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(options))
        else:
            asyncio.run(serve(options))
    except ConfigError as e:
        print("epp: invalid configuration:", file=sys.stderr)
        for line in str(e).splitlines():
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    except PortInUseError as e:
        print(f"epp: {e}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        pass
    return 0
