"""Built-in flow-control policies (upstream type names and parameters).

Fairness: ``global-strict-fairness-policy`` (default), ``round-robin-fairness-policy``.
Ordering: ``fcfs-ordering-policy`` (default), ``edf-ordering-policy``, ``slo-deadline-ordering-policy``.
Usage limits: ``static-usage-limit-policy`` (default), ``priority-holdback-policy``.
The saturation detectors live in ``plugins/requestcontrol/saturation.py`` (admission uses them too).
"""

from plugins.flowcontrol import fairness, ordering, usage_limits  # noqa: F401  (registration side effects)
