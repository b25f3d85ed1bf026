"""apo_kernels: the APO (Asymmetric Policy Optimization) loss straight from hidden states.

Public API::

    from apo_kernels import APOConfig, group_advantages, apo_loss, fused_linear_logprobs

``apo_kernels.reference`` holds the materialized-logits oracle the tests compare against.
"""

from . import reference
from .advantages import GroupAdvantages, group_advantages
from .config import AGG_MODES, KL_ESTIMATORS, APOConfig
from .logprobs import fused_linear_logprobs
from .loss import apo_loss
from .objective import APOOutput, apo_objective

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "APOConfig",
    "APOOutput",
    "GroupAdvantages",
    "apo_loss",
    "apo_objective",
    "fused_linear_logprobs",
    "group_advantages",
    "reference",
]

__version__ = "0.1.0"
