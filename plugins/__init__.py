"""Built-in plugins, one package per family. Importing this registers them all."""

from plugins import datalayer, flowcontrol, requestcontrol, scheduling  # noqa: F401  (registration side effects)
