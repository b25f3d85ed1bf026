"""How the kernels are launched (``apo_kernels/kernels/launch.py``): directly in eager mode, on the device of
their tensors."""

import contextlib
import importlib

import pytest
import torch

from apo_kernels import APOConfig, apo_loss, fused_linear_logprobs
from apo_kernels.kernels.apo_epilogue import INPUTS, EpilogueParams, launch_apo_epilogue_terms
from apo_kernels.kernels.logit_grad import launch_logit_grad
from apo_kernels.kernels.logprob_fold import launch_logprob_fold
from tests.strategies import make_linear_problem

pytestmark = [pytest.mark.interpreter, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


class OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sweep", ["one-pass", "two-pass"])
def test_eager_launches_skip_the_custom_ops(sweep):
    """G10: a custom op's dispatch costs ~20 us a launch in eager mode, more than a row kernel on a small chunk;
    eager calls on real tensors launch directly (the ops stay for torch.compile and meta tensors)."""
    p = make_linear_problem(12, 8, 300, seed=0, dtype=torch.float32).leaves()
    shape = (3, 4)
    with OpNames() as seen:
        logps, _ = fused_linear_logprobs(p.hidden, p.weight, p.targets, backend="triton", return_entropy=True)
        out = apo_loss(
            p.hidden.view(*shape, -1),
            p.weight,
            p.targets.view(shape),
            torch.ones(shape),
            torch.randn(3),
            config=APOConfig(beta=0.0, entropy_coef=0.01),
            backend="triton",
            sweep=sweep,
        )
        (logps.sum() + out.loss).backward()
    assert "aten::addmm_" in seen.names or "aten::addmm" in seen.names  # the mode sees the sweep's ops
    assert not any(name.startswith("apo_kernels::") for name in seen.names), sorted(seen.names)


class OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:1`` (enough for the launchers' device guard)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_every_launcher_runs_its_kernel_on_its_tensors_device(monkeypatch):
    """G7: Triton launches on the current CUDA device's stream; with the head on ``cuda:1`` and ``cuda:0``
    current (one process, several GPUs) each launch must happen inside ``torch.cuda.device(cuda:1)``."""
    entered, launches = [], []

    @contextlib.contextmanager
    def device(where):
        entered.append(torch.device(where))
        try:
            yield
        finally:
            entered.pop()

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel.fn.__name__, list(entered)))

    monkeypatch.setattr(torch.cuda, "device", device)
    fold_module = importlib.import_module("apo_kernels.kernels.logprob_fold")
    monkeypatch.setattr(type(fold_module._logprob_fold_kernel), "run", record)  # interpreted or compiled alike
    # (the package exports a function of the module's name)
    epilogue_module = importlib.import_module("apo_kernels.kernels.apo_epilogue")
    monkeypatch.setattr(epilogue_module, "_params_on", lambda values, dtype, where: torch.tensor(values, dtype=dtype))
    rows, cols = 3, 5
    logits = torch.zeros(rows, cols).as_subclass(OnCuda1)
    state, targets, inv_temp = torch.zeros(4, rows), torch.zeros(rows, dtype=torch.long), torch.ones(1)
    launch_logprob_fold(logits, state, targets, 0, inv_temp, None, 16, 1)
    launch_logit_grad(
        logits, None, None, torch.zeros(3, rows), targets, torch.ones(rows), None, 0, inv_temp, None, None, 16, 1
    )
    bt = torch.zeros(2, 3).as_subclass(OnCuda1)
    outs = [torch.empty(2, 3) for _ in range(5)]
    launch_apo_epilogue_terms([bt] * len(INPUTS), outs, *EpilogueParams.from_config(APOConfig()).op_args())
    assert [name for name, _ in launches] == ["_logprob_fold_kernel", "_logit_grad_kernel", "_apo_epilogue_kernel"]
    for name, inside in launches:
        assert inside and inside[-1] == torch.device("cuda", 1), f"{name} launched outside cuda:1's device guard"
