"""Built-in request-control plugins: parser, data producers, saturation detectors.

Importing this package registers them (``@register`` runs at import).
"""

from plugins.requestcontrol import (  # noqa: F401  (registration side effects)
    inflight,
    openai_parser,
    prefix_producer,
    saturation,
)
