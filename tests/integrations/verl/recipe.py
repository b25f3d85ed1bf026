"""The launch recipe ``examples/verl/run_qwen2_5_vl_3b_apo.sh`` read as its shell runs it: the environment it exports
and the Hydra overrides it passes to ``verl.trainer.main_ppo``, and verl's config composed with them."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

RECIPE = Path(__file__).parents[3] / "examples" / "verl" / "run_qwen2_5_vl_3b_apo.sh"


def recipe_defaults() -> dict[str, str]:
    """The script's ``NAME=${NAME:-default}`` settings, with the shell expansions their defaults use."""
    text = RECIPE.read_text()
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:-(.*)\}$", text, flags=re.M))
    expansions = {'$(dirname "$0")': str(RECIPE.parent), "$HOME": os.path.expanduser("~")}
    for name, value in defaults.items():
        for shell, expanded in expansions.items():
            value = value.replace(shell, expanded)
        defaults[name] = value
    return defaults


def recipe_overrides(**settings: str) -> tuple[dict[str, str], list[str]]:
    """``(exported environment, main_ppo's arguments)`` of the recipe run with the environment ``settings`` (e.g.
    ``MODEL=...``); the script's defaults for the others."""
    text = RECIPE.read_text()
    exported = dict(re.findall(r"^export (\w+)=(\S+)$", text, flags=re.M))
    body = text.split("python3 -m verl.trainer.main_ppo")[1].split('"$@"')[0].replace("\\\n", " ")
    values = {**recipe_defaults(), **exported, **settings}
    return exported, [re.sub(r"\$(\w+)", lambda m: values[m.group(1)], arg) for arg in shlex.split(body)]


def compose_recipe(overrides: list[str]):
    """verl's ppo_trainer config with the overrides, composed as ``main_ppo``'s ``@hydra.main`` composes it."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)
