"""Request control: the Director (per-request pipeline) and the request lifecycle."""

from epp.requestcontrol.director import Director, DirectorOptions, RequestContext
from epp.requestcontrol.errors import RequestError

__all__ = ["Director", "DirectorOptions", "RequestContext", "RequestError"]
