"""The TRL adapter in more than one process (gloo ranks on CPU), against one process on the same global batch:
the APO head under FSDP2 ``fully_shard`` (tied or untied own-unit LM head, float32 and bf16 mixed precision)
and with a tensor-parallel head; ``APOTrainer`` steps under DDP and DeepSpeed ZeRO-3 through torchrun."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

from apo_kernels import APOConfig  # noqa: E402
from apo_kernels.integrations.trl import APOLossInputs, add_apo_head  # noqa: E402
from tests.distributed import free_port, run_ranks  # noqa: E402
from tests.strategies import relative_error  # noqa: E402
from tests.tiny_models import tiny_qwen2_config  # noqa: E402

VOCAB, BATCH, LENGTH, COMPLETION = 151, 4, 10, 5
CONFIG = APOConfig(beta=0.04, temperature=0.9, eps_low=0.2, eps_high=0.28, entropy_coef=0.01)
FSDP_CASES = [("untied", "fp32"), ("tied", "fp32"), ("untied", "bf16"), ("tied", "bf16")]
# float32: the FSDP2 run sums the same numbers in another order. bf16: the ranks' half-batch gradients are
# rounded to bf16 before the float32 reduction, the one process's whole-batch ones once (the bug this
# guards against, an unreduced head gradient, is off by 0.2 to 1).
TOLERANCE = {"fp32": 1e-6, "bf16": 2e-2}
# Log-probs come from the same bf16 operands in both runs (3e-5 apart); a head left in float32 instead of
# cast to the policy's bf16, as FSDP2's forward would, is 3e-4 apart.
LOGP_TOLERANCE = {"fp32": 1e-6, "bf16": 1e-4}


def tiny_model(tied: bool, vocab: int = VOCAB) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(config)
    if not tied:
        with torch.no_grad():  # an untied head that differs from the embedding
            model.lm_head.weight.copy_(torch.randn(vocab, 32) * 0.2)
    add_apo_head(model)
    return model


def batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    mask = torch.rand(BATCH, COMPLETION, generator=gen) > 0.2
    mask[:, 0] = True
    return dict(
        input_ids=input_ids,
        mask=mask,
        advantages=torch.randn(BATCH, generator=gen),
        kl_weights=torch.rand(BATCH, generator=gen) * 2,
        old_logps=-torch.rand(BATCH, COMPLETION, generator=gen) * 5,
        ref_logps=-torch.rand(BATCH, COMPLETION, generator=gen) * 5,
    )


def loss_and_grads(model, rows, world_size, dtype):
    """Loss, per-token log-probs and ``{name: full gradient}`` of ``model`` on ``rows`` of the batch; the token
    count of the whole batch, shared over ``world_size`` ranks, normalizes (the ranks' gradients are averaged)."""
    b = {k: v[rows] for k, v in batch().items()}
    apo_inputs = APOLossInputs(
        targets=b["input_ids"][:, -COMPLETION:],
        mask=b["mask"],
        advantages=b["advantages"],
        kl_weights=b["kl_weights"],
        old_logps=b["old_logps"],
        ref_logps=b["ref_logps"],
        num_tokens=batch()["mask"].sum().item() / world_size,
        num_sequences=None,
        config=CONFIG,
    )
    out = model(input_ids=b["input_ids"], apo_inputs=apo_inputs)
    out.loss.backward()
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g
    grads = {name: full(p.grad).float() for name, p in model.named_parameters()}
    return out.loss.detach().float(), out.log_probs.float(), grads


def fsdp2_on_rank(rank, world_size):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    results = []
    for head, precision in FSDP_CASES:
        model = tiny_model(head == "tied")
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        if head == "untied":  # its own unit, as accelerate wraps it
            fully_shard(model.lm_head, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        per_rank = BATCH // world_size
        results.append(loss_and_grads(model, slice(rank * per_rank, (rank + 1) * per_rank), world_size, precision))
    return results


@pytest.fixture(scope="module")
def fsdp2_results():
    return run_ranks(fsdp2_on_rank, 2)


@pytest.mark.parametrize("case", range(len(FSDP_CASES)), ids=["-".join(c) for c in FSDP_CASES])
def test_fsdp2_matches_one_process(case, fsdp2_results):
    """Loss (the mean of the ranks'), each rank's log-probs and every parameter's gradient (LM head included)
    equal one process's on the whole batch; bf16 mixed precision against a bf16 copy of the model."""
    head, precision = FSDP_CASES[case]
    model = tiny_model(head == "tied")
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    loss, logps, grads = loss_and_grads(model, slice(None), 1, precision)
    tol = TOLERANCE[precision]
    ranks = [results[case] for results in fsdp2_results]
    assert relative_error(torch.stack([r[0] for r in ranks]).mean(), loss) < tol
    assert relative_error(torch.cat([r[1] for r in ranks]), logps) < LOGP_TOLERANCE[precision]
    errors = {name: relative_error(ranks[0][2][name], g) for name, g in grads.items()}
    head_name = "lm_head.weight" if head == "untied" else "model.embed_tokens.weight"
    assert head_name in errors
    assert max(errors.values()) < tol, {k: f"{v:.2e}" for k, v in errors.items() if v >= tol}
    for rank in ranks[1:]:
        assert all(torch.equal(rank[2][name], ranks[0][2][name]) for name in grads), "ranks hold different gradients"


def inputs_seen_under_bf16_fsdp2(rank, world_size):
    """The loss inputs ``apo_loss`` receives through an FSDP2 root with bf16 mixed precision, whose forward hook
    casts the floating tensors of its arguments (dataclass fields included) to the policy's dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from apo_kernels.integrations.trl import lm_head

    model = tiny_model(tied=False)
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    seen = {}

    def recording_apo_loss(hidden, weight, targets, mask, advantages, **kwargs):
        seen.update(advantages=advantages, **{k: kwargs[k] for k in ("kl_weights", "old_logps", "ref_logps")})
        return apo_loss(hidden, weight, targets, mask, advantages, **kwargs)

    apo_loss, lm_head.apo_loss = lm_head.apo_loss, recording_apo_loss
    loss_and_grads(model, slice(None), 1, "bf16")
    return seen


def test_loss_inputs_keep_their_precision_under_fsdp2_mixed_precision():
    """Old and reference log-probs, advantages and KL weights reach apo_loss as the trainer made them (float32),
    not rounded to the bf16 of FSDP2's forward inputs (1e-2 off at log-probs of -3: ratios and KL 1 % off)."""
    seen = run_ranks(inputs_seen_under_bf16_fsdp2, 1)[0]
    for name, value in seen.items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, batch()[name]), name


def dtensor_head_on_rank(rank, world_size):
    """The whole batch on every rank, the untied head's vocabulary rows split over the ranks as a ``Shard(0)``
    DTensor (``torch.distributed.tensor``'s row-wise sharding): apo_loss runs vocabulary-parallel."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = tiny_model(tied=False)
    mesh = init_device_mesh("cpu", (world_size,))
    model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
    return loss_and_grads(model, slice(None), 1, "fp32")


def transformers_tp_head_on_rank(rank, world_size, model_dir):
    """The head loaded with a transformers ``tp_plan`` that splits it column-wise (76 rows of 152 per rank):
    transformers < 5.18 leaves plain local blocks on the module (the adapter finds the group through the plan
    transformers records), later versions ``Shard(0)`` DTensors (apo_loss's own vocabulary-parallel mode)."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    model = Qwen2ForCausalLM.from_pretrained(model_dir, tp_plan={"lm_head": "colwise_gather_output"})
    weight = model.lm_head.weight
    assert (weight.to_local() if isinstance(weight, DTensor) else weight).shape[0] == TP_PLAN_VOCAB // 2
    add_apo_head(model)
    return loss_and_grads(model, slice(None), 1, "fp32")


# transformers >= 5.18 needs a vocabulary that the TP size divides to gather a column-wise head's output
TP_PLAN_VOCAB = 152


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-untied")
    tiny_model(tied=False, vocab=TP_PLAN_VOCAB).save_pretrained(path)
    return path


@pytest.mark.parametrize("layout", ["dtensor", "transformers-tp-plan"])
def test_tensor_parallel_head_matches_one_process(layout, untied_model_dir):
    """Loss, log-probs and every gradient on both ranks equal one process's; the head's gradient is each
    rank's block of it."""
    vocab = VOCAB if layout == "dtensor" else TP_PLAN_VOCAB  # the DTensor head: uneven blocks, 76 and 75
    loss, logps, grads = loss_and_grads(tiny_model(tied=False, vocab=vocab), slice(None), 1, "fp32")
    if layout == "dtensor":
        per_rank = run_ranks(dtensor_head_on_rank, 2)
    else:
        per_rank = run_ranks(transformers_tp_head_on_rank, 2, str(untied_model_dir))
    if per_rank[0][2]["lm_head.weight"].shape[0] != vocab:  # plain blocks: each rank holds its block's gradient
        head_grad = torch.cat([grads["lm_head.weight"] for _, _, grads in per_rank])
        for _, _, rank_grads in per_rank:
            rank_grads["lm_head.weight"] = head_grad
    for rank_loss, rank_logps, rank_grads in per_rank:
        assert relative_error(rank_loss, loss) < 1e-6
        assert relative_error(rank_logps, logps) < 1e-6
        errors = {name: relative_error(rank_grads[name], g) for name, g in grads.items()}
        assert max(errors.values()) < 1e-6, {k: f"{v:.2e}" for k, v in errors.items() if v >= 1e-6}


# APOTrainer end to end: torchrun (DDP, DeepSpeed ZeRO-3) against one process, see distributed_train.py.
TRAIN_SCRIPT = Path(__file__).with_name("distributed_train.py")


@pytest.fixture(scope="module")
def tiny_vl_dirs(tmp_path_factory):
    """The tiny Qwen2.5-VL (tied head, as Qwen2.5-VL-3B) and a copy with an untied head of its own."""
    from examples import trl_apo_qwen2_5_vl as example

    dirs = {}
    for head in ("tied", "untied"):
        model = example.build_tiny_model(example.build_tiny_processor(), seed=0)
        if head == "untied":
            for config in (model.config, model.config.get_text_config()):
                config.tie_word_embeddings = False
            with torch.no_grad():
                model.lm_head.weight = torch.nn.Parameter(
                    model.lm_head.weight + 0.05 * torch.randn_like(model.lm_head.weight)
                )
        dirs[head] = tmp_path_factory.mktemp(f"tiny-vl-{head}")
        model.save_pretrained(dirs[head])
    return dirs


def train(model_dir, out_dir, *extra, processes=1):
    out = Path(out_dir) / f"{processes}-{'-'.join(extra) or 'plain'}.pt"
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    )
    run = subprocess.run(
        [*launcher, str(TRAIN_SCRIPT), str(model_dir), str(out), *extra], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tiny_vl_dirs, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("one-process")
    return {head: train(path, out_dir) for head, path in tiny_vl_dirs.items()}


@pytest.mark.parametrize("head", ["tied", "untied"])
@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_apo_trainer_steps_match_one_process(engine, head, tiny_vl_dirs, one_process, tmp_path):
    """Three SGD steps of APOTrainer (DADS and STCR on, KL against the reference model) on 2 ranks give the
    losses and parameters of one process on the same global batches: the reward gathering and the group
    stage span the ranks, the engine reduces the LM head's gradient (tied or not) with the rest. (Under ZeRO-3
    the head is partitioned, but DeepSpeed has it gathered when the loss reads it, during the model's forward:
    the adapter's own gather is not needed here.)"""
    if engine == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed ZeRO-3 needs deepspeed (the dev extra installs it)")
    got = train(tiny_vl_dirs[head], tmp_path, *(["--zero3"] if engine == "zero3" else []), processes=2)
    assert_same_training(got, one_process[head], head)


def test_entropy_masking_thresholds_over_every_rank(tiny_vl_dirs, tmp_path):
    """top_entropy_quantile's threshold is taken over both ranks' completion tokens (padded differently), as
    GRPOTrainer gathers them, so two ranks train as one process does."""
    options = ["--top-entropy-quantile", "0.5"]
    got = train(tiny_vl_dirs["untied"], tmp_path, *options, processes=2)
    want = train(tiny_vl_dirs["untied"], tmp_path, *options)
    assert_same_training(got, want, "untied")


def assert_same_training(got, want, head):
    assert got["world_size"] == 2 and want["world_size"] == 1
    assert got["advantages"] == want["advantages"], "the ranks did not train on the same data"
    assert any(a != 0 for a in want["advantages"]), "the rewards should vary within groups"
    assert relative_error(torch.tensor(got["losses"]), torch.tensor(want["losses"])) < 1e-6
    assert want["params"].keys() == got["params"].keys()
    errors = {name: relative_error(got["params"][name], p) for name, p in want["params"].items()}
    assert max(errors.values()) < 1e-6, {k: f"{v:.2e}" for k, v in errors.items() if v >= 1e-6}
    assert want["head_name"] == ("lm_head.weight" if head == "untied" else "model.language_model.embed_tokens.weight")
    assert relative_error(want["params"][want["head_name"]], want["initial_head"]) > 1e-3, "the head should move"
