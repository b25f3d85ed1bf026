"""Triton kernels: the driver's row pass (``logprob_fold``, ``logit_grad``) and the APO epilogue.

``TritonRowPass`` has the contract of ``apo_kernels.torch_backend.TorchRowPass`` and ``apo_epilogue`` that
of ``apo_kernels.objective.torch_epilogue``. The matmuls are not here: ``apo_kernels.driver`` leaves them
to cuBLAS. See README.md for the design and its roofline.
"""

from .apo_epilogue import apo_epilogue, apo_epilogue_grads
from .row_params import DEFAULT_ROW_PARAMS, RowKernelParams
from .row_pass import ROW_PASS, TritonRowPass

__all__ = ["apo_epilogue", "apo_epilogue_grads", "DEFAULT_ROW_PARAMS", "ROW_PASS", "RowKernelParams", "TritonRowPass"]
