"""``destination-endpoint-served-verifier``: tells the client which endpoint really served it.

Upstream's conformance test plugin (the Gateway API Inference Extension conformance test
``GatewayDestinationEndpointServed``). A proxy that knows where it sent the request reports it
on the response path as dynamic metadata ``envoy.lb`` / ``x-gateway-destination-endpoint-served``
(GKE's gateway does; stock Envoy does not). This plugin copies it into the response header
``x-conformance-test-served-endpoint``, or writes why it could not, in upstream's words, so the
test fails with a reason instead of a missing header.
"""

from __future__ import annotations

from epp.extproc.messages import LB_NAMESPACE
from epp.framework import Plugin, ResponseReceived, register
from epp.framework.types import InferenceRequest, InferenceResponse

SERVED_KEY = "x-gateway-destination-endpoint-served"
RESULT_HEADER = "x-conformance-test-served-endpoint"
MISSING_NAMESPACE = "fail: missing envoy lb metadata"
MISSING_KEY = "fail: missing destination endpoint served metadata"


@register("destination-endpoint-served-verifier")
class DestinationEndpointServedVerifier(Plugin, ResponseReceived):
    def response_received(self, request: InferenceRequest, response: InferenceResponse, target: str) -> None:
        lb = (response.metadata or {}).get(LB_NAMESPACE)
        if not isinstance(lb, dict):
            value = MISSING_NAMESPACE
        else:
            served = lb.get(SERVED_KEY)
            value = served if isinstance(served, str) and served else MISSING_KEY
        response.added_headers[RESULT_HEADER] = value
