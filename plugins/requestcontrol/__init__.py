"""Built-in request-control plugins: parser, data producers, saturation detectors, the
conformance served-endpoint verifier, the unreachable-endpoint detector.

Importing this package registers them (``@register`` runs at import).
"""

from plugins.requestcontrol import (  # noqa: F401  (registration side effects)
    inflight,
    openai_parser,
    precise_prefix,
    prefix_producer,
    saturation,
    served_verifier,
    tokens,
    unreachable_detector,
)
