"""Built-in data-layer plugins: sources, extractors, discovery. Importing registers them."""

from plugins.datalayer import (  # noqa: F401  (registration side effects)
    core_metrics,
    file_source,
    models,
    prometheus_metric,
    prometheus_source,
    static_discovery,
)
