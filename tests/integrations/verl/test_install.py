"""``install()`` is the adapter's one side-effect site on verl: the submodules only define, the package's import
calls ``install()``, and ``VERL_USE_EXTERNAL_MODULES`` (how every process of a run loads the adapter) ends with
everything installed. Fresh interpreters, so that verl's registries and patches start as verl left them."""

import pytest

pytest.importorskip("verl")

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import apo_kernels.integrations.verl as apo_verl  # noqa: E402

ROOT = Path(__file__).parents[3]

# verl's extension points and what install() must have put there.
PRELUDE = """
from verl.models.transformers import monkey_patch, qwen2_vl
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
from verl.workers import engine_workers
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

def state():
    return (dict(POLICY_LOSS_REGISTRY), dict(ADV_ESTIMATOR_REGISTRY), engine_workers.ppo_loss,
            monkey_patch.patch_forward_with_backends, FSDPEngineWithLMHead.prepare_model_inputs,
            FSDPEngineWithLMHead.forward_step, FSDPEngineWithLMHead.prepare_model_outputs, qwen2_vl._get_input_embeds)

def assert_installed(before, package):
    (policy_losses, estimators, ppo_loss, patch_forward, prepare_inputs, forward_step, prepare_outputs,
     input_embeds) = state()
    modes = set(package.LOSS_MODES)
    assert modes >= {"apo", "apo_cispo", "apo_sapo", "apo_gspo", "apo_gpg", "apo_dro", "apo_dppo_tv", "apo_dppo_kl"}
    unavailable = package.loss.apo_policy_loss_unavailable
    assert {name: policy_losses[name] for name in modes} == dict.fromkeys(modes, unavailable)
    assert {k: v for k, v in policy_losses.items() if k not in modes} == before[0]  # verl's own untouched
    assert estimators == {**before[1], "apo": package.compute_apo_advantage}
    assert ppo_loss is package.ppo_loss_with_apo
    assert patch_forward is package.fused_forward.patch_forward_with_backends
    assert prepare_inputs is package.fused_forward.prepare_model_inputs
    assert forward_step is package.fused_forward.forward_step
    assert prepare_outputs is package.fused_forward.prepare_model_outputs
    assert input_embeds is package.fused_forward.get_input_embeds
"""

# The package module is created but not executed: its submodules import without its __init__, i.e. install().
SUBMODULES_THEN_PACKAGE = (
    PRELUDE
    + """
import importlib.util, sys
verl_state = state()
assert not set(verl_state[0]) & {"apo", "apo_cispo"} and "apo" not in verl_state[1]
spec = importlib.util.find_spec("apo_kernels.integrations.verl")
package = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = package
from apo_kernels.integrations.verl import advantage, fused_forward, loss
assert state() == verl_state, "importing the submodules changed verl's registries or functions"
assert fused_forward.verl_patch_forward_with_backends is verl_state[3]  # the fallbacks are verl's
assert fused_forward.verl_prepare_model_inputs is verl_state[4]
assert fused_forward.verl_forward_step is verl_state[5]
assert fused_forward.verl_prepare_model_outputs is verl_state[6]
assert fused_forward.verl_get_input_embeds is verl_state[7]
spec.loader.exec_module(package)  # the package's import: install()
assert_installed(verl_state, package)
installed = state()
package.install()
package.install()
assert state() == installed, "a second install() changed the state"
print("ok")
"""
)

# How a run loads it: `import verl` imports the modules named in VERL_USE_EXTERNAL_MODULES.
EXTERNAL_MODULES = (
    """
import verl, sys
package = sys.modules["apo_kernels.integrations.verl"]
"""
    + PRELUDE
    + """
import verl.trainer.ppo.core_algos as core_algos
verl_names = {name: fn for name, fn in core_algos.POLICY_LOSS_REGISTRY.items() if not name.startswith("apo")}
verl_estimators = {name: fn for name, fn in core_algos.ADV_ESTIMATOR_REGISTRY.items() if name != "apo"}
assert_installed((verl_names, verl_estimators), package)
print("ok")
"""
)


def run_python(code: str, **env) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**environ, **env}, capture_output=True, text=True, timeout=600
    )
    error = result.stderr[result.stderr.rfind("Traceback") :] if "Traceback" in result.stderr else result.stderr
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), error[-4000:]


def test_submodules_install_nothing_and_the_package_import_installs_everything_once():
    run_python(SUBMODULES_THEN_PACKAGE)


def test_verl_external_modules_install_everything():
    run_python(EXTERNAL_MODULES, VERL_USE_EXTERNAL_MODULES="apo_kernels.integrations.verl")


def test_install_again_in_this_process_changes_nothing():
    from verl.models.transformers import monkey_patch, qwen2_vl
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
    from verl.workers import engine_workers
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    def state():
        return (
            dict(POLICY_LOSS_REGISTRY),
            dict(ADV_ESTIMATOR_REGISTRY),
            engine_workers.ppo_loss,
            monkey_patch.patch_forward_with_backends,
            FSDPEngineWithLMHead.prepare_model_inputs,
            FSDPEngineWithLMHead.forward_step,
            FSDPEngineWithLMHead.prepare_model_outputs,
            qwen2_vl._get_input_embeds,
        )

    before = state()
    assert set(apo_verl.LOSS_MODES) <= set(before[0]) and before[1]["apo"] is apo_verl.compute_apo_advantage
    apo_verl.install()
    assert state() == before
