"""Built-in scorers, one module per family (importing registers them)."""

from plugins.scheduling.scorers import backlog, lora, load, metric, prefix, session  # noqa: F401
