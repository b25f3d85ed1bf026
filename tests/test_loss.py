"""``apo_loss`` against the materialized-logits reference, and its input validation."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_kernels import AGG_MODES, APOConfig, apo_loss, driver, group_advantages, plan, reference
from tests.strategies import LOGIT_PROFILES, TOLERANCE, assert_close, assert_compiled_matches_eager, make_linear_problem


@st.composite
def loss_cases(draw, dtype=torch.float64):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    D, V = draw(st.integers(1, 12)), draw(st.integers(1, 90))
    seed = draw(st.integers(0, 2**31 - 1))
    problem = make_linear_problem(
        B * T,
        D,
        V,
        seed=seed,
        profile=draw(st.sampled_from(LOGIT_PROFILES)),
        with_bias=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.3])),
        dtype=dtype,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(B, T, generator=gen) < draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    if draw(st.booleans()):
        mask[0] = False  # a fully masked sequence
    per_token = draw(st.booleans())
    adv_shape = (B, T) if per_token else (B,)
    policy_loss = draw(st.sampled_from(["ppo", "cispo", "sapo", "vespo", "dro", "dppo_tv", "dppo_kl", "gmpo"]))
    level = draw(st.sampled_from(["token"] + ["sequence"] * (policy_loss in ("ppo", "cispo", "sapo"))))
    cfg = APOConfig(
        beta=draw(st.sampled_from([0.0, 1e-3, 0.3])),
        kl_estimator=draw(st.sampled_from(["k1", "k2", "k3"])),
        kl_bias_correction=draw(st.booleans()) if policy_loss not in ("vespo", "gmpo") else False,
        policy_loss=policy_loss,
        importance_sampling_level=level,
        dro_beta=0.5 if policy_loss == "dro" else None,
        clip_ratio_c=draw(st.sampled_from([None, 3.0])) if policy_loss in ("ppo", "dppo_tv", "dppo_kl") else None,
        ratio_cap=draw(st.sampled_from([None, 1.5])) if policy_loss == "ppo" else None,
        eps_high=draw(st.sampled_from([0.2, 0.28])),
        loss_agg_mode=draw(st.sampled_from(AGG_MODES)),
        kl_agg_mode=draw(st.sampled_from(AGG_MODES)),
        entropy_coef=draw(st.sampled_from([0.0, 0.05])),
        entropy_token_mean=draw(st.booleans()),
        top_entropy_quantile=draw(st.sampled_from([1.0, 1.0] + [0.4] * (policy_loss not in ("dro", "gmpo")))),
        off_policy_mask_threshold=draw(st.sampled_from([None, None] + [0.05] * (policy_loss not in ("dro", "gmpo")))),
        temperature=problem.temperature,
    )
    targets = torch.where(mask, problem.targets.view(B, T), -100)  # masked ids may be anything
    with torch.no_grad():
        cur, _ = reference.linear_logprobs(
            problem.hidden.double(),
            problem.weight.double(),
            problem.targets,
            bias=None if problem.bias is None else problem.bias.double(),
            temperature=problem.temperature,
        )
    cur = cur.view(B, T)
    kwargs = dict(
        kl_weights=torch.rand(adv_shape, generator=gen, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None,
        old_logps=(cur + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)) if draw(st.booleans()) else None,
        ref_logps=cur + torch.randn(B, T, generator=gen, dtype=torch.float64)
        if cfg.beta > 0 or draw(st.booleans())
        else None,
        num_tokens=draw(st.sampled_from([None, 11])),
        config=cfg,
    )
    if cfg.off_policy_mask_threshold is not None and draw(st.booleans()):  # else the old log-probs stand in
        kwargs["sampling_logps"] = cur + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    advantages = torch.randn(adv_shape, generator=gen, dtype=torch.float64).to(dtype)
    return problem, targets, mask, advantages, kwargs


def forced_plan(rows, cols):
    """A ``plan.plan_sweep`` that keeps the sweep's choice but forces small chunks (of whole sequences for
    sequence-level ratios: at least ``min_chunk_rows``) and slabs."""
    planned = plan.plan_sweep

    def forced(*args, min_chunk_rows=1, **kwargs):
        one_pass = planned(*args, min_chunk_rows=min_chunk_rows, **kwargs).one_pass
        return plan.SweepPlan(one_pass, plan.Tile(max(rows, min_chunk_rows) if one_pass else rows, cols))

    return forced


def loss_and_grads(fn, problem, targets, mask, advantages, kwargs):
    p = problem.leaves()
    hidden = p.hidden.view(*targets.shape, -1)
    out = fn(hidden, p.weight, targets, mask, advantages, bias=p.bias, **kwargs)
    inputs = [x for x in (p.hidden, p.weight, p.bias) if x is not None]
    grads = torch.autograd.grad(out.loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return out, grads


@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
@settings(max_examples=120)
@given(case=loss_cases(), chunk=st.sampled_from([None, 1, 3]))
def test_matches_reference_in_float64(sweep, case, chunk):
    if case[-1]["config"].top_entropy_quantile < 1 and sweep == "one-pass":
        with pytest.raises(ValueError, match="sweep='one-pass' cannot apply config.top_entropy_quantile"):
            loss_and_grads(functools.partial(apo_loss, sweep=sweep), *case)
        return
    with pytest.MonkeyPatch.context() as patch:
        if chunk is not None:  # tokens per one-pass chunk / per two-pass tile, slabs of 7 columns
            patch.setattr(plan, "plan_sweep", forced_plan(chunk, 7))
        ours, our_grads = loss_and_grads(functools.partial(apo_loss, sweep=sweep), *case)
    ref, ref_grads = loss_and_grads(reference.apo_loss, *case)
    tol = TOLERANCE[torch.float64]
    assert_close(ours.loss, ref.loss, tol, "loss")
    assert_close(ours.logps, ref.logps, tol, "logps")
    assert_close(ours.entropy, ref.entropy, tol, "entropy")
    for g, r in zip(our_grads, ref_grads):
        assert_close(g, r, tol, "grad")
    assert ours.metrics.pop("one_pass") == (sweep == "one-pass") and ref.metrics.pop("one_pass") == 0
    assert ours.metrics.keys() == ref.metrics.keys()
    for k in ours.metrics:
        assert_close(ours.metrics[k], ref.metrics[k], tol, k)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("sweep, chunk", [("one-pass", None), ("one-pass", 5), ("two-pass", None)])
def test_sequence_ratio_kl_bias_correction_matches_reference(sweep, chunk, backend):
    """The bias-corrected KL with GSPO's sequence ratios: TRL differentiates each sequence's ratio through all its
    tokens, the token-wise epilogue through each token's own; the difference (a per-sequence mean, added in the
    one-pass chunks of whole sequences as in two passes) makes the gradients the oracle's."""
    problem = make_linear_problem(3 * 6, 8, 53, seed=4)
    targets = problem.targets.view(3, 6)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 6, generator=gen) > 0.2
    kwargs = dict(
        old_logps=-3 * torch.rand(3, 6, generator=gen, dtype=torch.float64),
        ref_logps=-3 * torch.rand(3, 6, generator=gen, dtype=torch.float64),
        config=APOConfig(beta=0.3, importance_sampling_level="sequence", kl_bias_correction=True),
    )
    advantages = torch.randn(3, generator=gen, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        if chunk is not None:  # several chunks of whole sequences
            patch.setattr(plan, "plan_sweep", forced_plan(chunk, 7))
        ours, our_grads = loss_and_grads(
            functools.partial(apo_loss, sweep=sweep, backend=backend), problem, targets, mask, advantages, kwargs
        )
    ref, ref_grads = loss_and_grads(reference.apo_loss, problem, targets, mask, advantages, kwargs)
    assert ours.metrics["one_pass"] == (sweep == "one-pass")
    assert_close(ours.loss, ref.loss, TOLERANCE[torch.float64], "loss")
    for g, r in zip(our_grads, ref_grads):
        assert_close(g, r, TOLERANCE[torch.float64], "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_inputs_match_the_float64_reference(dtype):
    problem = make_linear_problem(4 * 9, 24, 301, seed=11, temperature=0.7, dtype=dtype)
    targets = problem.targets.view(4, 9)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3] = False
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(4, generator=gen)
    ref_logps = -5 + torch.randn(4, 9, generator=gen)
    kwargs = dict(
        ref_logps=ref_logps, kl_weights=torch.rand(4, generator=gen), config=APOConfig(temperature=0.7, beta=0.1)
    )
    ours, grads = loss_and_grads(apo_loss, problem, targets, mask, adv, kwargs)
    exact, exact_grads = loss_and_grads(reference.apo_loss, problem.upcast(), targets, mask, adv.double(), kwargs)
    assert ours.loss.dtype == torch.float32 and grads[0].dtype == dtype and grads[1].dtype == dtype
    tol = TOLERANCE[dtype]
    assert_close(ours.loss, exact.loss, tol, "loss")
    assert_close(ours.logps, exact.logps, tol, "logps")
    for g, e in zip(grads, exact_grads):
        assert_close(g, e, tol, "grad")


def test_gradcheck_through_the_whole_loss():
    p = make_linear_problem(2 * 3, 4, 9, seed=5, with_bias=True).leaves()
    targets = p.targets.view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([0.7, -1.1], dtype=torch.float64)
    ref = torch.full((2, 3), -2.0, dtype=torch.float64)
    old = torch.full((2, 3), -2.3, dtype=torch.float64)
    cfg = APOConfig(beta=0.2, entropy_coef=0.1, eps_high=10.0, eps_low=0.9)  # wide clip: a smooth region
    fn = lambda h, w, b: (
        apo_loss(
            h.view(2, 3, 4),
            w,
            targets,
            mask,
            adv,
            bias=b,
            ref_logps=ref,
            old_logps=old,  # noqa
            config=cfg,
        ).loss
    )
    assert torch.autograd.gradcheck(fn, (p.hidden, p.weight, p.bias))


def test_flat_inputs_are_one_sequence():
    problem = make_linear_problem(10, 6, 21, seed=2)
    mask = torch.ones(10, dtype=torch.bool)
    mask[7:] = False
    adv = torch.linspace(-1, 1, 10, dtype=torch.float64)
    ref_logps = torch.full((10,), -3.0, dtype=torch.float64)
    flat = apo_loss(problem.hidden, problem.weight, problem.targets, mask, adv, ref_logps=ref_logps)
    batched = apo_loss(
        problem.hidden[None], problem.weight, problem.targets[None], mask[None], adv[None], ref_logps=ref_logps[None]
    )
    assert flat.logps.shape == (10,)
    torch.testing.assert_close(flat.loss, batched.loss)


def test_fully_masked_batch_gives_zero_loss_and_zero_gradients():
    p = make_linear_problem(6, 5, 13, seed=3).leaves()
    out = apo_loss(
        p.hidden.view(2, 3, 5),
        p.weight,
        torch.full((2, 3), -100),
        torch.zeros(2, 3),
        torch.ones(2),
        ref_logps=torch.zeros(2, 3),
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(p.hidden.grad == 0) and torch.all(p.weight.grad == 0)


def test_view_r1_defaults_end_to_end():
    """Group stage + loss with the released defaults equal the same pipeline on the reference."""
    G, T, D, V = 4, 6, 8, 40
    problem = make_linear_problem(2 * G * T, D, V, seed=9)
    rewards = torch.tensor([1.5, 0.5, 0.0, 1.0, 0.0, 0.5, 1.5, 0.0])
    lengths = torch.tensor([6, 3, 5, 2, 6, 6, 1, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    groups = group_advantages(rewards, group_size=G, lengths=lengths)
    assert (groups.kl_weights < 1).any() and (groups.stcr_weights > 0).any()  # both APO parts are active
    ref_logps = torch.randn(2 * G, T, dtype=torch.float64) - 3
    args = (problem.targets.view(2 * G, T), mask, groups.advantages.double())
    kwargs = dict(kl_weights=groups.kl_weights.double(), ref_logps=ref_logps)
    ours = apo_loss(problem.hidden.view(2 * G, T, D), problem.weight, *args, **kwargs)
    ref = reference.apo_loss(problem.hidden.view(2 * G, T, D), problem.weight, *args, **kwargs)
    assert_close(ours.loss, ref.loss, 1e-12, "loss")


def test_outputs_are_detached_copies():
    p = make_linear_problem(4, 3, 7, seed=1).leaves()
    out = apo_loss(
        p.hidden.view(1, 4, 3),
        p.weight,
        p.targets.view(1, 4),
        torch.ones(1, 4),
        torch.ones(1),
        ref_logps=torch.zeros(1, 4),
    )
    out.logps.fill_(0.0)
    out.entropy.fill_(0.0)
    out.loss.backward()  # editing the returned tensors must not break or change the backward
    assert not out.logps.requires_grad and all(not v.requires_grad for v in out.metrics.values())
    assert torch.isfinite(p.hidden.grad).all()


# --- bad input ----------------------------------------------------------------------------------------


def _good():
    B, T, D, V = 2, 3, 4, 5
    return dict(
        hidden=torch.randn(B, T, D),
        weight=torch.randn(V, D),
        targets=torch.randint(0, V, (B, T)),
        mask=torch.ones(B, T),
        advantages=torch.randn(B),
        ref_logps=torch.randn(B, T),
    )


BAD_INPUTS = [
    (dict(hidden=torch.randn(2, 3)), ValueError, r"mask must have shape hidden.shape\[:-1\] = \(2,\)"),
    (dict(hidden=torch.randn(2, 3, 4, 5)), ValueError, r"hidden must have shape \(B, T, D\) or \(N, D\)"),
    (dict(hidden=torch.randint(0, 3, (2, 3, 4))), TypeError, "hidden must have a floating-point dtype"),
    (dict(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
    (dict(weight=torch.randn(5, 3)), ValueError, r"weight must have shape \(V, D\) = \(V, 4\)"),
    (dict(targets=torch.full((2, 3), 5)), ValueError, r"targets must lie in \[0, 5\)"),
    (dict(targets=torch.full((2, 3), -1)), ValueError, r"targets must lie in \[0, 5\)"),
    (dict(targets=torch.zeros(2, 3)), TypeError, "targets must have an int32 or int64 dtype"),
    (dict(mask=torch.ones(3, 2)), ValueError, r"mask must have shape hidden.shape\[:-1\]"),
    (dict(mask=torch.full((2, 3), 2.0)), ValueError, "mask must hold only 0/1"),
    (dict(advantages=torch.randn(3)), ValueError, r"advantages must have shape \(B,\) = \(2,\) or targets.shape"),
    (dict(advantages=torch.tensor([1.0, float("nan")])), ValueError, "advantages contains NaN"),
    (dict(advantages=torch.tensor([1, 2])), TypeError, "advantages must have a floating-point dtype"),
    (dict(kl_weights=-torch.ones(2)), ValueError, "kl_weights must lie in"),
    (dict(ref_logps=None), ValueError, "ref_logps is required when config.beta > 0"),
    (dict(ref_logps=torch.randn(2, 4)), ValueError, r"ref_logps must have shape targets.shape"),
    (dict(old_logps=torch.full((2, 3), float("inf"))), ValueError, "old_logps contains NaN or infinite values"),
    (dict(hidden=torch.full((2, 3, 4), float("nan"))), ValueError, "hidden contains NaN"),
    (dict(weight=torch.full((5, 4), float("inf"))), ValueError, "weight contains NaN"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(V,\)"),
    (dict(num_tokens=0), ValueError, "num_tokens must be a finite positive number"),
    (dict(num_sequences=torch.tensor([1.0, 2.0])), ValueError, "num_sequences must be a positive scalar"),
    (dict(config=dict(beta=0.1)), TypeError, "config must be an APOConfig"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'torch', 'triton'\)"),
    (dict(sweep="fast"), ValueError, r"sweep must be one of \('auto', 'one-pass', 'two-pass'\)"),
    (
        dict(hidden=torch.randn(2, 3, 4, requires_grad=True), sweep="one-pass", workspace_bytes=50),
        ValueError,
        r"sweep='one-pass' needs workspace_bytes >= ",
    ),
]


@pytest.mark.parametrize("override, error, match", BAD_INPUTS)
def test_bad_input_raises_a_clear_error_naming_the_argument(override, error, match):
    kwargs = {**_good(), **override}
    with pytest.raises(error, match=match):
        apo_loss(**kwargs)


def test_masked_positions_may_hold_any_target_and_any_hidden_value():
    kwargs = _good()
    kwargs["mask"][1, 2] = 0
    kwargs["targets"][1, 2] = -100
    kwargs["hidden"][1, 2] = float("nan")
    kwargs["ref_logps"][1, 2] = float("-inf")
    out = apo_loss(**kwargs)
    assert torch.isfinite(out.loss)


def test_torch_compile_of_a_training_step_matches_eager():
    """Graph breaks are allowed around the input checks and the masked-row compaction; results must not move."""
    p = make_linear_problem(2 * 5, 8, 37, seed=6, dtype=torch.float32)
    targets = p.targets.view(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv, ref = torch.tensor([0.5, -1.0]), torch.full((2, 5), -3.0)

    def step(h, w):
        return apo_loss(h.view(2, 5, 8), w, targets, mask, adv, ref_logps=ref).loss

    assert_compiled_matches_eager(step, p)


def test_value_checks_work_in_slabs(monkeypatch):
    """Finiteness is checked a slab of rows at a time (bounded temporaries), and still finds one bad value."""
    from apo_kernels import inputs

    monkeypatch.setattr(inputs, "CHECK_CHUNK", 7)
    kwargs = _good()
    kwargs["weight"][4, 3] = float("inf")  # in the last slab of weight rows
    with pytest.raises(ValueError, match="weight contains NaN"):
        apo_loss(**kwargs)
    kwargs = _good()
    kwargs["mask"][1, 2] = 0
    kwargs["hidden"][1, 2, 0] = float("nan")  # masked: allowed
    assert torch.isfinite(apo_loss(**kwargs).loss)
    kwargs["hidden"][1, 1, 3] = float("nan")  # unmasked, in a later slab
    with pytest.raises(ValueError, match="hidden contains NaN or infinite values at unmasked positions"):
        apo_loss(**kwargs)


# --- one pass and two -------------------------------------------------------------------------------

SWEEPS = ["one-pass", "two-pass"]


@pytest.mark.interpreter
@settings(max_examples=30)
@given(case=loss_cases(), chunk=st.sampled_from([None, 2]))
def test_triton_one_pass_matches_reference_in_float64(case, chunk):
    """The Triton row pass and epilogue (interpreter) in one pass (two with entropy masking, which "auto"
    chooses), forced chunks and 7-column slabs."""
    sweep = "one-pass" if case[-1]["config"].top_entropy_quantile == 1 else "auto"
    with pytest.MonkeyPatch.context() as patch:
        if chunk is not None:
            patch.setattr(plan, "plan_sweep", forced_plan(chunk, 7))
        ours, our_grads = loss_and_grads(functools.partial(apo_loss, sweep=sweep, backend="triton"), *case)
    ref, ref_grads = loss_and_grads(reference.apo_loss, *case)
    tol = TOLERANCE[torch.float64]
    assert ours.metrics["one_pass"] == (sweep == "one-pass")
    assert_close(ours.loss, ref.loss, tol, "loss")
    assert_close(ours.logps, ref.logps, tol, "logps")
    for g, r in zip(our_grads, ref_grads):
        assert_close(g, r, tol, "grad")


def _masked_problem(dtype, profile="block_offsets"):
    problem = make_linear_problem(
        4 * 9, 24, 301, seed=11, profile=profile, with_bias=True, temperature=0.7, dtype=dtype
    )
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3] = False
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(4, generator=gen)
    with torch.no_grad():  # old and reference log-probs near the current ones (logits are offset by up to +-30)
        exact = (
            reference.linear_logprobs(
                problem.upcast().hidden,
                problem.upcast().weight,
                problem.targets,
                bias=problem.upcast().bias,
                temperature=0.7,
            )[0]
            .float()
            .view(4, 9)
        )
    kwargs = dict(
        ref_logps=exact + torch.randn(4, 9, generator=gen),
        old_logps=exact + 0.3 * torch.randn(4, 9, generator=gen),
        kl_weights=torch.rand(4, generator=gen),
        config=APOConfig(temperature=0.7, beta=0.1, entropy_coef=0.02, loss_agg_mode="seq-mean-token-sum"),
    )
    return problem, problem.targets.view(4, 9), mask, adv, kwargs


@pytest.mark.parametrize("profile", ["block_offsets", "all_negative"])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_one_pass_in_every_precision_matches_the_float64_reference(backend, dtype, chunk, profile):
    """16-bit operands (dz rounded, d_hidden centered: all_negative has a weight column of -200) and float32,
    bias, temperature, masks, entropy bonus; ``chunk`` forces 4-token chunks of 64-column slabs."""
    problem, targets, mask, adv, kwargs = _masked_problem(dtype, profile)
    exact, exact_grads = loss_and_grads(reference.apo_loss, problem.upcast(), targets, mask, adv.double(), kwargs)
    with pytest.MonkeyPatch.context() as patch:
        if chunk is not None:
            patch.setattr(plan, "plan_sweep", forced_plan(chunk, 64))
        ours, grads = loss_and_grads(
            functools.partial(apo_loss, backend=backend, sweep="one-pass"), problem, targets, mask, adv, kwargs
        )
    assert ours.metrics["one_pass"] == 1 and ours.loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    tol = TOLERANCE[dtype]
    assert_close(ours.logps, exact.logps, tol, "logps")
    if dtype == torch.float32 and profile == "all_negative":
        # logits of -200 h: float32 log-probs are ~4e-6 off in absolute terms, and exp(logp - old) turns
        # that into ~4e-5 relative error of the loss and its gradients (two passes: the same)
        tol = 1e-4
    assert_close(ours.loss, exact.loss, tol, "loss")
    for name, g, e in zip(("d_hidden", "d_weight", "d_bias"), grads, exact_grads):
        assert_close(g, e, tol, name)


def _loss_fn(problem, targets, mask, adv, kwargs, **options):
    return lambda hidden, weight, bias: apo_loss(
        hidden.view(*targets.shape, -1), weight, targets, mask, adv, bias=bias, **kwargs, **options
    )


@pytest.mark.parametrize("sweep", SWEEPS)
def test_a_scaled_loss_and_a_second_backward_under_retain_graph_give_consistent_gradients(sweep):
    problem, targets, mask, adv, kwargs = _masked_problem(torch.float32)
    fn = _loss_fn(problem, targets, mask, adv, kwargs, sweep=sweep)
    p = problem.leaves()
    once = torch.autograd.grad(fn(p.hidden, p.weight, p.bias).loss, [p.hidden, p.weight, p.bias])
    q = problem.leaves()
    loss = fn(q.hidden, q.weight, q.bias).loss
    (2.5 * loss).backward(retain_graph=True)
    loss.backward()
    for name, g, e in zip(("d_hidden", "d_weight", "d_bias"), (q.hidden.grad, q.weight.grad, q.bias.grad), once):
        assert_close(g, 3.5 * e, 1e-6, name)


def test_gradients_are_computed_only_when_needed(monkeypatch):
    """No gradient is needed under ``torch.no_grad`` or for inputs that do not require one: only the forward
    sweep runs, even when one pass is asked for."""
    problem, targets, mask, adv, kwargs = _masked_problem(torch.float32)
    fn = _loss_fn(problem, targets, mask, adv, kwargs, sweep="one-pass")
    expected = fn(problem.hidden, problem.weight, problem.bias)

    def no_sweep(*args):
        raise AssertionError("the one-pass sweep ran")

    monkeypatch.setattr(driver.OnePassLinearLogprobs, "forward", no_sweep)
    p = problem.leaves()
    with torch.no_grad():
        out = fn(p.hidden, p.weight, p.bias)
    assert out.metrics["one_pass"] == 0 and expected.metrics["one_pass"] == 0
    assert_close(out.loss, expected.loss, 1e-6, "loss")


@pytest.mark.parametrize("sweep", SWEEPS)
def test_frozen_and_tied_heads(sweep):
    """A frozen head gets no weight gradient (its bias and the hidden states do); a head tied to the
    embedding that produced the hidden states gets both gradients."""
    problem, targets, mask, adv, kwargs = _masked_problem(torch.float32)
    fn = _loss_fn(problem, targets, mask, adv, kwargs, sweep=sweep)
    exact_fn = lambda h, w, b: reference.apo_loss(
        h.view(*targets.shape, -1),
        w,
        targets,
        mask,
        adv,
        bias=b,  # noqa
        **kwargs,
    )

    p = problem.leaves()
    p.weight.requires_grad_(False)
    got = torch.autograd.grad(fn(p.hidden, p.weight, p.bias).loss, [p.hidden, p.bias])
    assert p.weight.grad is None
    e = problem.leaves()
    e.weight.requires_grad_(False)
    exact = torch.autograd.grad(exact_fn(e.hidden, e.weight, e.bias).loss, [e.hidden, e.bias])
    for name, g, x in zip(("d_hidden", "d_bias"), got, exact):
        assert_close(g, x, 1e-5, name)

    ids = torch.arange(36) * 7 % 301
    no_kl = dict(config=APOConfig(temperature=0.7, beta=0.0, entropy_coef=0.02))  # the hidden states change
    tied = lambda fn, w: torch.autograd.grad(
        fn(torch.tanh(w[ids]).view(*targets.shape, -1), w, targets, mask, adv, **no_kl).loss, [w]
    )[0]
    weight = problem.weight.detach()
    assert_close(
        tied(functools.partial(apo_loss, sweep=sweep), weight.clone().requires_grad_()),
        tied(reference.apo_loss, weight.clone().requires_grad_()),
        1e-5,
        "d_weight (tied)",
    )


def test_one_pass_gradients_belong_to_the_forward_that_ran():
    """An optimizer step between forward and backward: one pass hands out the gradient of the head the
    forward saw; two passes would recompute with the changed head, so autograd refuses."""
    problem, targets, mask, adv, kwargs = _masked_problem(torch.float32)
    p = problem.leaves()
    expected = torch.autograd.grad(
        _loss_fn(problem, targets, mask, adv, kwargs)(p.hidden, p.weight, p.bias).loss, [p.hidden, p.weight]
    )
    for sweep in SWEEPS:
        q = problem.leaves()
        loss = _loss_fn(problem, targets, mask, adv, kwargs, sweep=sweep)(q.hidden, q.weight, q.bias).loss
        with torch.no_grad():
            q.weight.mul_(0.5)
        if sweep == "two-pass":
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
            continue
        loss.backward()
        assert_close(q.hidden.grad, expected[0], 1e-6, "d_hidden")
        assert_close(q.weight.grad, expected[1], 1e-6, "d_weight")


@pytest.mark.parametrize("policy_loss", ["ppo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_one_pass_chunks_keep_sequence_level_ratios_whole(backend, policy_loss):
    """Sequences of 2, 6, 3 and 9 tokens in chunks of at most 9: each chunk's gradients need its sequences'
    whole ratios (a chunk boundary inside a sequence would split its log-ratio sum; VESPO's is its own)."""
    problem, targets, mask, adv, kwargs = _masked_problem(torch.float64)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[0, 2:], mask[1, 6:], mask[2, 3:] = False, False, False
    level = "token" if policy_loss == "vespo" else "sequence"
    kwargs["config"] = APOConfig(
        temperature=0.7,
        beta=0.1,
        policy_loss=policy_loss,
        importance_sampling_level=level,
        loss_agg_mode="token-mean",
        eps_low=0.1,
        eps_high=0.1,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plan, "plan_sweep", forced_plan(4, 50))
        ours, our_grads = loss_and_grads(
            functools.partial(apo_loss, sweep="one-pass", backend=backend), problem, targets, mask, adv, kwargs
        )
    ref, ref_grads = loss_and_grads(reference.apo_loss, problem, targets, mask, adv, kwargs)
    assert ours.metrics["one_pass"] == 1
    assert_close(ours.loss, ref.loss, TOLERANCE[torch.float64], "loss")
    for g, r in zip(our_grads, ref_grads):
        assert_close(g, r, TOLERANCE[torch.float64], "grad")
