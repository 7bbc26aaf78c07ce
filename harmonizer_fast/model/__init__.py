"""Layer 2: the Harmonizer Network (paper section 3) on the package's ops."""

from .config import HarmonizerConfig
from .net import HarmonizerNet, ModelOutput

__all__ = ["HarmonizerConfig", "HarmonizerNet", "ModelOutput"]
