#!/usr/bin/env bash
# APO (arXiv 2506.21655, released View-R1 recipe) on Qwen2.5-VL-3B with verl's own entry point.
#
#   bash examples/verl/run_qwen2_5_vl_3b_apo.sh [extra hydra overrides...]
#
# Needs: NNODES nodes (default 1) of NGPUS GPUs (default 8), verl 0.9.x with vLLM (ROLLOUT=sglang for SGLang), and
# apo-kernels installed in the same environment on every node (pip install 'apo-kernels[verl]').
# Data: geo3k in verl's parquet format at TRAIN/VAL below, made by verl's repository script (it is not in the pip
# package): git clone -b v0.9.1 https://github.com/volcengine/verl && python verl/examples/data_preprocess/geo3k.py \
#     --local_dir "$HOME/data/geo3k"
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-3B-Instruct}
TRAIN=${TRAIN:-$HOME/data/geo3k/train.parquet}
VAL=${VAL:-$HOME/data/geo3k/test.parquet}
NGPUS=${NGPUS:-8}
NNODES=${NNODES:-1}
# Ulysses sequence parallelism: SP GPUs share each sequence (long multimodal prompts); must divide NGPUS. With
# SP > 1 the actor update keeps two vocabulary sweeps (the one-pass loss needs whole sequences on a rank).
SP=${SP:-1}
ROLLOUT=${ROLLOUT:-vllm}
# The paper's reward, accuracy 1 + format 0.5: a response is correct (DADS, STCR) when accurate (apo_reward.py)
REWARD=${REWARD:-$(dirname "$0")/apo_reward.py}

# Every process that imports verl (this driver, the TaskRunner, the actor/ref/rollout workers) imports the
# adapter first: `import verl` reads VERL_USE_EXTERNAL_MODULES. It reaches the Ray workers through
# runtime_env.env_vars below, together with the KL aggregation the released recipe uses.
export VERL_USE_EXTERNAL_MODULES=apo_kernels.integrations.verl
export APO_VERL_KL_AGG_MODE=seq-mean-token-mean

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=apo \
    algorithm.use_kl_in_reward=False \
    algorithm.norm_adv_by_std_in_grpo=True \
    +algorithm.apo.dads=True \
    +algorithm.apo.stcr=True \
    +algorithm.apo.stcr_base=1.00001 \
    +algorithm.apo.adv_eps=1e-9 \
    data.train_files="$TRAIN" \
    data.val_files="$VAL" \
    data.train_batch_size=128 \
    data.max_prompt_length=2048 \
    data.max_response_length=4096 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    data.image_key=images \
    reward.custom_reward_function.path="$REWARD" \
    reward.custom_reward_function.name=compute_score \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.model.use_fused_kernels=True \
    actor_rollout_ref.model.fused_kernel_options.impl_backend=apo \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.ulysses_sequence_parallel_size="$SP" \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=128 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.ppo_epochs=1 \
    actor_rollout_ref.actor.policy_loss.loss_mode=apo \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.2 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=1e-3 \
    actor_rollout_ref.actor.kl_loss_type=k3 \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.rollout.name="$ROLLOUT" \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.ref.fsdp_config.param_offload=True \
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES="$VERL_USE_EXTERNAL_MODULES" \
    +ray_kwargs.ray_init.runtime_env.env_vars.APO_VERL_KL_AGG_MODE="$APO_VERL_KL_AGG_MODE" \
    trainer.logger='["console"]' \
    trainer.project_name=apo_verl \
    trainer.experiment_name=qwen2_5_vl_3b_apo \
    trainer.n_gpus_per_node="$NGPUS" \
    trainer.nnodes="$NNODES" \
    trainer.save_freq=50 \
    trainer.test_freq=10 \
    trainer.total_epochs=15 \
    "$@"
