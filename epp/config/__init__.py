"""The EndpointPickerConfig: schema, loader, system defaults, validation, effective config.

    from epp.config import load_config, ConfigError
    loaded = load_config(path="epp.yaml")       # or text=..., or nothing = built-in default
"""

from epp.config.errors import ConfigError
from epp.config.loader import DEFAULT_CONFIG_TEXT, load_config
from epp.config.model import InferenceObjective, LoadedConfig, ModelRewrite, ModelRewriteTarget, SourceWiring
from epp.config.render import effective_parameters, render

__all__ = [
    "DEFAULT_CONFIG_TEXT", "ConfigError", "InferenceObjective", "LoadedConfig", "ModelRewrite",
    "ModelRewriteTarget", "SourceWiring", "effective_parameters", "load_config", "render",
]
