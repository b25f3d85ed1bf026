"""The Triton epilogue against the shared torch objective: the per-token formula cannot drift."""

import dataclasses
import importlib
import inspect
import itertools
import math
import re
import typing

import pytest
import torch

from apo_kernels import APOConfig, apo_objective
from apo_kernels.kernels import apo_epilogue
from apo_kernels.kernels.apo_epilogue import FLAGS, PARAM_SLOTS, EpilogueParams, _apo_epilogue_kernel, variant_configs
from apo_kernels.objective import torch_epilogue

# the module (the package exports a function of its name)
epilogue_module = importlib.import_module("apo_kernels.kernels.apo_epilogue")

pytestmark = pytest.mark.interpreter  # the Triton epilogue on CPU tensors

B, T = 5, 13
EPS = {torch.float32: 1e-6, torch.float64: 1e-14}


def random_case(dtype, seed, B=B, T=T):
    """Epilogue inputs as apo_objective builds them: expanded per-sequence advantages, a transposed
    (non-contiguous) ratio input, random non-negative aggregation weights with zeros (masked tokens)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    logps = randn(B, T) - 2.0
    # Ratios inside and outside both clip ranges and beyond the dual-clip cap (log 3 ~ 1.1).
    old = (logps + 0.8 * randn(B, T)).T.contiguous().T
    old[0, :3] = logps[0, :3]  # ratio exactly 1 (the one-update case): ties of the clipped min
    ref = logps + 0.5 * randn(B, T)
    advantages = randn(B, 1).expand(B, T)
    keep = torch.rand(B, T, generator=gen) > 0.2
    w_pg = torch.rand(B, T, generator=gen, dtype=dtype) * keep
    w_kl = torch.rand(B, T, generator=gen, dtype=dtype) * keep
    return logps, old, ref, advantages, w_pg, w_kl


def run(epilogue, case, config):
    logps, *rest = case
    logps = logps.clone().requires_grad_()
    out = epilogue(logps, *rest, config)
    return out, torch.autograd.grad(3.0 * out.loss, logps)[0]


def test_sequences_longer_than_a_block():
    """Several column blocks per sequence (BLOCK = 512), the last one partial: every token is computed once."""
    case = random_case(torch.float64, 7, B=2, T=1100)
    config = APOConfig(beta=0.04)
    got, d_logps = run(apo_epilogue, case, config)
    want, want_d_logps = run(torch_epilogue, case, config)
    assert_rounding_close(got.loss, want.loss, 2 * 1100 * EPS[torch.float64], "loss")
    for name in ("pg", "kl", "ratio"):
        assert_rounding_close(getattr(got, name), getattr(want, name), EPS[torch.float64], name)
    assert_rounding_close(d_logps, want_d_logps, EPS[torch.float64], "dL/dlogp")


def assert_rounding_close(actual, expected, eps, what):
    """Equal up to a few roundings of the largest term involved."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=8 * eps, atol=8 * eps * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kl_estimator, policy",
    list(
        itertools.product(
            ["k1", "k2", "k3"],
            [
                "ppo",
                "ppo dual-clip",
                "ppo two-sided",
                "ppo kl-bias-correction",
                "cispo",
                "sapo kl-bias-correction",
                "vespo",
                "dro",
                "dppo_tv",
                "dppo_kl dual-clip",
                "gmpo",
                "ppo unclipped",
            ],
        )
    ),
)
def test_matches_torch_epilogue(dtype, kl_estimator, policy):
    config = APOConfig(
        kl_estimator=kl_estimator,
        policy_loss=policy.split()[0],
        clip_ratio_c=3.0 if "dual" in policy else None,
        ratio_cap=1.3 if "two" in policy else None,
        sapo_tau_pos=1.5,
        sapo_tau_neg=0.8,
        vespo_k_pos=1.5,
        vespo_lambda_pos=2.5,
        vespo_k_neg=2.5,
        vespo_lambda_neg=1.5,
        dro_beta=0.7 if policy == "dro" else None,
        kl_bias_correction="kl-bias" in policy,
        eps_low=1.0 if "unclipped" in policy else 0.2,  # verl's kl_cov: no clip range at all
        eps_high=math.inf if "unclipped" in policy else 0.28,
        beta=0.04,
    )
    for seed in range(3):
        case = random_case(dtype, seed)
        got, d_logps = run(apo_epilogue, case, config)
        want, want_d_logps = run(torch_epilogue, case, config)
        eps = EPS[dtype]
        assert got.loss.dtype == dtype and got.loss.shape == ()
        # The loss is a sum of B * T terms in another order: rounding grows with their count.
        assert_rounding_close(got.loss, want.loss, B * T * eps, "loss")
        for name in ("pg", "kl", "ratio"):
            assert not getattr(got, name).requires_grad
            assert_rounding_close(getattr(got, name), getattr(want, name), eps, name)
        assert_rounding_close(d_logps, want_d_logps, eps, "dL/dlogp")


def test_objective_with_the_triton_epilogue_equals_the_torch_one():
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 9, generator=gen, dtype=torch.float64) - 1
    mask = torch.rand(4, 9, generator=gen) > 0.3
    mask[2] = False  # a fully masked sequence
    old = logps + 0.3 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    entropy = torch.rand(4, 9, generator=gen, dtype=torch.float64)
    kw = dict(
        entropy=entropy,
        kl_weights=torch.rand(4, dtype=torch.float64, generator=gen),
        old_logps=old,
        ref_logps=ref,
        config=APOConfig(beta=0.1, clip_ratio_c=3.0, entropy_coef=0.01, loss_agg_mode="seq-mean-token-sum-norm"),
    )
    results = []
    for epilogue in (apo_epilogue, torch_epilogue):
        x = logps.clone().requires_grad_()
        loss, metrics = apo_objective(
            x,
            mask,
            torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
            epilogue=epilogue,
            **kw,
        )
        results.append((loss, torch.autograd.grad(loss, x)[0], metrics))
    (loss, grad, metrics), (want_loss, want_grad, want_metrics) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-13, atol=1e-15)


def test_outputs_mutated_after_the_call_do_not_change_gradients():
    case = random_case(torch.float64, 4)
    config = APOConfig()
    _, d_logps = run(apo_epilogue, case, config)
    logps = case[0].clone().requires_grad_()
    out = apo_epilogue(logps, *case[1:], config)
    for x in (out.pg, out.kl, out.ratio):
        x.fill_(7.0)
    again = torch.autograd.grad(3.0 * out.loss, logps)[0]
    torch.testing.assert_close(again, d_logps, rtol=0, atol=0)


def test_empty_batch():
    empty = torch.zeros(0, 4, dtype=torch.float32)
    logps = empty.clone().requires_grad_()
    out = apo_epilogue(logps, empty, empty, empty, empty, empty, APOConfig())
    assert out.loss.item() == 0 and out.pg.shape == (0, 4)
    assert torch.autograd.grad(out.loss, logps)[0].shape == (0, 4)


# Every policy term and option of the kernel (as test_matches_torch_epilogue runs them).
ALL_CONFIGS = list(variant_configs().values())
# Config fields that only choose constexpr flags (the compiled variant), not a float slot.
FLAG_SELECTORS = {"kl_estimator", "policy_loss", "kl_bias_correction"}
# For each slot named after a config field: a configuration under which the kernel reads it.
SLOT_CONFIGS = {
    "clip_ratio_c": dict(clip_ratio_c=3.0),
    "ratio_cap": dict(ratio_cap=1.3),
    "sapo_tau_pos": dict(policy_loss="sapo"),
    "sapo_tau_neg": dict(policy_loss="sapo"),
    "vespo_k_pos": dict(policy_loss="vespo"),
    "vespo_lambda_pos": dict(policy_loss="vespo"),
    "vespo_k_neg": dict(policy_loss="vespo"),
    "vespo_lambda_neg": dict(policy_loss="vespo"),
    "eps_low": dict(policy_loss="dppo_tv"),
    "eps_high": dict(policy_loss="dppo_tv"),
    "dro_beta": dict(policy_loss="dro", dro_beta=0.5),
}


def kernel_offset(slot: str) -> int:
    return epilogue_module.__dict__[f"SLOT_{slot.upper()}"].value


def distinct_params() -> EpilogueParams:
    """Every slot and flag a different value (flags of type int 1, 2, ...; bools alternating)."""
    hints = typing.get_type_hints(EpilogueParams)
    return EpilogueParams(
        **{name: 0.25 + 1.5 * i for i, name in enumerate(reversed(PARAM_SLOTS))},
        **{name: i + 1 if hints[name] is int else i % 2 == 0 for i, name in enumerate(FLAGS)},
    )


class RecordingConfig:
    """An ``APOConfig`` that records the fields read from it."""

    def __init__(self, config: APOConfig):
        self._config, self.read = config, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._config, name)


def test_the_kernel_reads_each_slot_at_its_table_offset_and_takes_each_flag():
    """One table: the dataclass's fields. The kernel's offsets are the SLOT_<NAME> constexprs derived from it
    (a slot's position in PARAM_SLOTS), each read by name, no numbered read of the packed tensor; its
    constexpr flags are the table's flags."""
    assert PARAM_SLOTS + FLAGS == tuple(f.name for f in dataclasses.fields(EpilogueParams))
    assert len(PARAM_SLOTS) == 13 and len(FLAGS) == 9
    offsets = {name: value.value for name, value in vars(epilogue_module).items() if name.startswith("SLOT_")}
    assert offsets == {f"SLOT_{slot.upper()}": i for i, slot in enumerate(PARAM_SLOTS)}
    source = inspect.getsource(_apo_epilogue_kernel.fn)
    reads = re.findall(r"params_ptr \+ (\w+)", source)
    assert set(reads) == set(offsets), "a slot the kernel never reads, or a read of something else"
    assert source.count("params_ptr") == 1 + len(reads), "params_ptr used other than as params_ptr + SLOT_<NAME>"
    constexprs = [
        name
        for name, p in inspect.signature(_apo_epilogue_kernel.fn).parameters.items()
        if "constexpr" in str(p.annotation)
    ]
    assert constexprs == [*FLAGS, "BLOCK"]


def test_packing_then_reading_back_by_name_round_trips(monkeypatch):
    params = distinct_params()
    packed = epilogue_module._params_on(params.values(), torch.float64, torch.device("cpu"))
    assert packed.shape == (len(PARAM_SLOTS),)
    for slot in PARAM_SLOTS:
        assert packed[kernel_offset(slot)].item() == getattr(params, slot), slot
    # through the custom op's arguments (lists: its schema has no dataclasses), flag types included
    back = EpilogueParams.from_op_args(*params.op_args())
    assert back == params
    assert [type(getattr(back, name)) for name in FLAGS] == [type(getattr(params, name)) for name in FLAGS]
    assert params.constexprs() == {name: getattr(params, name) for name in FLAGS}
    # what a launch packs: the configuration's values, at their offsets
    packed_by_launch = []

    def params_on(values, dtype, where):
        packed_by_launch.append(torch.tensor(values, dtype=dtype))
        return packed_by_launch[-1]

    monkeypatch.setattr(epilogue_module, "_params_on", params_on)
    case = random_case(torch.float64, 0)
    for config in ALL_CONFIGS:
        apo_epilogue(*case, config)
        expected = EpilogueParams.from_config(config)
        for slot in PARAM_SLOTS:
            assert packed_by_launch[-1][kernel_offset(slot)].item() == getattr(expected, slot), slot
    assert len(packed_by_launch) == len(ALL_CONFIGS)


def test_every_config_field_the_epilogue_reads_is_in_the_table():
    """The torch epilogue's config fields are float slots of the same name or choose flags, and the kernel's
    parameters read them all; each slot named after a config field packs that field's value."""
    torch_reads, kernel_reads = set(), set()
    case = random_case(torch.float64, 0)
    for config in ALL_CONFIGS:
        recording = RecordingConfig(config)
        torch_epilogue(*case, recording)
        torch_reads |= recording.read
        recording = RecordingConfig(config)
        EpilogueParams.from_config(recording)
        kernel_reads |= recording.read
    assert torch_reads <= set(PARAM_SLOTS) | FLAG_SELECTORS, torch_reads - set(PARAM_SLOTS) - FLAG_SELECTORS
    assert torch_reads <= kernel_reads, torch_reads - kernel_reads
    config_fields = {f.name for f in dataclasses.fields(APOConfig)}
    assert set(SLOT_CONFIGS) == set(PARAM_SLOTS) & config_fields
    for slot, options in SLOT_CONFIGS.items():
        base = APOConfig(**options)
        for config in (base, dataclasses.replace(base, **{slot: getattr(base, slot) + 0.125})):
            packed = torch.tensor(EpilogueParams.from_config(config).values(), dtype=torch.float64)
            assert packed[kernel_offset(slot)].item() == getattr(config, slot), slot
    # the two derived slots
    params = EpilogueParams.from_config(APOConfig(eps_low=0.2, eps_high=0.28))
    assert (params.ratio_low, params.ratio_high) == (1.0 - 0.2, 1.0 + 0.28)


@pytest.mark.parametrize("policy", ["ppo dual-clip", "dppo_kl"])
def test_fullgraph_compile_matches_eager_through_the_custom_op(policy):
    """Under torch.compile the launch is the custom op (its fake implementation traced, inputs and outputs as
    tensor lists, the float slots as a float list, DPPO's inf included); same values and gradients as eager."""
    torch._dynamo.reset()
    config = APOConfig(policy_loss=policy.split()[0], clip_ratio_c=3.0 if "dual" in policy else None, beta=0.04)
    case = random_case(torch.float64, 5)

    def fn(logps):
        out = apo_epilogue(logps, *case[1:], config)
        return out.loss, out.pg, out.kl, out.ratio

    graphs = []

    def backend(gm, example_inputs):
        graphs.extend(str(m.graph) for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    eager = run_fn(fn, case)
    compiled = run_fn(torch.compile(fn, backend=backend, fullgraph=True), case)
    assert any("apo_kernels.apo_epilogue_terms" in graph for graph in graphs)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def run_fn(fn, case):
    logps = case[0].clone().requires_grad_()
    out = fn(logps)
    return (*out, *torch.autograd.grad(out[0], logps))
