"""``skinsynth audit RUN_DIR``: fidelity, utility and privacy of ``RUN_DIR/synthetic`` against real data; the gate.

Reads the real training split (what the generator learnt from), the held-out real images (the validation split,
never seen by the generator), the synthetic shards and the generator. It never reads the test split, whose labels
are kept for a model's single scoring (``skinsynth evaluate``): the audit's comparisons, the utility probe's score
included, are made on validation, so choosing between generators by them spends no look at test. Writes
``RUN_DIR/audit/report.json``, ``gallery.png`` and ``similarity.png``. The report's ``gate.share_ok`` is what
``skinsynth generate export`` checks before synthetic images leave the run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from skinsynth import DISCLAIMER
from skinsynth.audit import copies, fidelity, membership, privacy
from skinsynth.audit.features import AuditError, choose_extractors, imagenet_features
from skinsynth.audit.utility import utility_report
from skinsynth.config import AuditConfig, ExperimentConfig, changed_settings, config_to_dict
from skinsynth.core.rundir import (
    AUDIT_GALLERY,
    AUDIT_REPORT,
    AUDIT_SIMILARITY,
    StageIdentity,
    current_identity,
    layout,
    pool_image_ids,
    read_generator_pool,
    replace_dir,
    write_manifest,
)

Progress = Callable[[str], None]


@dataclass
class AuditImages:
    """Decoded images (uint8, N x H x W x 3) with their class labels, ids and lesion (group) ids."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    groups: np.ndarray  # lesion ids (real images); the image ids of synthetic ones

    def subset(self, n: int, seed: int) -> AuditImages:
        if len(self.ids) <= n:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.ids), size=n, replace=False))
        return self.select(keep)

    def select(self, keep: np.ndarray) -> AuditImages:
        """The images at the given indices (or where a boolean mask is true)."""
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep
        return AuditImages(self.images[keep], self.labels[keep], [self.ids[i] for i in keep], self.groups[keep])


def _decode(frame: pd.DataFrame, groups: pd.Series | None = None) -> AuditImages:
    """``groups``: lesion id by image id (the split table's ``group_id``); without it each image is its own group."""
    from skinsynth.core.shards import decode_png_arrays

    images = np.stack(decode_png_arrays(frame["image"])) if len(frame) else np.zeros((0, 1, 1, 3), np.uint8)
    ids = list(frame["image_id"])
    group_ids = np.asarray(ids if groups is None else groups.loc[ids].to_numpy(), dtype=object)
    return AuditImages(images, frame["label"].to_numpy(np.int64), ids, group_ids)


def load_real_audit_images(run_dir: Path) -> tuple[AuditImages, AuditImages]:
    """(real training images the generator saw, held-out real images - the validation split, never test)."""
    from skinsynth.core.shards import load_split_table, read_rows, split_ids

    splits = load_split_table(run_dir)
    columns = ["image_id", "image", "label"]
    lesions = splits.set_index("image_id")["group_id"]
    # every image the generator learnt from: the labelled ones and, for a semi-supervised generator, its pool images
    train_ids = split_ids(splits, "train", labelled_only=True)
    pool = read_generator_pool(run_dir)
    if pool:
        train_ids = sorted({*train_ids, *pool_image_ids(pool)})
    train = _decode(read_rows(run_dir, train_ids, columns), lesions)
    held_out = _decode(read_rows(run_dir, split_ids(splits, "val"), columns), lesions)
    return train, held_out


def load_audit_images(run_dir: Path) -> tuple[AuditImages, AuditImages, AuditImages]:
    """(real training images the generator saw, held-out real images - the validation split, never test -,
    synthetic images).

    Raises:
        AuditError: no synthetic set, or no held-out real images to compare with.
    """
    shards = layout(run_dir).synthetic_images
    if not shards.is_dir():
        raise AuditError(f"no synthetic images at {shards}: run 'skinsynth generate sample' first")
    train, held_out = load_real_audit_images(run_dir)
    columns = ["image_id", "image", "label"]
    synthetic = _decode(pq.read_table(shards, columns=columns).to_pandas().sort_values("image_id"))
    if len(held_out.ids) < 2 or len(synthetic.ids) < 2 or len(train.ids) < 2:
        raise AuditError(
            f"too few images to audit: {len(train.ids)} training, {len(held_out.ids)} held-out, "
            f"{len(synthetic.ids)} synthetic (need at least 2 each)"
        )
    return train, held_out, synthetic


def _membership(run_dir: Path, train: AuditImages, held_out: AuditImages, ac: AuditConfig, progress) -> dict:
    """Both membership attacks (``membership.attack_generator``) on the run's generator: members a seeded subset of
    the training split, non-members of the held-out (validation) split, ``audit.mia_images`` each; one line per
    attack."""
    from skinsynth.generate.diffusion import attack_scheduler, training_scheduler_config
    from skinsynth.generate.model import load_generator

    generator_dir = layout(run_dir).generator
    unet, conditioning = load_generator(generator_dir)
    # the attacks' model calls dominate the audit's time; the scores do not depend on the device
    unet = unet.to(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    scheduler = attack_scheduler(training_scheduler_config(generator_dir))
    members = train.subset(ac.mia_images, ac.seed)
    non_members = held_out.subset(ac.mia_images, ac.seed + 1)
    progress(
        f"audit: membership attacks on the generator, {len(members.ids)} training vs {len(non_members.ids)} held-out "
        f"images, {ac.mia_timesteps} noise levels each ({ac.mia_draws} noise draws per level for the loss attack)"
    )
    attacks = membership.attack_generator(
        unet,
        conditioning,
        scheduler,
        (members.images, members.labels),
        (non_members.images, non_members.labels),
        timesteps=ac.mia_timesteps,
        draws=ac.mia_draws,
        n_boot=ac.mia_boot,
        seed=ac.seed,
        batch_size=ac.batch_size,
        progress=lambda line: progress(f"audit: {line}"),
    )
    for name, attack in attacks.items():
        progress(
            f"audit: membership attack {membership.ATTACK_NAMES[name]}: AUC {attack['auc']:.3f} "
            f"{_interval(attack['auc_ci'])}, TPR at 1% FPR {attack['tpr_at_1pct_fpr']:.3f} "
            f"{_interval(attack['tpr_at_1pct_fpr_ci'])} "
            f"({attack['n_members']} members / {attack['n_non_members']} non-members, {attack['seconds']:.1f} s)"
            + (f"; {attack['note']}" if "note" in attack else "")
        )
    return attacks


@dataclass
class CopyScores:
    """What the memorisation figures draw: near-copy scores and each synthetic image's nearest training image."""

    synthetic: np.ndarray
    nearest: np.ndarray
    held_out: np.ndarray
    positives: np.ndarray
    positives_label: str


def _memorisation(
    train: AuditImages, held_out: AuditImages, synthetic: AuditImages, ac: AuditConfig, progress
) -> tuple[dict[str, Any], CopyScores]:
    """Near-copy search of every synthetic image in the training set, its threshold calibrated on the data's own
    pairs (:mod:`skinsynth.audit.copies`): held-out real images - one half sets the threshold at ``audit.copy_fpr``,
    the other half measures its false-positive rate - and same-lesion training pairs for its true-positive rate."""
    t0 = time.perf_counter()
    detector = copies.CopyDetector(
        train.images,
        side=ac.copy_size,
        candidates=ac.copy_candidates,
        progress=lambda line: progress(f"audit: {line}"),
    )
    held = held_out.subset(2 * ac.calibration_images, ac.seed + 4)
    held_scores, _ = detector.score(held.images)
    halves = np.random.default_rng(ac.seed).permutation(len(held_scores))
    held_floor, held_eval = held_scores[halves[::2]], held_scores[halves[1::2]]
    calibration = copies.calibrate(
        detector,
        train.groups,
        held_floor,
        fpr=ac.copy_fpr,
        max_pairs=ac.calibration_images,
        plants_per_kind=ac.copy_plants,
        seed=ac.seed,
    )
    positive_scores = np.asarray(calibration.pop("positive_scores"))
    threshold = calibration["threshold"]
    positives, planted = calibration["positives"], calibration["planted"]
    progress(
        f"audit: copy threshold {threshold:.3f} (false positives at most {ac.copy_fpr:.1%} of {len(held_floor)} "
        f"held-out real images); it catches {positives['rate']:.1%} [{positives['ci'][0]:.1%}, "
        f"{positives['ci'][1]:.1%}] of "
        f"{positives['n']} {positives['source'].replace('_', ' ')}; planted near-copies caught: "
        + ", ".join(f"{kind} {entry['rate']:.0%}" for kind, entry in planted.items())
        + f" ({time.perf_counter() - t0:.0f} s)"
    )
    syn_scores, syn_nearest = detector.score(synthetic.images)
    memorisation = privacy.memorisation_report(syn_scores, held_eval, synthetic.labels, train.labels, threshold)
    memorisation["calibration"] = calibration
    memorisation["measure"] = (
        f"near-copy score: normalised cross-correlation of band-passed images at {detector.side} px, best over the "
        f"8 flips/quarter turns, zooms 0.8-1.25 and every shift, against the {detector.candidates} training images "
        f"retrieved for each query out of {len(train.ids)}; copy threshold = the {1 - ac.copy_fpr:.1%} quantile of "
        f"{len(held_floor)} held-out real images (the other {len(held_eval)} give held_out_above_threshold)"
    )
    low, high = memorisation["memorised_share_ci"]
    progress(
        f"audit: memorised {memorisation['memorised_share']:.1%} [{low:.1%}, {high:.1%}] of "
        f"{memorisation['n_synthetic']} synthetic images (held-out real above the threshold: "
        f"{memorisation['held_out_above_threshold']:.1%} of {len(held_eval)}) ({time.perf_counter() - t0:.0f} s)"
    )
    label = "same-lesion pairs" if positives["source"] == "same_lesion_pairs" else "planted near-copies"
    return memorisation, CopyScores(syn_scores, syn_nearest, held_eval, positive_scores, label)


def fidelity_at_matched_n(
    real_features: torch.Tensor,
    held_features: torch.Tensor,
    synthetic_features: torch.Tensor,
    real: AuditImages,
    synthetic: AuditImages,
    ac: AuditConfig,
) -> dict[str, Any]:
    """``fidelity.fidelity_report`` under the audit's settings: every figure at matched n, the floor (training vs
    held-out real, disjoint) at that same n. ``real`` and ``synthetic`` are the subsets the features came from."""
    return fidelity.fidelity_report(
        real_features,
        synthetic_features,
        real.labels,
        synthetic.labels,
        held_out=held_features,
        k=ac.nearest_k,
        kid_subset_size=ac.kid_subset_size,
        seed=ac.seed,
    )


def classification_accuracy_score(
    train: AuditImages, scored: AuditImages, synthetic: AuditImages, ac: AuditConfig
) -> dict[str, Any]:
    """``utility.utility_report`` under the audit's settings: the ImageNet probe trained on ``synthetic`` and on
    count-matched ``train`` images, scored on ``scored`` (validation images, never test) with lesion-bootstrap
    intervals."""
    return utility_report(
        imagenet_features(ac.batch_size),
        train.images,
        train.labels,
        synthetic.images,
        synthetic.labels,
        scored.images,
        scored.labels,
        seed=ac.seed,
        scored_groups=scored.groups,
    )


def _utility(
    train: AuditImages, held_out: AuditImages, synthetic: AuditImages, ac: AuditConfig, progress
) -> dict[str, Any]:
    """Classification Accuracy Score of the synthetic set against a count-matched real set (see ``utility``),
    scored on the validation split, with lesion-bootstrap intervals."""
    t0 = time.perf_counter()
    val = held_out.subset(ac.max_images, ac.seed + 3)
    syn = synthetic.subset(ac.max_images, ac.seed + 2)
    report = classification_accuracy_score(train, val, syn, ac)

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    syn_arm, real_arm = report["synthetic_only"], report["real_only"]
    progress(
        f"audit: utility (linear probe, scored on {report['n_scored']} real validation images, chance "
        f"{report['chance_balanced_accuracy']:.3f}): trained on {syn_arm['n_train']} synthetic -> balanced accuracy "
        f"{shown(syn_arm['balanced_accuracy'])} {_interval(syn_arm['balanced_accuracy_ci'])}; on "
        f"{real_arm['n_train']} real -> {shown(real_arm['balanced_accuracy'])} "
        f"{_interval(real_arm['balanced_accuracy_ci'])} ({time.perf_counter() - t0:.0f} s)"
    )
    return report


def similarity_figure(scores: CopyScores, threshold: float, path):
    """Histogram of near-copy scores: the calibration's positives, synthetic images, held-out real images."""
    from skinsynth.classify.figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 3.6))
    groups = (
        (scores.held_out, "held-out real"),
        (scores.synthetic, "synthetic"),
        (scores.positives, scores.positives_label),
    )
    bins = np.linspace(min(v.min() for v, _ in groups if len(v)), 1.0, 50)
    for values, label in groups:
        if len(values):
            ax.hist(values, bins=bins, alpha=0.5, density=True, label=f"{label} (n={len(values)})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"copy threshold {threshold:.3f}")
    ax.set_xlabel("near-copy score with the nearest training image")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def audit_identity(cfg: ExperimentConfig, run_dir: str | Path) -> StageIdentity:
    """The audit's identity: its settings and the identities of what it reads - the synthetic set, the generator
    (the membership attack queries it), the prepared set, and the classifier used as a feature extractor."""
    stages = ("data", "generator", "synthetic", f"model:{cfg.train.name}")
    inputs = {stage: current_identity(run_dir, stage) for stage in stages}
    return StageIdentity("audit", changed_settings(cfg.audit), inputs, config_to_dict(cfg.audit))


def _interval(ci: list[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def sharing_gate(
    memorisation: dict[str, Any],
    attacks: dict[str, dict[str, Any]],
    utility: dict[str, Any] | None,
    fidelity_by_extractor: dict[str, Any],
    ac: AuditConfig,
) -> dict[str, Any]:
    """The two verdicts a synthetic set needs before ``generate export`` shares it.

    - **private**: the upper 95% bound of the memorised share (Clopper-Pearson) sits below
      ``audit.max_memorised_share``, and every membership attack's AUC interval (bootstrap; ``attacks``: name -> its
      figures, as ``membership.attack_generator`` gives them) lies strictly between ``1 - audit.max_attack_auc`` and
      ``audit.max_attack_auc``: a point estimate under the limit whose interval reaches it does not pass, one attack
      that reaches it is enough, and an attack that ranks members backwards (AUC well below 0.5) reveals them too.
    - **useful**: the synthetic-only probe's balanced accuracy has a lower 95% bound above chance (plus
      ``audit.min_probe_gain``), and manifold precision reaches ``audit.min_precision`` under every extractor. A
      generator of noise copies nothing and reveals nothing, so privacy alone would pass it.

    ``share_ok`` needs both; each verdict lists its reasons and the bound that decided it. ``attack_auc`` and
    ``attack_auc_upper`` are those of the worst attack (the highest upper bound), named by ``attack``.
    """
    share, (_, share_high) = memorisation["memorised_share"], memorisation["memorised_share_ci"]
    if not attacks:
        raise AuditError("the sharing gate needs at least one membership attack")
    private: list[str] = []
    if share_high >= ac.max_memorised_share:
        reason = (
            f"memorised share {share:.2%} has an upper 95% bound of {share_high:.2%}, not below "
            f"{ac.max_memorised_share:.2%}"
        )
        if memorisation["memorised_images"] == 0:
            # none copied, too few to show it: with 0 of n the exact upper bound is 1 - 0.025^(1/n)
            needed = math.floor(math.log(0.025) / math.log(1.0 - ac.max_memorised_share)) + 1
            reason += (
                f" (none of {memorisation['n_synthetic']} was copied, but that is too few to show the share is "
                f"below the limit: audit at least {needed} synthetic images)"
            )
        private.append(reason)
    for name, attack in attacks.items():
        auc, (auc_low, auc_high) = attack["auc"], attack["auc_ci"]
        method = membership.ATTACK_NAMES.get(name, name)
        if auc_high >= ac.max_attack_auc:
            private.append(
                f"membership attack AUC {auc:.3f} ({method}) has an upper 95% bound of {auc_high:.3f}, not below "
                f"{ac.max_attack_auc:.2f}"
            )
        elif auc_low <= 1.0 - ac.max_attack_auc:
            # an attack that ranks members backwards leaks as much: an attacker with a few known members flips it
            private.append(
                f"membership attack AUC {auc:.3f} ({method}) has a lower 95% bound of {auc_low:.3f}, not above "
                f"{1.0 - ac.max_attack_auc:.2f}: it ranks members backwards, which reveals them as well"
            )
    worst = max(attacks, key=lambda name: attacks[name]["auc_ci"][1])
    useful: list[str] = []
    probe, probe_low, chance = None, None, None
    if utility is None:
        useful.append("the utility probe is off (audit.utility: false), so usefulness is not shown")
    else:
        arm, chance = utility["synthetic_only"], utility["chance_balanced_accuracy"]
        probe, ci = arm["balanced_accuracy"], arm.get("balanced_accuracy_ci")
        if probe is None or ci is None:
            useful.append(f"the synthetic-only probe has no score ({arm.get('reason', 'no interval')})")
        else:
            probe_low = ci[0]
            if probe_low <= chance + ac.min_probe_gain:
                gain = f" + {ac.min_probe_gain:.3f}" if ac.min_probe_gain else ""
                useful.append(
                    f"the synthetic-only probe's balanced accuracy {probe:.3f} has a lower 95% bound of "
                    f"{probe_low:.3f}, not above chance {chance:.3f}{gain}"
                )
    precision = {name: entry["precision"] for name, entry in fidelity_by_extractor.items()}
    for name, value in precision.items():
        if value < ac.min_precision:
            useful.append(f"precision {value:.2f} under {name} features is below {ac.min_precision:.2f}")
    return {
        "share_ok": not private and not useful,
        "reasons": private + useful,
        "private": {
            "ok": not private,
            "reasons": private,
            "decided_by": "upper 95% bound of the memorised share (Clopper-Pearson); both 95% bounds of each "
            "attack's AUC (stratified bootstrap), against max_attack_auc and 1 - max_attack_auc",
        },
        "useful": {
            "ok": not useful,
            "reasons": useful,
            "decided_by": "lower 95% bound of the synthetic-only probe's balanced accuracy (lesion bootstrap) "
            "against chance; manifold precision per extractor",
        },
        "memorised_share": share,
        "memorised_share_upper": share_high,
        "max_memorised_share": ac.max_memorised_share,
        "attack": worst,  # the attack with the highest upper bound, whose AUC and bound follow
        "attack_auc": attacks[worst]["auc"],
        "attack_auc_upper": attacks[worst]["auc_ci"][1],
        "attack_aucs": {name: {"auc": a["auc"], "auc_upper": a["auc_ci"][1]} for name, a in attacks.items()},
        "max_attack_auc": ac.max_attack_auc,
        "probe_balanced_accuracy": probe,
        "probe_balanced_accuracy_lower": probe_low,
        "chance_balanced_accuracy": chance,
        "min_probe_gain": ac.min_probe_gain,
        "precision": precision,
        "min_precision": ac.min_precision,
    }


def failed_verdicts(gate: dict[str, Any]) -> list[str]:
    """The verdicts (``private``, ``useful``) a gate failed; a gate without them (no audit) fails none by name."""
    return [name for name in ("private", "useful") if not (gate.get(name) or {}).get("ok", True)]


def gate_line(gate: dict[str, Any]) -> str:
    """One line for the terminal: the verdicts, and why a failed one failed."""
    if gate["share_ok"]:
        return "share_ok (private and useful)"
    failed = [f"not {name}: " + "; ".join(gate[name]["reasons"]) for name in failed_verdicts(gate)]
    return "NOT share_ok: " + (" | ".join(failed) or "; ".join(gate["reasons"]))


def run_audit(cfg: ExperimentConfig, run_dir: str | Path, *, progress: Progress = print) -> dict[str, Any]:
    """Audit ``RUN_DIR/synthetic`` and write ``RUN_DIR/audit/``.

    Args:
        cfg: the experiment (``audit`` section; ``train.name`` names the classifier used as a feature extractor).
        run_dir: a run directory with prepared data, a trained generator and a sampled synthetic set.
        progress: receives one-line messages.

    Returns:
        The report (also written to ``RUN_DIR/audit/report.json``).

    Raises:
        AuditError: nothing to audit, or an extractor that was asked for is missing.
    """
    ac = cfg.audit
    run_dir = Path(run_dir)
    identity = audit_identity(cfg, run_dir)
    started = time.perf_counter()
    torch.manual_seed(ac.seed)
    train, held_out, synthetic = load_audit_images(run_dir)
    progress(
        f"audit: {len(synthetic.ids)} synthetic images against {len(train.ids)} training and {len(held_out.ids)} "
        f"held-out real images"
    )
    extractors, notes = choose_extractors(ac.extractor, layout(run_dir).model(cfg.train.name), ac.batch_size)
    for note in notes:  # e.g. no FID Inception network: said here, not only in report.json
        progress(f"audit: note: {note}")

    # fidelity, on a seeded subset of each set per extractor
    real_sub = train.subset(ac.max_images, ac.seed)
    held_sub = held_out.subset(ac.max_images, ac.seed + 1)
    syn_sub = synthetic.subset(ac.max_images, ac.seed + 2)
    fidelity_by_extractor: dict[str, Any] = {}
    steps: dict[str, float] = {}  # what each step took, in report.json
    feature_closeness: dict[str, Any] = {}
    for extractor in extractors:
        t0 = time.perf_counter()
        real_f, held_f, syn_f = (extractor(s.images) for s in (real_sub, held_sub, syn_sub))
        progress(
            f"audit: {extractor.name} features of {len(real_f) + len(held_f) + len(syn_f)} images in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        entry = fidelity_at_matched_n(real_f, held_f, syn_f, real_sub, syn_sub, ac)
        entry["extractor"] = extractor.description
        steps[f"fidelity ({extractor.name})"] = time.perf_counter() - t0
        fidelity_by_extractor[extractor.name] = entry
        reference = privacy.unit_rows(real_f)
        syn_sims, _ = privacy.nearest_neighbours(privacy.unit_rows(syn_f), reference)
        held_sims, _ = privacy.nearest_neighbours(privacy.unit_rows(held_f), reference)
        feature_closeness[extractor.name] = {
            "measure": f"cosine similarity of {extractor.name} features to the nearest of {len(real_f)} training "
            "images",
            **privacy.closeness_report(syn_sims, held_sims),
        }
        progress(
            f"audit: {extractor.name}: FID {entry['fid']:.2f} at n={entry['n']} per side (real-vs-real floor "
            f"{entry['fid_floor']:.2f} at n={entry['floor_n']}), KID {entry['kid_mean']:.4f} ± "
            f"{entry['kid_std']:.4f}, precision {entry['precision']:.2f}, recall {entry['recall']:.2f}"
        )
        if "floor_note" in entry:
            progress(f"audit: {extractor.name}: note: {entry['floor_note']}")

    t0 = time.perf_counter()
    utility = _utility(train, held_out, synthetic, ac, progress) if ac.utility else None
    steps["utility"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    memorisation, copy_scores = _memorisation(train, held_out, synthetic, ac, progress)
    steps["memorisation (near-copy search and its calibration)"] = time.perf_counter() - t0
    attacks = _membership(run_dir, train, held_out, ac, progress)
    for name, attack in attacks.items():
        steps[f"membership attack ({name})"] = attack["seconds"]

    gate = sharing_gate(memorisation, attacks, utility, fidelity_by_extractor, ac)

    audit_dir = layout(run_dir).audit
    tmp = audit_dir.with_name(f".{audit_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        figures = [
            privacy.gallery_figure(
                synthetic.images,
                train.images,
                copy_scores.synthetic,
                copy_scores.nearest,
                ac.gallery_pairs,
                memorisation["threshold"],
                tmp / AUDIT_GALLERY,
            ),
            similarity_figure(copy_scores, memorisation["threshold"], tmp / AUDIT_SIMILARITY),
        ]
        report = {
            "disclaimer": DISCLAIMER,
            # what this report was made from (stage identities), so a later sample or re-split shows it stale
            "inputs": dict(identity.inputs),
            "generator_id": json.loads(layout(run_dir).synthetic_card.read_text())["generator_id"],
            "images": {
                "synthetic": len(synthetic.ids),
                "train": len(train.ids),
                "held_out": len(held_out.ids),  # the validation split: the audit reads no test image
            },
            "extractors": [{"name": e.name, "description": e.description} for e in extractors],
            "notes": notes,
            "fidelity": fidelity_by_extractor,
            "utility": utility,
            "privacy": {
                "memorisation": memorisation,
                "feature_closeness": feature_closeness,
                "membership_inference": attacks,  # attack name (loss, pia) -> its figures and method
            },
            "gate": gate,
            "figures": figures,
            "config": config_to_dict(ac),
            "seconds": round(time.perf_counter() - started, 1),
            "step_seconds": {step: round(seconds, 1) for step, seconds in steps.items()},
        }
        (tmp / AUDIT_REPORT).write_text(json.dumps(report, indent=2))
        write_manifest(tmp, identity, share_ok=gate["share_ok"])
        replace_dir(tmp, audit_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"audit: {gate_line(gate)} -> {layout(run_dir).audit_report}")
    return report


def read_audit(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN_DIR/audit/report.json``, or None when the set was never audited."""
    try:
        return json.loads(layout(run_dir).audit_report.read_text())
    except (OSError, ValueError):
        return None
