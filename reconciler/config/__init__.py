from reconciler.config.loader import EMBEDDED_DEFAULT, ConfigError, load_desired_state
from reconciler.config.schema import BackendSpec, DesiredState, ModelSpec

__all__ = [
    "EMBEDDED_DEFAULT",
    "BackendSpec",
    "ConfigError",
    "DesiredState",
    "ModelSpec",
    "load_desired_state",
]
