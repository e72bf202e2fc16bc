"""``skinsynth bench generator``: generator recipes side by side at the same training budget, in one run.

Each recipe is a named choice of the training objective (``generator.prediction`` and ``generator.loss_weighting``)
over the experiment's own generator settings. Every recipe trains the same UNet from scratch on the run's labelled
train split for the same number of optimiser steps (so the same compute: the objective does not change a step's
cost), in its own run folder ``RUN_DIR/bench/generator/<recipe>/`` that links the run's prepared ``data/``; samples
the same plan with the same sampler and seeds; and is scored as the audit scores a synthetic set:

- Inception FID and KID against as many real training images, at matched n, beside the real-vs-real floor
  (training vs validation images) at the same n;
- the Classification Accuracy Score (Ravuri & Vinyals 2019): a linear probe trained on the synthetic images only,
  against one trained on count-matched real images, both scored on the validation split (never test).

The plan follows the train split's class mix (``sample.plan=ratio`` capped at ``images``), so FID compares sets with
the same classes in the same shares. The first recipe is the baseline; the others are printed with their FID and CAS
ratio beside it. Re-running the command resumes: finished generators and samples are not redone.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

from skinsynth.bench import Progress, ratio, with_machine
from skinsynth.core.rundir import layout
from skinsynth.core.storage import local_run_dir
from skinsynth.errors import SkinsynthError

# name -> the objective it trains with; the first named on the command line is the baseline
RECIPES: dict[str, dict[str, str]] = {
    "ddpm": {"prediction": "epsilon", "loss_weighting": "uniform"},  # Ho et al. 2020: the default before edm
    "min_snr": {"prediction": "epsilon", "loss_weighting": "min_snr"},  # Hang et al. 2023
    "v": {"prediction": "v_prediction", "loss_weighting": "uniform"},  # Salimans & Ho 2022
    "v_min_snr": {"prediction": "v_prediction", "loss_weighting": "min_snr"},
    "edm": {"prediction": "edm", "loss_weighting": "uniform"},  # Karras et al. 2022
}
BENCH_FOLDER = "bench/generator"  # inside the run directory: one run folder per recipe


def recipe_run(run_dir: Path, name: str) -> Path:
    """The run folder of recipe ``name``: its own generator and synthetic set, the run's prepared data linked in."""
    folder = run_dir / BENCH_FOLDER / name
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if not data.exists():
        data.symlink_to(layout(run_dir).data.resolve(), target_is_directory=True)
    return folder


def _score(folder: Path, images: int, extractor, ac, progress: Progress, cache: dict) -> dict[str, Any]:
    """Matched-n fidelity (with its floor) and the Classification Accuracy Score of one recipe's synthetic set.
    ``cache`` keeps the real images' features between recipes (the same seeded subsets of the same data)."""
    from skinsynth.audit.report import classification_accuracy_score, fidelity_at_matched_n, load_audit_images

    train, held_out, synthetic = load_audit_images(folder)
    n = min(images, len(synthetic.ids), len(train.ids))
    real_sub, held_sub = train.subset(n, ac.seed), held_out.subset(n, ac.seed + 1)
    syn_sub = synthetic.subset(n, ac.seed + 2)
    t0 = time.perf_counter()
    key = (tuple(real_sub.ids), tuple(held_sub.ids))
    if key not in cache:
        cache[key] = extractor(real_sub.images), extractor(held_sub.images)
    (real_f, held_f), syn_f = cache[key], extractor(syn_sub.images)
    fid = fidelity_at_matched_n(real_f, held_f, syn_f, real_sub, syn_sub, ac)
    utility = classification_accuracy_score(train, held_out, syn_sub, ac)  # scored on every validation image
    progress(f"bench generator: scored {folder.name} in {time.perf_counter() - t0:.0f} s")
    syn_arm, real_arm = utility["synthetic_only"], utility["real_only"]
    cas_ratio = utility["balanced_accuracy_ratio"]
    return {
        "n": fid["n"],
        "fid": round(fid["fid"], 2),
        "fid_floor": round(fid["fid_floor"], 2),
        "floor_n": fid["floor_n"],
        "kid_mean": round(fid["kid_mean"], 4),
        "kid_std": round(fid["kid_std"], 4),
        "precision": round(fid["precision"], 3),
        "recall": round(fid["recall"], 3),
        "cas_synthetic": syn_arm["balanced_accuracy"],
        "cas_synthetic_ci": syn_arm.get("balanced_accuracy_ci"),
        "cas_real": real_arm["balanced_accuracy"],
        "cas_real_ci": real_arm.get("balanced_accuracy_ci"),
        "cas_n_train": syn_arm["n_train"],
        "cas_n_scored": utility["n_scored"],
        "cas_ratio": None if cas_ratio is None else round(cas_ratio, 3),
    }


def bench_generator(
    cfg, *, recipes: list[str], steps: int | None = None, images: int = 500, progress: Progress = print
) -> dict[str, Any]:
    """Train, sample and score each recipe of ``recipes`` (names of :data:`RECIPES`) on ``cfg``'s prepared run.

    Args:
        cfg: experiment whose ``run.out`` holds prepared data; ``generator`` gives the UNet and training settings
            every recipe shares, ``sample`` the sampler, steps and guidance, ``audit`` the scoring settings.
        recipes: recipe names; the first is the baseline the others are compared with.
        steps: optimiser steps of every recipe (``generator.train_steps`` when None).
        images: synthetic images per recipe, and the matched n of its FID (real images of the train split's class
            mix, as many).
        progress: receives one-line messages.

    Returns:
        The benchmark record.

    Raises:
        SkinsynthError: an unknown recipe, no prepared data, or no FID Inception weights.
    """
    from skinsynth.audit.features import choose_extractors
    from skinsynth.generate.sample import sample_synthetic
    from skinsynth.generate.train import train_generator

    unknown = [name for name in recipes if name not in RECIPES]
    if unknown or not recipes:
        raise SkinsynthError(f"unknown generator recipe(s) {unknown or recipes} (known: {', '.join(RECIPES)})")
    run_dir = local_run_dir(cfg.run)
    if not (layout(run_dir).data / "manifest.json").is_file():
        raise SkinsynthError(f"no prepared data in {run_dir}: run 'skinsynth data prepare' first")
    (extractor,), _ = choose_extractors("inception", Path(), cfg.audit.batch_size)
    steps = steps or cfg.generator.train_steps
    rows: list[dict[str, Any]] = []
    cache: dict = {}
    for name in recipes:
        folder = recipe_run(run_dir, name)
        recipe_cfg = copy.deepcopy(cfg)
        recipe_cfg.run.out = str(folder)
        recipe_cfg.generator = dataclasses.replace(cfg.generator, train_steps=steps, **RECIPES[name])
        recipe_cfg.sample = dataclasses.replace(cfg.sample, plan="ratio", ratio=1.0, max_images=images, tones="match")
        progress(f"bench generator: {name} ({RECIPES[name]}), {steps} steps of the '{cfg.generator.size}' UNet")
        tagged = _tagged(progress, name)
        result = train_generator(recipe_cfg, progress=tagged)
        sample_synthetic(recipe_cfg.sample, folder, progress=tagged)
        scores = _score(folder, images, extractor, cfg.audit, progress, cache)
        rows.append(
            {
                "recipe": name,
                **RECIPES[name],
                "steps": result.steps,
                "train_seconds": round(result.seconds, 1),
                "grid": str(layout(folder).generator / "grid.png"),
                **scores,
            }
        )
        progress(_line(rows[-1], rows[0]))
    baseline = rows[0]
    for row in rows:
        row["fid_vs_baseline"] = ratio(row["fid"], baseline["fid"])
        row["cas_ratio_vs_baseline"] = ratio(row["cas_ratio"], baseline["cas_ratio"])
    return with_machine(
        {
            "benchmark": "generator",
            "baseline": f"recipe '{recipes[0]}'",
            "generator": {"size": cfg.generator.size, "batch_size": cfg.generator.batch_size, "lr": cfg.generator.lr},
            "image_size": cfg.data.preprocess.size,
            "sampler": {"sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "guidance": cfg.sample.guidance},
            "images": images,
            "recipes": rows,
        }
    )


def _tagged(progress: Progress, name: str) -> Progress:
    return lambda message: progress(f"  [{name}] {message}")


def _line(row: dict[str, Any], baseline: dict[str, Any]) -> str:
    def interval(ci) -> str:
        return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""

    cas = "n/a" if row["cas_synthetic"] is None else f"{row['cas_synthetic']:.3f}{interval(row['cas_synthetic_ci'])}"
    real = "n/a" if row["cas_real"] is None else f"{row['cas_real']:.3f}{interval(row['cas_real_ci'])}"
    versus = "" if row is baseline else f"; FID {ratio(row['fid'], baseline['fid']):.2f}x the baseline's"
    return (
        f"bench generator: {row['recipe']}: {row['steps']} steps in {row['train_seconds']:.0f} s; "
        f"FID {row['fid']:.1f} at n={row['n']} (floor {row['fid_floor']:.1f}), "
        f"KID {row['kid_mean']:.4f} ± {row['kid_std']:.4f}; CAS {cas} vs real {real}, ratio {row['cas_ratio']}{versus}"
    )
