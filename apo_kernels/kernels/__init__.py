"""Triton kernels of the fused path: LM-head log-probs and entropies, and the APO epilogue.

``linear_logprobs`` and ``apo_epilogue`` have exactly the contracts of
``apo_kernels.torch_backend.linear_logprobs`` and ``apo_kernels.objective.torch_epilogue``. See README.md
for the design.
"""

from .apo_epilogue import apo_epilogue
from .linear_function import linear_logprobs
from .tuning import DEFAULT_TILES, TileConfig

__all__ = ["apo_epilogue", "linear_logprobs", "TileConfig", "DEFAULT_TILES"]
