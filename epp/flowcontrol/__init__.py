"""Flow control: queue requests while the pool is saturated, release them by priority band,
fairness between tenants and per-tenant ordering (upstream's ``flowControl`` feature gate).

Modules: ``controller`` (the FlowController), ``registry`` (bands and flows), ``queue`` (items
and heap queues), ``saturation`` (the pool's saturation and the in-flight ledger),
``outcomes`` (endings and their HTTP answers), ``settings`` (the resolved config),
``telemetry`` (metrics). Nothing is imported here, so the config layer can import
``settings`` without pulling in the request path. See README.md for the design; the policies
are plugins in ``plugins/flowcontrol/`` behind the interfaces of ``epp.framework.flowcontrol``.
"""
