"""The reward of the released APO recipe for verl's ``reward.custom_reward_function``: accuracy 1 + format 0.5.

verl's own geo3k score is ``0.9 accuracy + 0.1 format``; APO counts a response as correct when its reward is >= 1
(``group_advantages``'s default), which under that score means accurate *and* formatted, so an accurate answer
without the format would count as wrong for DADS's difficulty and STCR. With the paper's weights, correct means
accurate: the format bonus alone (0.5) stays below 1. The two checks are verl's own (``<think>...</think>`` then
a ``\\boxed{}`` answer; the boxed answer graded by ``mathruler``).
"""

from verl.utils.reward_score.geo3k import acc_reward, format_reward

ACCURACY_REWARD = 1.0
FORMAT_REWARD = 0.5


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """verl's custom reward signature; ``data_source`` and ``extra_info`` are not needed (geo3k-style data)."""
    return ACCURACY_REWARD * acc_reward(solution_str, ground_truth) + FORMAT_REWARD * format_reward(solution_str)
