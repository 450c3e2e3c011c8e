"""Package-mode stand-in for the `attention` kernel module shipped with converted models.

Inside the package this re-exports `hybrid_megatron.kernels.attention`. `save_pretrained` writes
the real kernel file (torch-only) under this name next to the weights, so the modeling file's
`from .attention import ...` works both here and flat in a model directory (remote code).
"""

from hybrid_megatron.kernels.attention import *  # noqa: F403
from hybrid_megatron.kernels.attention import __all__  # noqa: F401
