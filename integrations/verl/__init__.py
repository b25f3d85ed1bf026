"""APO for verl (0.9): importing this package plugs APO and the fused kernels into verl.

Its import calls :func:`install` (the one place with side effects on verl; the submodules only define),
which registers, through verl's own extension points,

- the advantage estimator ``algorithm.adv_estimator=apo`` (:mod:`.advantage`),
- the actor loss ``actor_rollout_ref.actor.policy_loss.loss_mode=apo`` (:mod:`.loss`),
- the fused log-prob backend ``actor_rollout_ref.model.fused_kernel_options.impl_backend=apo`` with
  ``use_fused_kernels=True`` (:mod:`.fused_forward`).

Every process of a run must import it: set ``VERL_USE_EXTERNAL_MODULES=apo_kernels.integrations.verl``,
which ``import verl`` honours, in the launching shell and in Ray's ``runtime_env`` (see
``examples/verl/run_qwen2_5_vl_3b_apo.sh`` and ``integrations/verl/README.md``). Importing it changes
nothing for runs that do not select the three names above, except that verl's Qwen2-VL text-only branch works
under transformers 5 (:func:`.fused_forward.get_input_embeds`).
"""

try:
    import verl  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("apo_kernels.integrations.verl needs verl: pip install 'apo-kernels[verl]'") from error

from verl.models.transformers import monkey_patch
from verl.models.transformers import qwen2_vl as verl_qwen2_vl
from verl.workers import engine_workers
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from . import advantage, fused_forward, loss
from .advantage import ESTIMATOR_NAME, compute_apo_advantage, group_stage_config, uid_group_ids
from .fused_forward import BACKEND_NAME, causal_lm_forward, qwen2_vl_causal_lm_forward
from .loss import KL_AGG_MODE_ENV, LOSS_MODE, LOSS_MODES, apo_actor_loss, loss_stage_config, ppo_loss_with_apo


def install() -> None:
    """Plug APO into verl: every side effect of the adapter, here only (idempotent: a second call leaves the
    same state). The package's import calls it.

    - verl's advantage-estimator registry: ``apo`` (:func:`.advantage.register_estimator`);
    - verl's policy-loss registry: every ``LOSS_MODES`` name (:func:`.loss.register_policy_losses`), so that
      verl's config accepts them;
    - ``engine_workers.ppo_loss``: the name ``ActorRolloutRefWorker.init_model`` binds into the loss it
      passes to ``set_loss_fn``;
    - ``monkey_patch.patch_forward_with_backends``: verl's fused-forward switch, called at model build;
    - ``FSDPEngineWithLMHead.prepare_model_inputs``: adds the response mask the apo forward scores;
    - ``FSDPEngineWithLMHead.forward_step`` and ``prepare_model_outputs``: on APO actor updates, the forward
      computes the loss in one pass, and the loss reaches the loss function;
    - verl's Qwen2-VL ``_get_input_embeds``: its text-only branch fails under transformers 5
      (:func:`.fused_forward.get_input_embeds`), with fused kernels or without.

    The patched functions fall back to verl's originals, which :mod:`.fused_forward` and :mod:`.loss` keep
    from their import, before any patch.
    """
    advantage.register_estimator()
    loss.register_policy_losses()
    engine_workers.ppo_loss = ppo_loss_with_apo
    monkey_patch.patch_forward_with_backends = fused_forward.patch_forward_with_backends
    FSDPEngineWithLMHead.prepare_model_inputs = fused_forward.prepare_model_inputs
    FSDPEngineWithLMHead.forward_step = fused_forward.forward_step
    FSDPEngineWithLMHead.prepare_model_outputs = fused_forward.prepare_model_outputs
    verl_qwen2_vl._get_input_embeds = fused_forward.get_input_embeds


install()

__all__ = [
    "BACKEND_NAME",
    "ESTIMATOR_NAME",
    "KL_AGG_MODE_ENV",
    "LOSS_MODE",
    "LOSS_MODES",
    "apo_actor_loss",
    "causal_lm_forward",
    "compute_apo_advantage",
    "group_stage_config",
    "install",
    "loss_stage_config",
    "ppo_loss_with_apo",
    "qwen2_vl_causal_lm_forward",
    "uid_group_ids",
]
