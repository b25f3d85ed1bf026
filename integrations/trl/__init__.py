"""APO for TRL: swap ``GRPOTrainer``/``GRPOConfig`` for :class:`APOTrainer`/:class:`APOGRPOConfig`.

See ``integrations/trl/README.md`` for usage.
"""

try:
    import trl  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("apo_kernels.integrations.trl needs TRL: pip install 'apo-kernels[trl]'") from error

from .config import LOSS_TYPE_AGG_MODES, APOGRPOConfig
from .lm_head import APOLossInputs, APOModelOutput, add_apo_head
from .trainer import APOTrainer

__all__ = ["APOGRPOConfig", "APOLossInputs", "APOModelOutput", "APOTrainer", "LOSS_TYPE_AGG_MODES", "add_apo_head"]
