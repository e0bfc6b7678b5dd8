"""Endpoint discovery: where the pool's endpoints come from (one module per source).

``static``: ``--endpoint`` flags and a watched ``--endpoints-file``. ``kubernetes``: an
InferencePool (or a label selector) and its pods from the Kubernetes API. ``leader``: the
Lease that elects one active replica among several.
"""
