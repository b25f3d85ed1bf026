"""What verl 0.9.1 lacks to run its FSDP actor worker on a machine without a GPU (test support only; the adapter
never imports this). ``worker_e2e.py`` applies it only when CUDA is unavailable; on a GPU node verl runs as is.

verl picks its device at import: ``verl.workers.engine.fsdp.transformer_impl`` reads the platform's device name
when it is imported, which the adapter does inside ``import verl``. So this module must be imported by verl
itself, before the adapter, with ``VERL_PLATFORM=cpu`` and ``VERL_USE_EXTERNAL_MODULES=tests.integrations.verl.
cpu_shims,apo_kernels.integrations.verl`` (``worker_e2e.CPU_ENVIRONMENT``); importing it registers
:class:`PlatformCPU`. The other shims are patches of verl's code, applied by :func:`install` once verl is imported:

- verl's Qwen2-VL attention patch (installed with ``use_remove_padding``) calls flash-attn directly and reads module
  globals set only when flash-attn imports: SDPA stand-ins for both, and no cast of float32 inputs to bfloat16;
- the forward-only FSDP2 engine (the reference) offloads with pinned memory, which needs an accelerator.

Two more need no code: ``VERL_ENGINE_DEVICE=cuda`` (verl registers its FSDP engines for cuda and npu only), and a
default process group initialized before the worker (verl's own init asks for ``cpu:gloo,cpu:gloo``, which torch
rejects); the model's attention is set to SDPA by a Hydra override (``worker_e2e.CPU_OVERRIDES``).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

PLATFORM_NAME = "cpu"


class CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` where verl expects ``torch.cuda``: memory statistics read 0, the device is named "CPU" (verl's
    FLOPs counter looks its peak up by that name), RNG state is torch's."""

    def __init__(self):
        super().__init__("cpu_device_module")

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def get_device_name(self, device=None) -> str:
        return "CPU"

    def mem_get_info(self, device=None) -> tuple[int, int]:
        return 0, 0

    def memory_allocated(self, device=None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    def empty_cache(self) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def get_rng_state(self, device=None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state, device=None) -> None:
        torch.set_rng_state(state)


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl's platform interface on the CPU: device "cpu" (``.to(get_device_id())`` must stay on the CPU), gloo."""

    device_module = CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    def nvtx_range(self, msg: str):
        return torch.autograd.profiler.record_function(msg)

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def _sdpa_packed(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=True,
    **_flash_kwargs,
):
    """flash-attn's ``flash_attn_varlen_func`` on ``(tokens, heads, dim)`` packed sequences, by SDPA per sequence."""
    outputs = []
    for start_q, end_q, start_k, end_k in zip(cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:]):
        query, key, value = (x.transpose(0, 1) for x in (q[start_q:end_q], k[start_k:end_k], v[start_k:end_k]))
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def _sdpa_batched(
    query, key, value, attention_mask, query_length, is_causal=True, dropout=0.0, softmax_scale=None, **_flash_kwargs
):
    """transformers' ``_flash_attention_forward`` on ``(batch, seq, heads, dim)`` without padding (verl removes it)."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=dropout,
        is_causal=is_causal,
        scale=softmax_scale,
    )
    return out.transpose(1, 2)


def _unpinned_cpu_offload_policy(pin_memory: bool = True):
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=False)


def install() -> None:
    """Patch verl for the CPU (after ``import verl``; this module's import registered the platform)."""
    from verl.models.transformers import qwen2_vl
    from verl.workers.engine.fsdp import transformer_impl

    qwen2_vl.flash_attn_varlen_func = _sdpa_packed
    qwen2_vl._flash_attention_forward = _sdpa_batched
    qwen2_vl._flash_supports_window_size = False
    qwen2_vl._flash_supports_deterministic = False
    qwen2_vl._flash_use_top_left_mask = False
    qwen2_vl.fa_peft_integration_check = lambda query, key, value, target_dtype=None: (query, key, value)
    transformer_impl.CPUOffloadPolicy = _unpinned_cpu_offload_policy
