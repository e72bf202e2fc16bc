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
# latent diffusion (Rombach et al. 2022, skinsynth.generate.latent): an autoencoder, then the experiment's UNet with
# EDM on its latents; trained in this process, its cost set by its own steps (bench_generator's latent_steps)
LATENT_RECIPE = "latent"
LATENT_OBJECTIVE = {"prediction": "edm", "loss_weighting": "uniform"}
LATENT_FILE = "latent_samples.npz"  # RUN_DIR/bench/generator/latent/: its samples and reconstructions, for a re-run
BENCH_FOLDER = "bench/generator"  # inside the run directory: one run folder per recipe


def recipe_run(run_dir: Path, name: str) -> Path:
    """The run folder of recipe ``name``: its own generator and synthetic set, the run's prepared data linked in."""
    folder = run_dir / BENCH_FOLDER / name
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if not data.exists():
        data.symlink_to(layout(run_dir).data.resolve(), target_is_directory=True)
    return folder


def _score(
    name: str, real: tuple, synthetic, images: int, extractor, ac, progress: Progress, cache: dict
) -> dict[str, Any]:
    """Matched-n fidelity (with its floor) and the Classification Accuracy Score of one recipe's synthetic set
    (``real``: the training and held-out real images, ``AuditImages``). ``cache`` keeps the real images' features
    between recipes (the same seeded subsets of the same data)."""
    from skinsynth.audit.report import classification_accuracy_score, fidelity_at_matched_n

    train, held_out = real
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
    progress(f"bench generator: scored {name} in {time.perf_counter() - t0:.0f} s")
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
    cfg,
    *,
    recipes: list[str],
    steps: int | None = None,
    images: int = 500,
    latent_steps: tuple[int, int] = (1000, 2000),
    progress: Progress = print,
) -> dict[str, Any]:
    """Train, sample and score each recipe of ``recipes`` (names of :data:`RECIPES`) on ``cfg``'s prepared run.

    Args:
        cfg: experiment whose ``run.out`` holds prepared data; ``generator`` gives the UNet and training settings
            every recipe shares, ``sample`` the sampler, steps and guidance, ``audit`` the scoring settings.
        recipes: recipe names; the first is the baseline the others are compared with.
        steps: optimiser steps of every recipe (``generator.train_steps`` when None).
        images: synthetic images per recipe, and the matched n of its FID (real images of the train split's class
            mix, as many).
        latent_steps: the ``latent`` recipe's (autoencoder, UNet) steps; its record gives its training seconds
            beside the others', the figure to equalise.
        progress: receives one-line messages.

    Returns:
        The benchmark record.

    Raises:
        SkinsynthError: an unknown recipe, no prepared data, or no FID Inception weights.
    """
    from skinsynth.audit.features import choose_extractors
    from skinsynth.audit.report import load_audit_images, load_real_audit_images
    from skinsynth.generate.sample import sample_synthetic
    from skinsynth.generate.train import train_generator

    unknown = [name for name in recipes if name not in RECIPES and name != LATENT_RECIPE]
    if unknown or not recipes:
        known = ", ".join([*RECIPES, LATENT_RECIPE])
        raise SkinsynthError(f"unknown generator recipe(s) {unknown or recipes} (known: {known})")
    run_dir = local_run_dir(cfg.run)
    if not (layout(run_dir).data / "manifest.json").is_file():
        raise SkinsynthError(f"no prepared data in {run_dir}: run 'skinsynth data prepare' first")
    (extractor,), _ = choose_extractors("inception", Path(), cfg.audit.batch_size)
    steps = steps or cfg.generator.train_steps
    rows: list[dict[str, Any]] = []
    cache: dict = {}
    for name in recipes:
        folder = recipe_run(run_dir, name)
        if name == LATENT_RECIPE:
            real = load_real_audit_images(folder)  # the recipe's own folder: the labelled images, no pool
            synthetic, row = latent_recipe(cfg, folder, real, latent_steps, images, _tagged(progress, name))
            row.update(_score(name, real, synthetic, images, extractor, cfg.audit, progress, cache))
            row.update(_reconstruction_fid(real, row["n"], extractor, cfg.audit.seed, row, cache))
            rows.append(row)
            progress(_line(rows[-1], rows[0]))
            continue
        recipe_cfg = copy.deepcopy(cfg)
        recipe_cfg.run.out = str(folder)
        recipe_cfg.generator = dataclasses.replace(cfg.generator, train_steps=steps, **RECIPES[name])
        recipe_cfg.sample = dataclasses.replace(cfg.sample, plan="ratio", ratio=1.0, max_images=images, tones="match")
        progress(f"bench generator: {name} ({RECIPES[name]}), {steps} steps of the '{cfg.generator.size}' UNet")
        tagged = _tagged(progress, name)
        result = train_generator(recipe_cfg, progress=tagged)
        sample_synthetic(recipe_cfg.sample, folder, progress=tagged)
        train, held_out, synthetic = load_audit_images(folder)
        scores = _score(name, (train, held_out), synthetic, images, extractor, cfg.audit, progress, cache)
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


def latent_recipe(cfg, folder: Path, real: tuple, latent_steps: tuple[int, int], images: int, progress: Progress):
    """Train the latent recipe on the labelled training images (``real[0]``) and sample the plan every recipe samples
    (the train split's class mix, ``images`` in all, seeds ``sample.seed + i``, the experiment's sampler). Returns the
    samples (``AuditImages``) and the recipe's record, which also holds the autoencoder's reconstructions of the
    held-out images the FID floor uses (``_reconstruction_fid``). A finished run is read back from its folder."""
    import json

    import numpy as np
    import pandas as pd
    import torch

    from skinsynth.config import config_to_dict
    from skinsynth.core.rundir import current_identity
    from skinsynth.data.schema import CLASSES
    from skinsynth.generate.diffusion import (
        from_uint8_images,
        generate_images,
        to_uint8_images,
        training_noise_scheduler,
    )
    from skinsynth.generate.latent import (
        LATENT_FACTOR,
        decode,
        encode,
        latent_scale,
        train_autoencoder,
        train_latent_generator,
    )
    from skinsynth.generate.sample import build_plan
    from skinsynth.generate.train import GRID_PER_CLASS, dihedral, save_png

    train, held_out = real
    gc = dataclasses.replace(cfg.generator, **LATENT_OBJECTIVE)
    sc = cfg.sample
    # what the saved samples were made with: any change trains the recipe again
    made_with = {
        "data": current_identity(folder, "data"),
        "latent_steps": list(latent_steps),
        "images": images,
        "generator": config_to_dict(gc),
        "sampler": {"sampler": sc.sampler, "steps": sc.steps, "guidance": sc.guidance, "seed": sc.seed},
        "audit_seed": cfg.audit.seed,
    }
    saved = folder / LATENT_FILE
    finished = _read_latent(saved, made_with)
    if finished is not None:
        progress(f"read back from {saved}")
        return finished
    ae_steps, unet_steps = latent_steps
    x = from_uint8_images(torch.from_numpy(train.images).permute(0, 3, 1, 2))
    t0 = time.perf_counter()
    progress(
        f"autoencoder (AutoencoderKL, {x.shape[-1]} px -> {x.shape[-1] // LATENT_FACTOR} px latents) on "
        f"{len(x)} training images, {ae_steps} steps of {gc.batch_size}"
    )
    autoencoder, ae_history = train_autoencoder(
        x,
        steps=ae_steps,
        batch_size=gc.batch_size,
        seed=gc.seed,
        augment=lambda batch: torch.stack([dihedral(img) for img in batch]),
        progress=progress,
    )
    scale = latent_scale(autoencoder, x[:1024])
    latents = encode(autoencoder, x, scale)
    ae_seconds = time.perf_counter() - t0
    progress(f"'{gc.size}' UNet (EDM) on {tuple(latents.shape[1:])} latents, {unet_steps} steps of {gc.batch_size}")
    unet, conditioning, history = train_latent_generator(
        latents, torch.as_tensor(train.labels), gc, steps=unet_steps, progress=progress
    )
    train_seconds = time.perf_counter() - t0

    # the plan the pixel recipes sample (sample.plan=ratio at 1 capped at ``images``): labels and seeds
    plan_cfg = dataclasses.replace(sc, plan="ratio", ratio=1.0, max_images=images, tones="match")
    plan = build_plan(
        plan_cfg, pd.DataFrame({"dx": [CLASSES[int(y)] for y in train.labels], "tone": None}), conditioning
    )
    labels, seeds = plan["label"].to_numpy(np.int64), plan["seed"].to_numpy(np.int64)
    scheduler_config = training_noise_scheduler(gc.num_train_timesteps, gc.prediction).config
    with torch.no_grad():

        def sample(classes, seeds):
            return generate_images(
                unet,
                scheduler_config,
                sc.sampler,
                [conditioning.index(int(c)) for c in classes],
                [int(s) for s in seeds],
                image_size=conditioning.image_size,
                output_size=x.shape[-1],
                null_label=conditioning.null_index,
                steps=sc.steps,
                guidance=sc.guidance,
                decoder=lambda z: decode(autoencoder, z, scale),
            )

        t1 = time.perf_counter()
        samples = np.concatenate([sample(labels[i : i + 64], seeds[i : i + 64]) for i in range(0, len(labels), 64)])
        sample_seconds = time.perf_counter() - t1
        grid_classes = np.repeat(np.arange(len(CLASSES)), GRID_PER_CLASS)
        grid = sample(grid_classes, np.arange(len(grid_classes)))
        # the floor's held-out subset in _score (at its n), whose reconstructions give the reconstruction FID
        n = min(images, len(samples), len(train.ids))
        held_sub = held_out.subset(n, cfg.audit.seed + 1)
        held_x = from_uint8_images(torch.from_numpy(held_sub.images).permute(0, 3, 1, 2))
        reconstructions = to_uint8_images(decode(autoencoder, encode(autoencoder, held_x, scale), scale))
    side = x.shape[-1]
    rows = [
        np.concatenate(list(grid[c * GRID_PER_CLASS : (c + 1) * GRID_PER_CLASS]), axis=1) for c in range(len(CLASSES))
    ]
    grid_path = save_png(np.concatenate(rows, axis=0), folder / "grid.png")
    record = {
        "made_with": made_with,
        "recipe": LATENT_RECIPE,
        **LATENT_OBJECTIVE,
        "steps": unet_steps,
        "autoencoder_steps": ae_steps,
        "autoencoder_seconds": round(ae_seconds, 1),
        "autoencoder_final_loss": ae_history[-1]["loss"] if ae_history else None,
        "latent_shape": list(latents.shape[1:]),
        "latent_scale": scale,
        "train_seconds": round(train_seconds, 1),
        "sample_seconds": round(sample_seconds, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "grid": str(grid_path),
        "grid_layout": f"one row per class ({', '.join(CLASSES)}), {GRID_PER_CLASS} samples each, {side} px",
    }
    np.savez(saved, images=samples, labels=labels, reconstructions=reconstructions, record=json.dumps(record))
    return _read_latent(saved, made_with)


def _read_latent(saved: Path, made_with: dict[str, Any]):
    """The latent recipe's samples (``AuditImages``) and record from ``saved``, or None when there is none or it was
    made with other settings than ``made_with``."""
    import json

    import numpy as np

    from skinsynth.audit.report import AuditImages

    if not saved.is_file():
        return None
    with np.load(saved, allow_pickle=False) as arrays:
        record = json.loads(str(arrays["record"]))
        if record.get("made_with") != json.loads(json.dumps(made_with)):
            return None
        labels = arrays["labels"]
        ids = [f"latent-{i:06d}" for i in range(len(labels))]
        record["reconstructions"] = arrays["reconstructions"]
        return AuditImages(arrays["images"], labels, ids, np.asarray(ids, dtype=object)), record


def _reconstruction_fid(real: tuple, n: int, extractor, seed: int, record: dict, cache: dict) -> dict[str, Any]:
    """FID at matched n of the autoencoder's reconstructions of the floor's held-out images against the training
    subset the synthetic images are compared with (its features from ``_score``'s ``cache``): how close any sample
    of this latent space can come."""
    from skinsynth.core.fid import frechet_distance

    train, held_out = real
    reconstructions = record.pop("reconstructions")
    real_features, _ = cache[(tuple(train.subset(n, seed).ids), tuple(held_out.subset(n, seed + 1).ids))]
    # fewer validation images than n: as many of the (seeded, so random) training subset, as the floor does
    real_features = real_features[: len(reconstructions)]
    return {
        "reconstruction_fid": round(frechet_distance(real_features, extractor(reconstructions)), 2),
        "reconstruction_n": len(reconstructions),
    }


def _tagged(progress: Progress, name: str) -> Progress:
    return lambda message: progress(f"  [{name}] {message}")


def _line(row: dict[str, Any], baseline: dict[str, Any]) -> str:
    def interval(ci) -> str:
        return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""

    cas = "n/a" if row["cas_synthetic"] is None else f"{row['cas_synthetic']:.3f}{interval(row['cas_synthetic_ci'])}"
    real = "n/a" if row["cas_real"] is None else f"{row['cas_real']:.3f}{interval(row['cas_real_ci'])}"
    versus = "" if row is baseline else f"; FID {ratio(row['fid'], baseline['fid']):.2f}x the baseline's"
    if "reconstruction_fid" in row:
        versus += f"; the autoencoder's reconstructions: FID {row['reconstruction_fid']:.1f}"
    return (
        f"bench generator: {row['recipe']}: {row['steps']} steps in {row['train_seconds']:.0f} s; "
        f"FID {row['fid']:.1f} at n={row['n']} (floor {row['fid_floor']:.1f}), "
        f"KID {row['kid_mean']:.4f} ± {row['kid_std']:.4f}; CAS {cas} vs real {real}, ratio {row['cas_ratio']}{versus}"
    )
