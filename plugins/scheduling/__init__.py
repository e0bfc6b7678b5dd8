"""Built-in scheduling plugins: filters, scorers, pickers, profile handlers.

Importing this package registers them (``@register`` runs at import).
"""

from plugins.scheduling import filters, pickers, profiles, scorers  # noqa: F401  (registration side effects)
