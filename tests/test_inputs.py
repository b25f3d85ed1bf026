"""Input validation reads the device once per call (``inputs.ValueChecks``): every value check becomes a device
boolean, all are read with one host sync after the type, shape and device checks, and the first failing one
raises the ``ValueError`` naming its argument. On a GPU each read of device data is a sync, counted here on
CPU by the ops that read data on the host."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from apo_kernels import APOConfig, apo_loss, fused_linear_logprobs, inputs
from apo_kernels.objective import apo_objective

aten = torch.ops.aten
# Ops that read tensor data on the host, or whose output shape depends on it (a sync on CUDA).
HOST_READS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}


class HostReads(TorchDispatchMode):
    """Records every host read of tensor data within the block: the ops above, indexing with a boolean mask
    (``x[mask]``), and ``Tensor.tolist`` (which reads below the dispatcher)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = []
        tolist = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (self.reads.append("tolist"), tolist(t))[1])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if func in HOST_READS or boolean_index:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _loss_inputs(seed=0):
    """Every checked argument of apo_loss: a 0/1 float mask with masked tokens, per-sequence DADS weights,
    old and reference log-probs, a bias and a tensor token count."""
    gen = torch.Generator().manual_seed(seed)
    batch, length, hidden_size, vocab = 3, 6, 8, 37
    mask = torch.ones(batch, length)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    return dict(
        hidden=torch.randn(batch, length, hidden_size, generator=gen, requires_grad=True),
        weight=torch.randn(vocab, hidden_size, generator=gen, requires_grad=True),
        targets=torch.randint(0, vocab, (batch, length), generator=gen),
        mask=mask,
        advantages=torch.randn(batch, generator=gen),
        kl_weights=torch.rand(batch, generator=gen),
        old_logps=-torch.rand(batch, length, generator=gen),
        ref_logps=-torch.rand(batch, length, generator=gen),
        bias=torch.randn(vocab, generator=gen, requires_grad=True),
        num_tokens=torch.tensor(11.0),
        config=APOConfig(beta=0.04),
    )


def test_validation_reads_the_device_once(monkeypatch):
    """Every value check of apo_loss's inputs (mask 0/1, finite hidden, weight, bias, advantages, DADS weights,
    old and reference log-probs, targets in range, DADS weights >= 0, positive token count), with the head and
    hidden states checked in many slabs: one host read."""
    monkeypatch.setattr(inputs, "CHECK_CHUNK", 7)
    kwargs = _loss_inputs()
    with HostReads(monkeypatch) as mode:
        inputs.loss_inputs(**kwargs, num_sequences=None)
    assert len(mode.reads) == 1, mode.reads


@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
def test_apo_loss_reads_the_device_at_most_twice(monkeypatch, sweep):
    """One call (validation, then the sweep of the unmasked rows): the validation's read and the masked rows'
    compaction (``nonzero``)."""
    monkeypatch.setattr(inputs, "CHECK_CHUNK", 7)
    with HostReads(monkeypatch) as mode:
        apo_loss(**_loss_inputs(), backend="torch", sweep=sweep)
    assert len(mode.reads) <= 2, mode.reads


def test_fused_linear_logprobs_reads_the_device_at_most_twice(monkeypatch):
    monkeypatch.setattr(inputs, "CHECK_CHUNK", 7)
    kwargs = _loss_inputs()
    with HostReads(monkeypatch) as mode:
        fused_linear_logprobs(
            kwargs["hidden"],
            kwargs["weight"],
            kwargs["targets"],
            bias=kwargs["bias"],
            mask=kwargs["mask"],
            return_entropy=True,
            backend="torch",
        )
    assert len(mode.reads) <= 2, mode.reads


def test_shape_and_device_errors_come_before_value_errors():
    kwargs = _loss_inputs()
    kwargs["mask"][0, 0] = 2.0  # a value error, registered first
    kwargs["ref_logps"] = kwargs["ref_logps"][:, :-1]  # a shape error, found later
    with pytest.raises(ValueError, match=r"ref_logps must have shape targets.shape"):
        apo_loss(**kwargs)


@pytest.mark.parametrize(
    "break_inputs, match",
    [
        (
            lambda k: (k["hidden"].data[0, 1].fill_(float("nan")), k["targets"][2, 3].fill_(99)),
            "hidden contains NaN or infinite values at unmasked positions",
        ),
        (
            lambda k: (k["targets"][2, 3].fill_(99), k["advantages"][0].fill_(float("inf"))),
            r"targets must lie in \[0, 37\) at unmasked positions \(vocabulary ids of the LM head\); found 99",
        ),
        (
            lambda k: (k["kl_weights"][1].fill_(-0.5), k.update(num_tokens=torch.tensor(-2.0))),
            r"kl_weights must lie in \[0, inf\) at unmasked positions; found -0.5",
        ),
        (lambda k: k.update(num_tokens=torch.tensor([-2.0])), r"num_tokens must be a finite number > 0, got -2.0"),
    ],
    ids=["hidden-before-targets", "targets-value", "kl-weights-before-count", "count-value"],
)
def test_the_first_failing_value_check_raises_with_the_bad_value(break_inputs, match):
    """Several bad values: the first check in argument order raises (as when each check read the device
    itself), its message reading the offending value."""
    kwargs = _loss_inputs()
    break_inputs(kwargs)
    with pytest.raises(ValueError, match=match):
        apo_loss(**kwargs)


def test_meta_tensors_skip_value_checks_and_every_metric_stays_on_their_device(monkeypatch):
    """On ``meta`` tensors (no data) nothing is read and nothing is copied from the host: no
    ``torch.tensor(..., device=...)``, a synchronous host-to-device copy on CUDA."""
    meta = {
        k: (v.to("meta").requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
        for k, v in _loss_inputs().items()
    }
    copies = []
    tensor = torch.tensor
    monkeypatch.setattr(
        torch,
        "tensor",
        lambda *a, device=None, **k: (
            copies.append(device) if device is not None and torch.device(device).type != "cpu" else None,
            tensor(*a, device=device, **k),
        )[1],
    )
    mode = HostReads(monkeypatch)
    for sweep in ("one-pass", "two-pass"):
        with mode:
            out = apo_loss(**meta, backend="torch", sweep=sweep)
        assert mode.reads == [] and copies == []
        assert {name: m.device.type for name, m in out.metrics.items()} == dict.fromkeys(out.metrics, "meta")


def test_objective_metrics_without_entropies_stay_on_the_inputs_device():
    logps = torch.zeros(2, 3, device="meta")
    _, metrics = apo_objective(
        logps,
        torch.ones(2, 3, dtype=torch.bool, device="meta"),
        torch.zeros(2, device="meta"),
        config=APOConfig(beta=0.0),
    )
    assert metrics["entropy"].device.type == "meta"


# --- the bad-input classes of issue 23: each was silent or the wrong kind of error ------------------------------


def _problem(seed=1):
    gen = torch.Generator().manual_seed(seed)
    batch, length, hidden_size, vocab = 3, 5, 6, 29
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2] = False  # a fully masked sequence
    return dict(
        hidden=torch.randn(batch, length, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True),
        weight=torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True),
        targets=torch.randint(0, vocab, (batch, length), generator=gen),
        mask=mask,
        advantages=torch.randn(batch, length, generator=gen, dtype=torch.float64),
        kl_weights=torch.rand(batch, length, generator=gen, dtype=torch.float64),
        old_logps=-torch.rand(batch, length, generator=gen, dtype=torch.float64),
        ref_logps=-torch.rand(batch, length, generator=gen, dtype=torch.float64),
        config=APOConfig(beta=0.04),
    )


@pytest.mark.parametrize("name", ["advantages", "kl_weights"])
@pytest.mark.parametrize("per", ["token", "sequence"])
@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_at_masked_positions_never_reaches_the_loss(name, per, sweep, bad):
    """Masked values are exempt from the checks and made harmless: the loss and gradients equal those with zeros
    there (a per-sequence value of a fully masked sequence included)."""
    kwargs = _problem()
    mask = kwargs["mask"]
    if per == "sequence":
        kwargs["advantages"], kwargs["kl_weights"] = kwargs["advantages"][:, 0], kwargs["kl_weights"][:, 0]
        where = ~mask.any(-1)
    else:
        where = ~mask
    clean = kwargs[name].masked_fill(where, 0.0)
    kwargs[name] = kwargs[name].masked_fill(where, bad)
    hidden, weight = kwargs["hidden"], kwargs["weight"]
    got = apo_loss(**kwargs, sweep=sweep)
    got_grads = torch.autograd.grad(got.loss, (hidden, weight))
    want = apo_loss(**{**kwargs, name: clean}, sweep=sweep)
    want_grads = torch.autograd.grad(want.loss, (hidden, weight))
    assert torch.isfinite(got.loss) and torch.equal(got.loss, want.loss)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    assert all(torch.equal(got.metrics[k], want.metrics[k]) for k in want.metrics)


@pytest.mark.parametrize("name", ["num_tokens", "num_sequences"])
@pytest.mark.parametrize("value", [float("inf"), torch.tensor(float("inf")), float("nan")])
def test_infinite_counts_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite"):
        apo_loss(**_problem(), **{name: value})


BAD_OBJECTIVE_INPUTS = [
    (dict(mask=torch.ones(3, 1, dtype=torch.bool)), ValueError, r"mask must have shape logps.shape = \(3, 5\)"),
    (dict(old_logps=torch.zeros(5)), ValueError, r"old_logps must have shape targets.shape = \(3, 5\)"),
    (dict(sampling_logps=torch.zeros(3, 4)), ValueError, r"sampling_logps must have shape targets.shape = \(3, 5\)"),
    (dict(sampling_logps=torch.zeros(3, 5, dtype=torch.long)), TypeError, "sampling_logps must have a floating"),
    (dict(ref_logps=None), ValueError, "ref_logps is required when config.beta > 0"),
    (dict(num_tokens=0), ValueError, "num_tokens must be a finite positive number"),
    (dict(config=None), TypeError, "config must be an APOConfig, got NoneType"),
    (dict(advantages=torch.zeros(4)), ValueError, r"advantages must have shape \(B,\) = \(3,\)"),
    (dict(logps=torch.zeros(15)), ValueError, r"logps must have shape \(B, T\)"),
    (dict(entropy=torch.zeros(3, 4)), ValueError, r"entropy must have shape logps.shape"),
    (dict(logps=torch.full((3, 5), float("nan"))), ValueError, "logps contains NaN or infinite values at unmasked"),
    (dict(entropy_quantile_group="world"), ValueError, "entropy_quantile_group is set but torch.distributed is not"),
    (dict(log_ratio_penalty=-torch.ones(3, 5)), ValueError, r"log_ratio_penalty must lie in \[0, inf\)"),
    (dict(log_ratio_penalty=torch.ones(3, 4)), ValueError, r"log_ratio_penalty must have shape \(B,\) = \(3,\)"),
]


@pytest.mark.parametrize("override, error, match", BAD_OBJECTIVE_INPUTS)
def test_apo_objective_validates_its_inputs(override, error, match):
    kwargs = dict(
        logps=-torch.rand(3, 5),
        mask=torch.ones(3, 5, dtype=torch.bool),
        advantages=torch.randn(3),
        ref_logps=-torch.rand(3, 5),
        config=APOConfig(beta=0.04),
    )
    with pytest.raises(error, match=match):
        apo_objective(**{**kwargs, **override})


@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
def test_double_backward_is_refused_clearly(sweep):
    """A gradient penalty through the sweep: one pass saved its gradients as constants (the second order would be
    a silent 0), two passes recompute logits in place; both refuse the second differentiation."""
    kwargs = _problem()
    hidden = kwargs["hidden"]
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (d_hidden,) = torch.autograd.grad(apo_loss(**kwargs, sweep=sweep).loss, hidden, create_graph=True)
        d_hidden.square().sum().backward()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.float32])
def test_narrow_or_float_targets_are_a_type_error(dtype):
    kwargs = _problem()
    with pytest.raises(TypeError, match="targets must have an int32 or int64 dtype"):
        apo_loss(**{**kwargs, "targets": kwargs["targets"].to(dtype)})
    with pytest.raises(TypeError, match="targets must have an int32 or int64 dtype"):
        fused_linear_logprobs(kwargs["hidden"], kwargs["weight"], kwargs["targets"].to(dtype))


@pytest.mark.parametrize("name", ["advantages", "kl_weights", "old_logps", "ref_logps"])
def test_a_device_mismatch_is_named_before_any_value_is_read(name):
    kwargs = _problem()
    kwargs[name] = torch.full_like(kwargs[name], float("nan"), device="meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but hidden is on cpu"):
        apo_loss(**kwargs)


@pytest.mark.parametrize("name", ["correct", "lengths", "group_ids"])
def test_group_advantages_names_a_device_mismatch(name):
    from apo_kernels import group_advantages

    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    kwargs = dict(group_size=2, correct=torch.tensor([1, 0, 1, 0]), lengths=torch.tensor([3, 4, 5, 6]))
    if name == "group_ids":
        kwargs.update(group_size=None, group_ids=torch.tensor([0, 0, 1, 1]))
    kwargs[name] = torch.empty(4, dtype=kwargs[name].dtype, device="meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but rewards is on cpu"):
        group_advantages(rewards, **kwargs)


def test_a_hidden_size_of_zero_is_named():
    kwargs = _problem()
    kwargs.update(hidden=torch.zeros(3, 5, 0, dtype=torch.float64), weight=torch.zeros(29, 0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hidden must have shape \(..., D\) with D >= 1"):
        apo_loss(**kwargs)
    with pytest.raises(ValueError, match=r"hidden must have shape \(..., D\) with D >= 1"):
        fused_linear_logprobs(kwargs["hidden"], kwargs["weight"], kwargs["targets"])


def test_entropy_quantile_group_is_validated():
    with pytest.raises(ValueError, match="entropy_quantile_group is set but torch.distributed is not initialized"):
        apo_loss(**_problem(), entropy_quantile_group=0)
