"""Where TensorForge keeps its state and models: system paths for root services, the
user's data directory otherwise, both overridable by environment or desired state."""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_STATE_DIR = Path("/var/lib/tensorforge")


def _user_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tensorforge"


def state_dir(declared: str | None = None) -> Path:
    """TF_STATE_DIR, else the desired state's state_dir, else a per-uid default."""
    if env := os.environ.get("TF_STATE_DIR"):
        return Path(env)
    if declared:
        return Path(declared)
    return SYSTEM_STATE_DIR if os.geteuid() == 0 else _user_data_dir()


def models_dir(declared: str | None = None, declared_state: str | None = None) -> Path:
    """TF_MODELS, else the desired state's models_dir, else <state dir>/models/gguf, where the
    state dir is TF_STATE_DIR, the desired state's state_dir, or the default: two instances
    with separate state dirs never share (and delete) each other's model files."""
    if env := os.environ.get("TF_MODELS"):
        return Path(env)
    if declared:
        return Path(declared)
    return state_dir(declared_state) / "models" / "gguf"
