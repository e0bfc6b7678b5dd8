"""``kvEventsConfig``: upstream's parameter names and defaults (llm-d ``kvevents.Config``), plus ours.

Deviation: in per-endpoint mode (``discoverPods``) the subscription filter defaults to ``""``
(everything the endpoint's own publisher sends), because vLLM's default ``topic`` is empty
and a dedicated socket needs no filter; set ``topicFilter`` to filter anyway. Central mode
(``zmqEndpoint``) keeps upstream's ``kv@`` default: there the topic is the only way to tell
publishers apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SUBSCRIBER_MODES = ("process", "inprocess")


@dataclass
class PodDiscoveryConfig:
    socketPort: int = 5557
    replaySocketPort: int | None = None  # unset: no replay (gaps are counted, not repaired)
    # Accepted for upstream configs; we subscribe to the EPP's own endpoint pool instead.
    podLabelSelector: str = ""
    podNamespace: str = ""

    def validate(self) -> None:
        for name in ("socketPort", "replaySocketPort"):
            port = getattr(self, name)
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"'{name}' must be a TCP port (1-65535), got {port}")


@dataclass
class KVEventsConfig:
    zmqEndpoint: str = ""  # central mode: bind here; engines connect (e.g. tcp://*:5557)
    topicFilter: str | None = None  # None: "kv@" in central mode, "" per endpoint (see module doc)
    concurrency: int = 4  # accepted: every publisher has its own ordered task here
    engineType: Literal["vllm"] = "vllm"
    discoverPods: bool = True  # per-endpoint mode: dial tcp://<endpoint address>:<socketPort>
    podDiscoveryConfig: PodDiscoveryConfig = field(default_factory=PodDiscoveryConfig)
    tracing: bool = False  # accepted; no tracing here
    # Ours:
    hwm: int = 100_000  # ZMQ receive high-water mark per socket (messages); past it ZMQ drops
    subscriberMode: Literal["process", "inprocess"] = "process"  # where sockets and decoding run

    def validate(self) -> None:
        if self.concurrency <= 0:
            raise ValueError("'concurrency' must be > 0")
        if self.hwm <= 0:
            raise ValueError("'hwm' must be > 0")
        if self.zmqEndpoint and not self.zmqEndpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"'zmqEndpoint' must be a ZMQ address like tcp://*:5557, got {self.zmqEndpoint!r}")

    def endpoint_filter(self) -> str:
        return "" if self.topicFilter is None else self.topicFilter

    def central_filter(self) -> str:
        return "kv@" if self.topicFilter is None else self.topicFilter
