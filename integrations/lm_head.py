"""One place that turns a model's LM head, however the training engine holds it, into what ``apo_loss`` needs.

Both adapters (TRL, verl) read the head's ``weight``/``bias`` directly instead of calling the head module,
so the engines' own hooks do not gather or reduce it for them:

- plain tensors (one process, DDP, an FSDP2 unit already unsharded by its forward): as they are;
- FSDP2 (``fully_shard``) sharded DTensors, e.g. an untied head that is its own unit, read outside its
  forward: gathered with ``full_tensor``, the gradient declared ``Partial("avg")`` so that it is averaged
  over the data-parallel ranks as FSDP2's own reduce-scatter does (the default, a replicated gradient,
  was never reduced: each rank kept its own batch's gradient); cast to the unit's mixed-precision
  ``param_dtype``, as its forward would (the gradient is reduced in the parameter's dtype);
- DeepSpeed ZeRO-3 partitioned parameters: gathered for the call (unless already available, as a tied
  weight is after the embedding's forward: re-partitioning it would break the embedding's bookkeeping),
  and copied, since ``apo_loss`` re-reads the weight in its backward after ZeRO-3 has re-partitioned it;
  the copy's gradient flows back to the parameter, which ZeRO-3 reduces;
- a tensor-parallel head whose vocabulary rows are split over the ranks: a ``Shard(0)`` DTensor on a 1-D
  mesh (outside FSDP2, e.g. from a transformers >= 5.18 ``tp_plan``) is passed on as is, and ``apo_loss``
  runs vocabulary-parallel on it; older transformers leave plain local blocks on the module when a
  ``tp_plan`` shards ``lm_head`` column-wise (``"colwise"``, ``"colwise_gather_output"``), so the mesh's
  group it records is handed to ``apo_loss`` as ``vocab_parallel_group``.

It also owns the one convention the frameworks and ``apo_kernels`` disagree on: TRL and verl divide the
*biased* logits by the sampling temperature, ``(h W^T + b) / tau``, while ``apo_kernels`` adds its bias after
the division, ``h W^T / tau + b``. :func:`lm_head_for_loss` therefore hands out the bias as ``b / tau``
(:func:`kernel_bias`), so that the kernels' logits are the frameworks'.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from torch.distributed.tensor import DTensor, Partial


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return None
    return FSDPModule


def is_fsdp2_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or any submodule) was sharded with FSDP2's ``fully_shard``."""
    fsdp_module = _fsdp_module_type()
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


def fsdp2_param_dtype(module: torch.nn.Module) -> Optional[torch.dtype]:
    """The mixed-precision ``param_dtype`` of ``module``'s FSDP2 unit (None: no cast, or not its own unit)."""
    fsdp_module = _fsdp_module_type()
    if fsdp_module is None or not isinstance(module, fsdp_module):
        return None
    return module._get_fsdp_state()._mp_policy.param_dtype


def _gather_fsdp2(x: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    if not isinstance(x, DTensor):
        return x
    full = x.full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)
    return full if dtype is None else full.to(dtype)


def _is_zero3_partitioned(x: Optional[torch.Tensor]) -> bool:
    return x is not None and hasattr(x, "ds_id")


def transformers_vocab_parallel_group(lm_head: torch.nn.Module):
    """The process group over which a transformers tensor-parallel plan split ``lm_head``'s vocabulary rows
    (None when no plan touched it). transformers keeps the local blocks as plain tensors, in rank order."""
    plan = getattr(lm_head, "_hf_tp_plan", None)
    if plan is None:
        return None
    mesh = lm_head._hf_device_mesh
    if not plan.startswith("colwise") or mesh.ndim != 1:
        raise ValueError(
            f"the LM head's tensor-parallel plan is {plan!r} on a {mesh.ndim}-D mesh; apo_loss supports heads split "
            "by vocabulary rows ('colwise', 'colwise_gather_output') on a 1-D mesh, or whole heads"
        )
    return mesh.get_group()


def kernel_bias(bias: Optional[torch.Tensor], temperature: float) -> Optional[torch.Tensor]:
    """The bias to hand ``apo_kernels`` for a head whose framework computes ``(h W^T + b) / temperature`` (TRL,
    verl): ``b / temperature``, since the kernels compute ``h W^T / temperature + bias``."""
    return None if bias is None else bias / temperature


@contextmanager
def lm_head_for_loss(model: torch.nn.Module, lm_head: torch.nn.Module, *, temperature: float):
    """``(weight, bias, vocab_parallel_group)`` of ``model``'s ``lm_head`` for one ``apo_loss`` /
    ``fused_linear_logprobs`` call at ``temperature`` (see the module docstring); the bias is already in the
    kernels' convention (:func:`kernel_bias`), so pass it on as is, with the same ``temperature``."""
    with _lm_head_tensors(model, lm_head) as (weight, bias, vocab_parallel_group):
        yield weight, kernel_bias(bias, temperature), vocab_parallel_group


@contextmanager
def _lm_head_tensors(model: torch.nn.Module, lm_head: torch.nn.Module):
    """``(weight, bias, vocab_parallel_group)`` of ``lm_head`` as the training engine holds it, gathered where
    sharded (the bias as the module holds it: ``lm_head_for_loss`` adjusts it for the temperature)."""
    weight, bias = lm_head.weight, lm_head.bias
    if isinstance(weight, DTensor) and is_fsdp2_sharded(model):
        dtype = fsdp2_param_dtype(lm_head)
        yield _gather_fsdp2(weight, dtype), _gather_fsdp2(bias, dtype), None
        return
    if not _is_zero3_partitioned(weight):
        yield weight, bias, transformers_vocab_parallel_group(lm_head)
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = [p for p in (weight, bias) if p is not None and p.ds_status != ZeroParamStatus.AVAILABLE]
    with deepspeed.zero.GatheredParameters(partitioned) if partitioned else nullcontext():
        yield weight.clone(), (None if bias is None else bias.clone()), None
