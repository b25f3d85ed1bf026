"""The inputs stage: every check of every public entry, and the validated views the later stages read.

User errors raise ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device or value) naming
the argument and what was expected, so bad input never reaches a kernel; the later stages only ``assert``
their internal contracts. Within a call, type, shape and device checks of every argument come first and raise
at once. Value checks (finiteness, id ranges, 0/1 masks, positive counts) read tensor data, which on a GPU
waits for the device: they are gathered in one :class:`ValueChecks` as device booleans and read together
with one host sync, last. Under ``torch.compile`` and for ``meta`` or fake tensors they are skipped
(:func:`values_checked`), since a compiled graph cannot raise on data without breaking.

Values at masked positions are not checked, and they are made harmless, not only unchecked: per-token and
per-sequence factors (advantages, KL weights) are zeroed there, so a NaN in padding never meets the zero
weight that would multiply it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor

from .config import APOConfig
from .devices import is_cuda
from .vocab_parallel import VocabShard

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
#: Token ids: ``gather`` takes int64 (int32 is widened); narrower ids could not address a vocabulary anyway.
TARGET_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool,) + INT_DTYPES + FLOAT_DTYPES
BACKENDS = ("auto", "torch", "triton")
SWEEPS = ("auto", "one-pass", "two-pass")
# Looked up once here: inside the traced call, find_spec breaks torch.compile's graph (torch 2.11).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

Number = Union[int, float, torch.Tensor]


# ---------------------------------------------------------------------------------------------- primitives


def values_checked(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the host may read values: not while ``torch.compile`` traces, and not for ``meta`` or fake
    tensors (the CPU dry run of the CUDA path, ``benchmarks/dry_run.py``), which hold no data. Where it is
    False, value checks are skipped and shapes may not depend on data (every row is swept)."""
    if torch.compiler.is_compiling():
        return False
    return not any(t is not None and (t.is_meta or isinstance(t, FakeTensor)) for t in tensors)


def tensor(name: str, x, *, dtypes: Sequence[torch.dtype], kind: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor with {kind} dtype, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have {kind} dtype (one of {', '.join(map(str, dtypes))}), got {x.dtype}")
    return x


def float_tensor(name: str, x) -> torch.Tensor:
    return tensor(name, x, dtypes=FLOAT_DTYPES, kind="a floating-point")


def shape(name: str, x: torch.Tensor, expected: Sequence[int], described: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {described} = {tuple(expected)}, got {tuple(x.shape)}")


def same_device(name: str, x: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}; move them to one device")


def choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


#: Elements per pass of a value check: bounds its temporaries (``isfinite`` makes an ``abs`` copy and a few
#: bool masks) to ~20 MiB, so checking a 151936 x 2048 LM head costs one read of it, not 1.5 GB.
CHECK_CHUNK = 1 << 22


def _all_rows(pred, x: torch.Tensor, where: Optional[torch.Tensor]) -> torch.Tensor:
    """``pred(x, where).all()`` evaluated over slabs of leading rows, as a 0-dim bool tensor on ``x``'s device."""
    if x.dim() == 0:
        x, where = x.reshape(1), None if where is None else where.reshape(1)
    rows = max(1, CHECK_CHUNK // max(1, x[0].numel()))
    flags = [
        pred(x[i : i + rows], None if where is None else where[i : i + rows]).all() for i in range(0, x.shape[0], rows)
    ]
    return torch.stack(flags).all()


def _scope(where: Optional[torch.Tensor]) -> str:
    return " at unmasked positions" if where is not None else ""


class ValueChecks:
    """The value checks of one call: each adds a device boolean (no sync); :meth:`verify` reads them all with
    one host sync (per device) and raises the first failing check's ``ValueError``, reading the offending
    value for its message only then."""

    def __init__(self):
        self._pending: list[tuple[torch.Tensor, Callable[[], str]]] = []  # (ok, message if not ok)

    def finite(self, name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
        """``x`` (restricted to ``where`` when given) holds no NaN or infinity."""
        if not values_checked(x) or x.numel() == 0:
            return
        ok = _all_rows(lambda c, w: torch.isfinite(c) if w is None else torch.isfinite(c) | ~w, x, where)
        self._pending.append((ok, lambda: f"{name} contains NaN or infinite values{_scope(where)}"))

    def in_range(
        self,
        name: str,
        x: torch.Tensor,
        low: float,
        high: float,
        where: Optional[torch.Tensor] = None,
        described: str = "",
    ) -> None:
        """``low <= x < high`` (restricted to ``where`` when given)."""
        if not values_checked(x) or x.numel() == 0:
            return

        def inside(c, w):
            within = (c >= low) & (c < high)
            return within if w is None else within | ~w

        def message() -> str:
            outside = (x < low) | (x >= high)
            bad = x[outside if where is None else outside & where][0].item()
            return f"{name} must lie in [{low}, {high}){_scope(where)}{described}; found {bad}"

        self._pending.append((_all_rows(inside, x, where), message))

    def zero_or_one(self, name: str, x: torch.Tensor) -> None:
        """A bool, or a number tensor holding only 0 and 1."""
        if x.dtype == torch.bool or not values_checked(x) or x.numel() == 0:
            return
        self._pending.append((((x == 0) | (x == 1)).all(), lambda: f"{name} must hold only 0/1 (or False/True) values"))

    def positive(self, name: str, x: torch.Tensor) -> None:
        """Every element of ``x`` (a count: one element) is finite and > 0."""
        if not values_checked(x) or x.numel() == 0:
            return
        self._pending.append(
            (((x > 0) & torch.isfinite(x)).all(), lambda: f"{name} must be a finite number > 0, got {x.item()}")
        )

    def verify(self) -> None:
        """Read every pending check (one host sync per device they live on), then raise the first failure."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for ok, _ in self._pending:
            by_device.setdefault(ok.device, []).append(ok)
        if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
            return
        for ok, message in self._pending:
            if not bool(ok):
                raise ValueError(message())


def compute_dtype(hidden: torch.dtype, weight: torch.dtype, bias: Optional[torch.dtype] = None) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation dtype of every backend, from the input
    dtypes (they set the precision, never ``torch.autocast``)."""
    return torch.float64 if torch.float64 in (hidden, weight, bias) else torch.float32


def operand_dtype(hidden: torch.dtype, weight: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """The dtype of the matmul operands (and of ``dz``): the shared 16-bit dtype of ``hidden`` and
    ``weight`` (tensor cores, float32 accumulation), else the compute dtype (mixed inputs are upcast)."""
    return hidden if hidden == weight and hidden in (torch.float16, torch.bfloat16) else acc


def dtype_of(x: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    return None if x is None else x.dtype


# ---------------------------------------------------------------------------------------------- options


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    return float(temperature)


def check_workspace_bytes(workspace_bytes) -> Optional[int]:
    if workspace_bytes is None:
        return None
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int):
        raise TypeError(f"workspace_bytes must be an int (bytes) or None, got {type(workspace_bytes).__name__}")
    if workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be > 0, got {workspace_bytes}")
    return workspace_bytes


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(backend, device: torch.device) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) that ``backend`` means for tensors on ``device``."""
    choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if is_cuda(device) and TRITON_INSTALLED else "torch"
    if backend == "triton":
        if not TRITON_INSTALLED:
            raise ValueError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
        if not is_cuda(device) and not triton_interpreted():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels in the interpreter, or use backend='torch'"
            )
    return backend


def check_group(name: str, group) -> None:
    if group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{name} is set but torch.distributed is not initialized")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


# ---------------------------------------------------------------------------------------------- the head


def _local_bias(bias: Optional[torch.Tensor], weight) -> Optional[torch.Tensor]:
    """The local tensor of a DTensor ``bias`` laid out as the DTensor ``weight`` (same mesh, same placements)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(bias, DTensor):
        return bias
    if bias.device_mesh != weight.device_mesh or bias.placements != weight.placements:
        raise ValueError(
            f"bias is a DTensor with placements {bias.placements}; expected weight's mesh and "
            f"placements {weight.placements}"
        )
    return bias.to_local()


def unwrap_dtensors(hidden, weight, bias, group):
    """``(hidden, weight, bias, group)`` with DTensors replaced by their local tensors.

    A ``weight`` sharded ``Shard(0)`` on a 1-D mesh is a vocabulary-parallel head: its mesh's group becomes
    ``group``. A replicated ``weight`` is a whole head. Other layouts (e.g. FSDP2 on a 2-D mesh) must be
    gathered first (``full_tensor()``). ``hidden`` may be a replicated DTensor.
    """
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(hidden, DTensor):
        if not all(p.is_replicate() for p in hidden.placements):
            raise ValueError(
                f"hidden is a DTensor with placements {hidden.placements}; expected it replicated "
                "(every rank holds all tokens)"
            )
        hidden = hidden.to_local()
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise ValueError("bias is a DTensor but weight is not; pass both as DTensors or both as local tensors")
        return hidden, weight, bias, group
    mesh, placements = weight.device_mesh, weight.placements
    if group is not None:
        raise ValueError("vocab_parallel_group must be None when weight is a DTensor: its device mesh gives the group")
    if mesh.ndim == 1 and placements[0] == Shard(0):
        group = mesh.get_group()
    elif not all(p.is_replicate() for p in placements):
        raise ValueError(
            f"weight is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; apo_kernels takes a "
            "vocabulary-parallel head (Shard(0) on a 1-D mesh) or a replicated one: gather it with full_tensor()"
        )
    return hidden, weight.to_local(), _local_bias(bias, weight), group


def shard_of(
    group, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], valid: Optional[torch.Tensor]
) -> Optional[VocabShard]:
    """This rank's :class:`VocabShard` of ``group`` (None without a group, or for a group of one rank).

    One all-gather of a few integers per call: it finds the offset and the global vocabulary, and raises
    ``ValueError`` on every rank alike when the ranks disagree on what must be shared (tokens, hidden size,
    masked rows, bias or not) instead of letting a later collective hang.
    """
    check_group("vocab_parallel_group", group)
    if group is None:
        return None
    world = dist.get_world_size(group)
    if world == 1:
        return None
    n_tokens = hidden.shape[:-1].numel()
    # filled on the device (no host-to-device copy), the unmasked count summed there: one sync, the gather's
    mine = torch.empty(5, dtype=torch.int64, device=hidden.device)
    for column, value in enumerate((weight.shape[0], n_tokens, hidden.shape[-1], n_tokens, bias is not None)):
        mine[column] = value
    if valid is not None:
        mine[3] = valid.sum()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).tolist()
    for column, what in ((1, "tokens (hidden rows)"), (2, "hidden size"), (3, "unmasked tokens"), (4, "bias or not")):
        if len({row[column] for row in table}) > 1:
            raise ValueError(
                f"vocab_parallel_group: every rank must pass the same hidden states, targets and mask; the ranks "
                f"disagree on {what}: {[row[column] for row in table]}"
            )
    sizes = [row[0] for row in table]
    rank = dist.get_rank(group)
    return VocabShard(group=group, offset=sum(sizes[:rank]), vocab=sum(sizes))


@dataclass(frozen=True)
class HeadInputs:
    """The validated LM-head inputs, flat: what the plan and the sweep read."""

    hidden: torch.Tensor  # (N, D)
    weight: torch.Tensor  # (V, D): the whole head, or this rank's block of a vocabulary-parallel one
    bias: Optional[torch.Tensor]  # (V,)
    targets: torch.Tensor  # (N,)
    valid: Optional[torch.Tensor]  # (N,) bool; None: every row
    temperature: float
    shard: Optional[VocabShard]  # this rank's block of a vocabulary-parallel head
    out_shape: torch.Size  # the targets' shape, that of the per-token results
    backend: str  # "torch" or "triton", resolved for the tensors' device
    workspace_bytes: Optional[int]


def _head_checks(hidden, weight, targets, mask, bias, group, values: ValueChecks, hidden_dims: Optional[tuple]):
    """Types, shapes and devices of the head's inputs, their value checks joining ``values``; returns the
    bool mask (or None) and the rank's shard. ``hidden_dims``: the dimensions ``hidden`` may have (None: any)."""
    float_tensor("hidden", hidden)
    if hidden_dims is not None and hidden.dim() not in hidden_dims:
        raise ValueError(f"hidden must have shape (B, T, D) or (N, D), got {tuple(hidden.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(
            f"hidden must have shape (..., D) with D >= 1, e.g. (B, T, D) or (N, D), got {tuple(hidden.shape)}"
        )
    valid = None
    if mask is not None:
        tensor("mask", mask, dtypes=MASK_DTYPES, kind="a bool or 0/1")
        shape("mask", mask, hidden.shape[:-1], "hidden.shape[:-1]")
        same_device("mask", mask, hidden, "hidden")
        values.zero_or_one("mask", mask)
        valid = mask.bool()
    float_tensor("weight", weight)
    tensor("targets", targets, dtypes=TARGET_DTYPES, kind="an int32 or int64")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape (V, D) = (V, {hidden.shape[-1]}) with V >= 1 to match hidden's last dim, "
            f"got {tuple(weight.shape)}"
        )
    shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    same_device("weight", weight, hidden, "hidden")
    same_device("targets", targets, hidden, "hidden")
    if bias is not None:
        float_tensor("bias", bias)
        shape("bias", bias, (weight.shape[0],), "(V,)")
        same_device("bias", bias, hidden, "hidden")
    shard = shard_of(group, hidden, weight, bias, valid)
    if bias is not None:
        values.finite("bias", bias)
    values.finite("hidden", hidden, None if valid is None else valid[..., None].expand(hidden.shape))
    values.finite("weight", weight)
    vocab = weight.shape[0] if shard is None else shard.vocab
    values.in_range("targets", targets, 0, vocab, valid, described=" (vocabulary ids of the LM head)")
    return valid, shard


def head_inputs(
    hidden,
    weight,
    targets,
    *,
    mask,
    bias,
    temperature,
    backend,
    workspace_bytes,
    vocab_parallel_group,
    values: Optional[ValueChecks] = None,
    hidden_dims: Optional[tuple] = None,
) -> HeadInputs:
    """The validated :class:`HeadInputs` of :func:`apo_kernels.fused_linear_logprobs`'s arguments. The value
    checks join ``values`` (read by the caller), or are read here when it is None."""
    temperature = check_temperature(temperature)
    workspace_bytes = check_workspace_bytes(workspace_bytes)
    hidden, weight, bias, group = unwrap_dtensors(hidden, weight, bias, vocab_parallel_group)
    pending = ValueChecks() if values is None else values
    valid, shard = _head_checks(hidden, weight, targets, mask, bias, group, pending, hidden_dims)
    resolved = check_backend(backend, hidden.device)
    if values is None:
        pending.verify()
    return HeadInputs(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        weight=weight,
        bias=bias,
        targets=targets.reshape(-1),
        valid=None if valid is None else valid.reshape(-1),
        temperature=temperature,
        shard=shard,
        out_shape=targets.shape,
        backend=resolved,
        workspace_bytes=workspace_bytes,
    )


# ---------------------------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class ObjectiveInputs:
    """The validated inputs of the objective, as ``(B, T)`` (flat ``(N,)`` inputs are one sequence)."""

    mask: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor  # (B,) or (B, T), 0 where masked
    kl_weights: Optional[torch.Tensor]  # likewise
    old_logps: Optional[torch.Tensor]  # (B, T)
    ref_logps: Optional[torch.Tensor]
    sampling_logps: Optional[torch.Tensor]  # (B, T); may hold NaN (tokens the sampler could not score)
    log_ratio_penalty: Optional[torch.Tensor]  # (B,) or (B, T) >= 0, 0 where masked
    num_tokens: Optional[Number]
    num_sequences: Optional[Number]
    config: APOConfig
    entropy_quantile_group: Optional["dist.ProcessGroup"]


def _per_sequence_or_token(
    name, x, target_shape, mask_bt, like: tuple[torch.Tensor, str], values: ValueChecks, *, non_negative=False
):
    """A ``(B,)`` or target-shaped float tensor as ``(B,)`` / ``(B, T)``, zeroed where masked (a fully masked
    sequence's entry too); its value checks join ``values``."""
    float_tensor(name, x)
    batch = mask_bt.shape[0]
    if tuple(x.shape) == tuple(target_shape):
        x, where = x.reshape(mask_bt.shape), mask_bt
    elif len(target_shape) == 2 and tuple(x.shape) == (batch,):
        where = mask_bt.any(-1)
    else:
        options = f"(B,) = ({batch},) or " if len(target_shape) == 2 else ""
        raise ValueError(f"{name} must have shape {options}targets.shape = {tuple(target_shape)}, got {tuple(x.shape)}")
    same_device(name, x, *like)
    values.finite(name, x, where)
    if non_negative:
        values.in_range(name, x, 0, float("inf"), where)
    return torch.where(where, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _positive_count(name, x, values: ValueChecks) -> None:
    if x is None:
        return
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a positive scalar, got a tensor of shape {tuple(x.shape)}")
        values.positive(name, x)
    elif isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite positive number or scalar tensor, got {x!r}")


def _objective_checks(
    target_shape,
    mask_bt,
    like: tuple[torch.Tensor, str],
    advantages,
    kl_weights,
    old_logps,
    ref_logps,
    sampling_logps,
    num_tokens,
    num_sequences,
    config,
    entropy_quantile_group,
    values: ValueChecks,
    log_ratio_penalty=None,
) -> ObjectiveInputs:
    """The loss terms' checks, shared by :func:`loss_inputs` and :func:`objective_inputs`; ``mask_bt`` is the
    ``(B, T)`` bool mask, ``like`` the tensor (and its name) the others must share a device with."""
    if not isinstance(config, APOConfig):
        raise TypeError(f"config must be an APOConfig, got {type(config).__name__}")
    check_group("entropy_quantile_group", entropy_quantile_group)
    advantages = _per_sequence_or_token("advantages", advantages, target_shape, mask_bt, like, values)
    if kl_weights is not None:
        kl_weights = _per_sequence_or_token(
            "kl_weights", kl_weights, target_shape, mask_bt, like, values, non_negative=True
        )
    if log_ratio_penalty is not None:
        log_ratio_penalty = _per_sequence_or_token(
            "log_ratio_penalty", log_ratio_penalty, target_shape, mask_bt, like, values, non_negative=True
        )
    per_token = []
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if x is not None:
            float_tensor(name, x)
            shape(name, x, target_shape, "targets.shape")
            same_device(name, x, *like)
            values.finite(name, x, mask_bt.reshape(x.shape))
            x = x.reshape(mask_bt.shape)
        per_token.append(x)
    if sampling_logps is not None:  # NaN allowed: TRL's vLLM log-probs of unscorable tokens, counted as 0
        float_tensor("sampling_logps", sampling_logps)
        shape("sampling_logps", sampling_logps, target_shape, "targets.shape")
        same_device("sampling_logps", sampling_logps, *like)
        sampling_logps = sampling_logps.reshape(mask_bt.shape)
    if ref_logps is None and config.beta > 0:
        raise ValueError(
            f"ref_logps is required when config.beta > 0 (beta={config.beta}); pass the reference model's "
            "log-probs or set beta=0"
        )
    _positive_count("num_tokens", num_tokens, values)
    _positive_count("num_sequences", num_sequences, values)
    return ObjectiveInputs(
        mask=mask_bt,
        advantages=advantages,
        kl_weights=kl_weights,
        old_logps=per_token[0],
        ref_logps=per_token[1],
        sampling_logps=sampling_logps,
        log_ratio_penalty=log_ratio_penalty,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        config=config,
        entropy_quantile_group=entropy_quantile_group,
    )


def objective_inputs(
    logps,
    mask,
    advantages,
    *,
    entropy,
    kl_weights,
    old_logps,
    ref_logps,
    sampling_logps,
    log_ratio_penalty,
    config,
    num_tokens,
    num_sequences,
    entropy_quantile_group,
) -> ObjectiveInputs:
    """The validated arguments of :func:`apo_kernels.apo_objective` (``logps`` ``(B, T)``)."""
    float_tensor("logps", logps)
    if logps.dim() != 2:
        raise ValueError(f"logps must have shape (B, T), got {tuple(logps.shape)}")
    values = ValueChecks()
    tensor("mask", mask, dtypes=MASK_DTYPES, kind="a bool or 0/1")
    shape("mask", mask, logps.shape, "logps.shape")
    same_device("mask", mask, logps, "logps")
    values.zero_or_one("mask", mask)
    if entropy is not None:
        float_tensor("entropy", entropy)
        shape("entropy", entropy, logps.shape, "logps.shape")
        same_device("entropy", entropy, logps, "logps")
    if not isinstance(config, APOConfig):
        raise TypeError(f"config must be an APOConfig, got {type(config).__name__}")
    if config.top_entropy_quantile < 1 and entropy is None:
        raise ValueError("config.top_entropy_quantile < 1 needs the entropies (entropy=...)")
    valid = mask.bool()
    out = _objective_checks(
        logps.shape,
        valid,
        (logps, "logps"),
        advantages,
        kl_weights,
        old_logps,
        ref_logps,
        sampling_logps,
        num_tokens,
        num_sequences,
        config,
        entropy_quantile_group,
        values,
        log_ratio_penalty,
    )
    values.finite("logps", logps, valid)
    if entropy is not None:
        values.finite("entropy", entropy, valid)
    values.verify()
    return out


@dataclass(frozen=True)
class LossInputs:
    """The validated arguments of :func:`apo_kernels.apo_loss`: the head's, the objective's and the sweep asked for."""

    head: HeadInputs
    objective: ObjectiveInputs
    sweep: str


def loss_inputs(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    *,
    kl_weights,
    old_logps,
    ref_logps,
    bias,
    num_tokens,
    num_sequences,
    config,
    sampling_logps=None,
    backend="auto",
    workspace_bytes=None,
    sweep="auto",
    vocab_parallel_group=None,
    entropy_quantile_group=None,
) -> LossInputs:
    """The validated arguments of :func:`apo_kernels.apo_loss`: one host sync for every value check (two with a
    vocabulary-parallel head: the ranks' agreement is gathered first)."""
    if not isinstance(config, APOConfig):
        raise TypeError(f"config must be an APOConfig, got {type(config).__name__}")
    choice("sweep", sweep, SWEEPS)
    if sweep == "one-pass" and config.top_entropy_quantile < 1:
        raise ValueError(
            "sweep='one-pass' cannot apply config.top_entropy_quantile < 1, whose entropy threshold "
            "needs every token's entropy before any gradient; use sweep='auto' or 'two-pass'"
        )
    if mask is None:
        raise TypeError("mask must be a torch.Tensor with a bool or 0/1 dtype, got NoneType")
    values = ValueChecks()
    head = head_inputs(
        hidden,
        weight,
        targets,
        mask=mask,
        bias=bias,
        temperature=config.temperature,
        backend=backend,
        workspace_bytes=workspace_bytes,
        vocab_parallel_group=vocab_parallel_group,
        values=values,
        hidden_dims=(2, 3),
    )
    target_shape = head.out_shape
    mask_bt = head.valid.view(1, -1) if len(target_shape) == 1 else head.valid.view(target_shape)
    objective = _objective_checks(
        target_shape,
        mask_bt,
        (head.hidden, "hidden"),
        advantages,
        kl_weights,
        old_logps,
        ref_logps,
        sampling_logps,
        num_tokens,
        num_sequences,
        config,
        entropy_quantile_group,
        values,
    )
    values.verify()
    return LossInputs(head=head, objective=objective, sweep=sweep)


# ---------------------------------------------------------------------------------------------- the group stage


def group_advantages_checks(rewards, *, group_size, group_ids, correct, lengths, config) -> None:
    """Every check of :func:`apo_kernels.group_advantages`'s arguments: types, shapes and devices first, then
    the values, read together."""
    if not isinstance(config, APOConfig):
        raise TypeError(f"config must be an APOConfig, got {type(config).__name__}")
    tensor("rewards", rewards, dtypes=FLOAT_DTYPES + INT_DTYPES, kind="a numeric")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must have shape (B,) with B >= 1, got {tuple(rewards.shape)}")
    batch = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (contiguous groups) or group_ids (one id per response)")
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if batch % group_size:
            raise ValueError(f"group_size={group_size} does not divide the batch of {batch} rewards")
    if group_ids is not None:
        tensor("group_ids", group_ids, dtypes=INT_DTYPES, kind="an integer")
        shape("group_ids", group_ids, (batch,), "(B,)")
        same_device("group_ids", group_ids, rewards, "rewards")
    if correct is not None:
        tensor("correct", correct, dtypes=MASK_DTYPES, kind="a bool or 0/1")
        shape("correct", correct, (batch,), "(B,)")
        same_device("correct", correct, rewards, "rewards")
    if config.stcr and lengths is None:
        raise ValueError("lengths is required when config.stcr is True (STCR compares response lengths)")
    if lengths is not None:
        tensor("lengths", lengths, dtypes=INT_DTYPES + FLOAT_DTYPES, kind="a numeric")
        shape("lengths", lengths, (batch,), "(B,)")
        same_device("lengths", lengths, rewards, "rewards")
    values = ValueChecks()
    values.finite("rewards", rewards.double())
    if correct is not None:
        values.zero_or_one("correct", correct)
    if lengths is not None:
        values.finite("lengths", lengths.double())
        values.in_range("lengths", lengths.double(), 0, float("inf"))
    values.verify()
