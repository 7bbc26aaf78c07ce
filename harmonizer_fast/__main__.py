"""``python -m harmonizer_fast``: print the version and which backends run on this machine."""

import torch

from . import __version__, format_backend_info

print(f"harmonizer_fast {__version__} (torch {torch.__version__})")
print(format_backend_info())
