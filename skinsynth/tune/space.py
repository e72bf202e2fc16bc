"""The search space of a sweep, read from the experiment file's ``tune.space``, and the config of one trial.

Each entry maps a dotted config key (``train.lr``, ``train.mix.ratio``, ``train.ssl.method``, ...) to one dimension:
``choice`` (categorical; a grid axis when ``tune.search`` is ``grid``), ``uniform``, ``loguniform`` or ``integer``.
A synthetic-to-real ratio "on a log scale with 0 included" is a ``choice`` over log-spaced values plus 0 (e.g.
``[0, 0.25, 0.5, 1, 2, 4]``): a continuous log-uniform dimension cannot reach 0, and TPE models categorical choices
well. Every key and every value of the space is checked against the config schema when the sweep starts, so a typo
fails at once rather than in trial 37.
"""

from __future__ import annotations

import math
from typing import Any

from skinsynth.config import (
    ConfigError,
    ExperimentConfig,
    SearchDimension,
    TuneConfig,
    config_from_dict,
    config_to_dict,
)

SEED_KEY = "train.seed"


def _dimension_kind(key: str, dim: SearchDimension) -> tuple[str, list[Any]]:
    kinds = [(name, getattr(dim, name)) for name in ("choice", "uniform", "loguniform", "integer")]
    given = [(name, values) for name, values in kinds if values is not None]
    if len(given) != 1:
        raise ConfigError(f"tune.space['{key}'] must set exactly one of choice, uniform, loguniform, integer")
    name, values = given[0]
    if name == "choice":
        if not values:
            raise ConfigError(f"tune.space['{key}'].choice is empty")
    elif len(values) != 2 or not values[0] < values[1]:
        raise ConfigError(f"tune.space['{key}'].{name} must be [low, high] with low < high, got {values}")
    elif name == "loguniform" and values[0] <= 0:
        raise ConfigError(f"tune.space['{key}'].loguniform needs low > 0 (for 0, use a choice), got {values}")
    return name, list(values)


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> ExperimentConfig:
    """The experiment config of one trial: ``base`` (a config dict) with each dotted ``params`` key set.

    Raises:
        ConfigError: an unknown key or a value of the wrong type (named).
    """
    return config_from_dict({k: v for k, v in base.items() if k != "tune"}, params)  # a trial does not sweep


def check_space(cfg: ExperimentConfig) -> None:
    """Refuse a space with an unknown key, a malformed dimension or a value the key cannot take.

    Every choice value and both ends of every range are built into a trial config, so the schema's type checks
    (and its nearest-key suggestions) apply to the sweep exactly as they do to the experiment file.
    """
    tc = cfg.tune
    if not tc.space:
        raise ConfigError("tune.space is empty: name at least one config key to search over")
    base = config_to_dict(cfg)
    for key, dim in tc.space.items():
        if key.startswith(("tune.", "run.", "data.")):
            raise ConfigError(f"tune.space['{key}']: a sweep searches training settings, not '{key.split('.')[0]}'")
        kind, values = _dimension_kind(key, dim)
        if tc.search == "grid" and kind != "choice":
            raise ConfigError(f"tune.search is grid: tune.space['{key}'] must be a choice, not {kind}")
        for value in values:
            try:
                trial_config(base, {key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.space['{key}']: {err}") from None
    if tc.search == "grid" and tc.scheduler != "none":
        raise ConfigError("tune.search is grid: every cell runs to the end, so set tune.scheduler to none")
    if tc.seeds and tc.search != "grid":
        raise ConfigError("tune.seeds repeats grid cells; with tune.search=optuna set train.seed instead")
    if tc.seeds and SEED_KEY in tc.space:
        raise ConfigError(f"tune.seeds and tune.space['{SEED_KEY}'] both set the seed; keep one")
    if tc.num_samples < 1:
        raise ConfigError(f"tune.num_samples must be >= 1, got {tc.num_samples}")


def grid_size(tc: TuneConfig) -> int:
    """Trials in a grid sweep: the product of the choices, times the seeds."""
    return math.prod(len(dim.choice or []) for dim in tc.space.values()) * max(1, len(tc.seeds))


def tune_param_space(tc: TuneConfig) -> dict[str, Any]:
    """The Ray Tune ``param_space``: sampling domains (optuna) or grid axes (grid), keyed by dotted config key."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in tc.space.items():
        kind, values = _dimension_kind(key, dim)
        if tc.search == "grid":
            space[key] = tune.grid_search(values)
        elif kind == "choice":
            space[key] = tune.choice(values)
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(values[0], values[1] + 1)  # randint's upper end is exclusive
    if tc.search == "grid" and tc.seeds:
        space[SEED_KEY] = tune.grid_search(list(tc.seeds))
    return space
