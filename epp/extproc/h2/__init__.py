"""HTTP/2 (RFC 9113) for the ext_proc port: framing, stream states, flow control and limits.

``H2Connection`` is an asyncio Protocol; the gRPC layer (``epp.extproc.fastserver``)
subclasses it and ``H2Stream``. See README.md for the limits and what each error gets.
"""

from epp.extproc.h2.connection import H2Connection
from epp.extproc.h2.limits import Limits
from epp.extproc.h2.stream import H2Stream

__all__ = ["H2Connection", "H2Stream", "Limits"]
