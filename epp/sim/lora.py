"""LoRA adapters: which exist (the registry) and which sit in GPU slots.

Design (mirrors vLLM with ``--enable-lora`` and runtime LoRA updating):

- *Registered* adapters are the ones the server knows: ``--lora-adapters`` at
  start, plus ``/v1/load_lora_adapter`` at run time. They are listed by
  ``/v1/models`` and a request may name one as its ``model``.
- *Resident* adapters occupy one of ``max_loras`` GPU slots. Registering does
  not make an adapter resident; the first step that runs a request for it
  does, and that step pays ``lora_load_s`` (the whole batch stalls, as a real
  adapter load does). Idle residents are evicted LRU when a slot is needed.
- A batch may mix at most ``max_loras`` distinct adapters. A waiting request
  for another adapter is skipped (not blocking the FIFO queue) until a slot's
  adapter has no running requests.
"""

from __future__ import annotations

from collections import OrderedDict


class LoraSlots:
    __slots__ = ("max_loras", "registered", "ids", "_next_id", "resident", "running", "loads")

    def __init__(self, max_loras: int, adapters: tuple[str, ...] = ()) -> None:
        self.max_loras = max_loras
        # name -> path (the path is only echoed back by /v1/models)
        self.registered: dict[str, str] = {}
        # name -> vLLM's lora_int_id: 1, 2, ... in registration order, never reused.
        self.ids: dict[str, int] = {}
        self._next_id = 1
        for name in adapters:
            self.register(name, f"/adapters/{name}")
        self.resident: OrderedDict[str, None] = OrderedDict()
        # adapter -> number of running requests using it
        self.running: dict[str, int] = {}
        self.loads = 0

    def can_run(self, name: str) -> bool:
        """Would admitting one more request for ``name`` keep the batch within max_loras?"""
        return name in self.running or len(self.running) < self.max_loras

    def acquire(self, name: str) -> bool:
        """A request for ``name`` joins the batch; True if the adapter had to be loaded."""
        count = self.running.get(name, 0)
        self.running[name] = count + 1
        resident = self.resident
        if name in resident:
            resident.move_to_end(name)
            return False
        if len(resident) >= self.max_loras:
            # can_run() guarantees fewer than max_loras adapters are running,
            # so at least one resident adapter is idle.
            for victim in resident:
                if victim not in self.running:
                    del resident[victim]
                    break
        resident[name] = None
        self.loads += 1
        return True

    def release(self, name: str) -> None:
        count = self.running[name] - 1
        if count:
            self.running[name] = count
        else:
            del self.running[name]

    def register(self, name: str, path: str) -> bool:
        """False if ``name`` is already registered (vLLM answers 400 then)."""
        if name in self.registered:
            return False
        self.registered[name] = path
        self.ids[name] = self._next_id
        self._next_id += 1
        return True

    def unregister(self, name: str) -> bool:
        """False if unknown. Requests already accepted for it still finish."""
        if self.registered.pop(name, None) is None:
            return False
        del self.ids[name]
        if name not in self.running:
            self.resident.pop(name, None)
        return True
