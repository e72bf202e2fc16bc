"""Evaluation of a trained classifier: clinical metrics with lesion-bootstrap intervals, fairness, external sets.

The malignant-vs-benign operating point is chosen on validation (default: sensitivity >= 0.90) and then applied
unchanged to test and to external sets, as a deployed threshold would be. Outputs under ``RUN_DIR/eval/<model>/``:
``report.json``, ``fairness_test.csv``, PNG figures; and ``model_card.json`` next to the model's weights.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from skinsynth import DISCLAIMER, __version__
from skinsynth.classify import metrics as M
from skinsynth.config import EvaluateConfig, ExperimentConfig
from skinsynth.core.ledger import count_test_looks, describe_looks, record_test_look
from skinsynth.core.ray import git_commit
from skinsynth.core.rundir import (
    EVAL_FAIRNESS,
    EVAL_REPORT,
    MODEL_CARD,
    MODEL_TRAINING,
    MODEL_WEIGHTS,
    current_identity,
    layout,
    write_manifest,
)
from skinsynth.core.shards import decode_pngs, load_split_table, read_rows, split_ids, to_model_input
from skinsynth.core.storage import display_uri, local_prepared_copy, local_run_dir
from skinsynth.data.schema import CLASSES, age_band
from skinsynth.errors import SkinsynthError

Progress = Callable[[str], None]
EVAL_COLUMNS = ["image_id", "image", "label", "group_id", "tone", "tone_true", "sex", "age", "localization"]
CI_METRICS: dict[str, Callable] = {
    "balanced_accuracy": M.balanced_accuracy,
    "macro_auroc": M.macro_auroc,
    "malignant_auroc": M.malignant_auroc,
}


def load_trained_model(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The best weights of ``RUN_DIR/models/<name>`` in eval mode, with its ``training.json``."""
    from skinsynth.classify.models import create_classifier

    info_path = model_dir / MODEL_TRAINING
    if not info_path.is_file():
        raise SkinsynthError(f"no trained model at {model_dir}: run 'skinsynth train' first")
    info = json.loads(info_path.read_text())
    input_size = info.get("train_config", {}).get("input_size", 0)
    model = create_classifier(
        info["model"], num_classes=len(info["classes"]), pretrained="none", input_size=input_size
    )
    model.load_state_dict(torch.load(model_dir / MODEL_WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval(), info


def predict_probs(model: torch.nn.Module, images: pd.Series, batch_size: int = 128, tta: bool = False) -> np.ndarray:
    """Class probabilities for PNG-encoded images; with ``tta`` the mean over the four flips."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_model_input(decode_pngs(images.iloc[start : start + batch_size]), mean, std)
            views = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)] if tta else [x]
            out.append(torch.stack([torch.softmax(model(v), dim=1) for v in views]).mean(0))
    return torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)), np.float32)


def _with_intervals(probs: np.ndarray, labels: np.ndarray, resamples: M.LesionBootstrap) -> dict:
    intervals = {}
    for name, fn in CI_METRICS.items():
        try:
            low, high = M.bootstrap_ci(fn, probs, labels, None, resamples=resamples)
            intervals[name] = [low, high]
        except ValueError:  # undefined on every resample (e.g. no malignant lesion at all)
            intervals[name] = None
    return intervals


def _binary_with_intervals(scores, is_mal, threshold, resamples: M.LesionBootstrap) -> dict:
    point = M.binary_metrics_at(scores, is_mal, threshold)
    sens, spec = [], []
    for idx in resamples.indices():
        res = M.binary_metrics_at(scores[idx], is_mal[idx], threshold)
        if res["sensitivity"] is not None and res["specificity"] is not None:
            sens.append(res["sensitivity"])
            spec.append(res["specificity"])
    if sens:
        point["sensitivity_ci"] = [float(np.percentile(sens, 2.5)), float(np.percentile(sens, 97.5))]
        point["specificity_ci"] = [float(np.percentile(spec, 2.5)), float(np.percentile(spec, 97.5))]
    return point


def evaluate_split(
    model,
    rows: pd.DataFrame,
    threshold: float,
    *,
    n_boot: int,
    seed: int,
    tta: bool,
    judging: EvaluateConfig | None = None,
) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Metrics, intervals and the fairness table of one set of shard rows.

    One set of lesion resamples serves every interval: the overall metrics, each group's and the gaps between groups.
    ``judging`` holds the rule for which groups are judged (default: ``EvaluateConfig()``).
    """
    judging = judging or EvaluateConfig()
    probs = predict_probs(model, rows["image"], tta=tta)
    labels = rows["label"].to_numpy(np.int64)
    resamples = M.LesionBootstrap(rows["group_id"].to_numpy(), n_boot, seed)
    report = M.classification_metrics(probs, labels)
    report["intervals_95"] = _with_intervals(probs, labels, resamples)
    scores = M.malignant_scores(probs).numpy()
    is_mal = M.is_malignant_label(labels).numpy()
    report["malignant_vs_benign"] = _binary_with_intervals(scores, is_mal, threshold, resamples)
    rule = {"min_class_images": judging.min_class_images, "min_positives": judging.min_positives}
    attributes = rows[["tone", "sex", "localization"]].assign(age_band=rows["age"].map(age_band))
    fairness, gaps = M.fairness_report(probs, labels, attributes, threshold, resamples=resamples, **rule)
    if rows["tone_true"].notna().all():
        # simulated data knows each image's true tone: report it beside the ITA estimate, so the two can be compared
        true_tone, true_gaps = M.fairness_report(
            probs,
            labels,
            rows[["tone_true"]].rename(columns={"tone_true": "tone"}),
            threshold,
            resamples=resamples,
            **rule,
        )
        fairness = pd.concat([true_tone.assign(attribute="tone_true"), fairness], ignore_index=True)
        gaps = pd.concat([true_gaps.assign(attribute="tone_true"), gaps], ignore_index=True)
    report["fairness"] = M.fairness_summary(fairness, gaps)
    return report, fairness, probs


def evaluation_identity(cfg: ExperimentConfig, run_dir: str | Path, external: list[str] | tuple[str, ...] = ()):
    """An evaluation's identity: the model's, the prepared set's and the synthetic set's (the report scores the
    classifier on it too), plus the external sets named."""
    from skinsynth.core.rundir import StageIdentity, current_identity

    name = cfg.train.name
    inputs = {stage: current_identity(run_dir, stage) for stage in (f"model:{name}", "data", "synthetic")}
    settings = {"external": [display_uri(e) for e in external]} if external else {}
    return StageIdentity(f"eval:{name}", settings, inputs, {"train.name": name, "external": list(external)})


def evaluate_model(
    cfg: ExperimentConfig,
    *,
    external: list[str] | tuple[str, ...] = (),
    tta: bool = False,
    n_boot: int = 1000,
    min_sensitivity: float = 0.90,
    shift: bool = False,
    progress: Progress = print,
) -> dict[str, Any]:
    """Evaluate ``RUN_DIR/models/<train.name>`` on validation (operating point), test and external run dirs.

    Args:
        cfg: the experiment (``run.out`` holds ``data/`` and ``models/<train.name>``).
        external: run directories of other prepared sources (e.g. ISIC 2017); all their images are used, metrics
            restricted to the classes they contain.
        tta: average predictions over the four flips.
        n_boot: lesion-bootstrap resamples for the 95% intervals.
        min_sensitivity: malignant sensitivity the validation operating point must reach.
        shift: also score test under the acquisition-shift corruption suite (``skinsynth.classify.shift``):
            ``shift.csv``, ``shift.png`` and a ``shift`` block in the report.
        progress: receives one-line messages.

    Returns:
        The report (also written to ``RUN_DIR/eval/<name>/report.json``).
    """
    run_dir = local_run_dir(cfg.run).resolve()
    model_dir = layout(run_dir).model(cfg.train.name)
    model, info = load_trained_model(model_dir)
    splits = load_split_table(run_dir)
    out_dir = layout(run_dir).evaluation(cfg.train.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    val = read_rows(run_dir, split_ids(splits, "val"), EVAL_COLUMNS)
    val_probs = predict_probs(model, val["image"], tta=tta)
    val_labels = val["label"].to_numpy(np.int64)
    threshold = M.choose_operating_point(
        M.malignant_scores(val_probs), M.is_malignant_label(val_labels), min_sensitivity
    )
    progress(f"evaluate: operating point {threshold:.4f} (validation malignant sensitivity >= {min_sensitivity})")

    test = read_rows(run_dir, split_ids(splits, "test"), EVAL_COLUMNS)
    test_report, fairness, test_probs = evaluate_split(
        model, test, threshold, n_boot=n_boot, seed=cfg.run.seed, tta=tta, judging=cfg.evaluate
    )
    # every score on test is a look at it: recorded before anything else is done with the numbers
    model_id = current_identity(run_dir, f"model:{cfg.train.name}") or info["model"]
    record_test_look(run_dir, model_id=model_id, metrics=sorted(test_report), n_images=len(test))
    looks = count_test_looks(run_dir)
    fairness.to_csv(out_dir / EVAL_FAIRNESS, index=False)
    report: dict[str, Any] = {
        "model": info["model"],
        "model_dir": str(model_dir),
        "data_source": info.get("data_source"),
        # how the splits were grouped (data card): lesion_id, estimated (image similarity) or image
        "lesion_grouping": json.loads(card.read_text()).get("grouping")
        if (card := layout(run_dir).data_card).is_file()
        else None,
        "disclaimer": DISCLAIMER,
        "tta": tta,
        "operating_point": {"threshold": threshold, "chosen_on": "val", "min_sensitivity": min_sensitivity},
        "validation": {"n": int(len(val)), **M.classification_metrics(val_probs, val_labels)},
        "test": test_report,
        "test_looks": looks,
        "external": {},
    }
    adjustment = info.get("logit_adjustment")
    if adjustment:
        # the same test images through the head as trained: what the validation-chosen adjustment changed on test
        plain_probs = predict_probs(without_logit_adjustment(model, adjustment), test["image"], tta=tta)
        plain = M.classification_metrics(plain_probs, test["label"].to_numpy(np.int64))
        report["logit_adjustment"] = {
            **adjustment,
            "test_without": {k: plain[k] for k in ("balanced_accuracy", "macro_auroc", "ece")},
        }
        progress(
            f"evaluate: logit adjustment tau {adjustment['tau']:+.1f}; without it test balanced accuracy would be "
            f"{plain['balanced_accuracy']:.3f}, macro AUROC {plain['macro_auroc']:.3f}"
        )
    progress(
        f"evaluate: test balanced accuracy {test_report['balanced_accuracy']:.3f} "
        f"{_fmt_ci(test_report['intervals_95']['balanced_accuracy'])}, macro AUROC {test_report['macro_auroc']:.3f} "
        f"{_fmt_ci(test_report['intervals_95']['macro_auroc'])} on {len(test)} images; {describe_looks(looks)}"
    )
    for ext_location in external:
        # a prepared set on a storage URI is read from a pulled local copy; the report names it as given
        ext_dir = local_prepared_copy(ext_location, "external set", progress)
        ext_rows = read_rows(ext_dir, list(load_split_table(ext_dir)["image_id"]), EVAL_COLUMNS)
        ext_probs = predict_probs(model, ext_rows["image"], tta=tta)
        ext_labels = ext_rows["label"].to_numpy(np.int64)
        present = [CLASSES[i] for i in sorted(set(ext_labels.tolist()))]
        ext = M.external_metrics(ext_probs, ext_labels, present)
        ext["n"] = int(len(ext_rows))
        scores = M.malignant_scores(ext_probs).numpy()
        ext["malignant_vs_benign"] = M.binary_metrics_at(scores, M.is_malignant_label(ext_labels).numpy(), threshold)
        # the internal test images of the same classes, scored the same way: the fair baseline for the drop
        test_labels = test["label"].to_numpy(np.int64)
        same = np.isin(test_labels, [CLASSES.index(c) for c in present])
        internal_restricted = M.external_metrics(test_probs[same], test_labels[same], present)
        ext["internal_test_same_classes"] = internal_restricted
        ext["drop_from_internal_test"] = M.metric_drop(internal_restricted, ext)
        name = display_uri(ext_location)
        report["external"][name] = ext
        progress(
            f"evaluate: external {name}: balanced accuracy {ext['balanced_accuracy']:.3f} over {present} "
            f"(internal test, same classes: {internal_restricted['balanced_accuracy']:.3f})"
        )
    if shift:
        from skinsynth.classify.shift import METRICS as SHIFT_METRICS
        from skinsynth.classify.shift import evaluate_shift, preprocess_of_run

        # every corruption x severity is scored on test: one look, recorded before the numbers exist
        record_test_look(run_dir, model_id=model_id, metrics=[f"shift.{m}" for m in SHIFT_METRICS], n_images=len(test))
        report["shift"] = evaluate_shift(
            test,
            lambda images: predict_probs(model, images, tta=tta),
            preprocess_of_run(run_dir, cfg.data.preprocess),
            threshold,
            out_dir,
            n_boot=n_boot,
            seed=cfg.run.seed,
            clean_stored={
                "balanced_accuracy": test_report["balanced_accuracy"],
                "malignant_sensitivity": test_report["malignant_vs_benign"]["sensitivity"],
            },
            progress=progress,
        )
        report["test_looks"] = count_test_looks(run_dir)
    synthetic = synthetic_conditioning(model, run_dir, tta=tta)
    if synthetic is not None:
        report["synthetic_conditioning"] = synthetic
        progress(
            f"evaluate: on {synthetic['n']} synthetic images the classifier names the generator's conditioning class "
            f"with accuracy {synthetic['accuracy']:.3f}, balanced accuracy {synthetic['balanced_accuracy']:.3f} "
            f"(chance {synthetic['chance_balanced_accuracy']:.3f})"
        )
    report["seconds"] = round(time.perf_counter() - t0, 1)

    from skinsynth.classify.figures import write_figures

    report["figures"] = write_figures(out_dir, test, test_probs, report, fairness)
    identity = evaluation_identity(cfg, run_dir, external)
    report["inputs"] = dict(identity.inputs)  # what this report was made from (stage identities)
    (out_dir / EVAL_REPORT).write_text(json.dumps(report, indent=2, default=_json_default))
    write_manifest(out_dir, identity)
    write_model_card(model_dir, info, report, cfg)
    progress(f"evaluate: report written to {out_dir / EVAL_REPORT}")
    return report


def without_logit_adjustment(model: torch.nn.Module, adjustment: dict[str, Any]) -> torch.nn.Module:
    """A copy of an exported model with the logit adjustment taken out of its head's bias (the head as trained)."""
    import copy

    plain = copy.deepcopy(model)
    bias = plain.get_parameter(adjustment["head_bias"])
    with torch.no_grad():
        bias -= torch.tensor(adjustment["logit_offsets"], dtype=bias.dtype)
    return plain


def synthetic_conditioning(model: torch.nn.Module, run_dir: Path, *, tta: bool = False) -> dict[str, Any] | None:
    """How often a classifier trained on real images names the class a synthetic image was conditioned on.

    The check of class conditioning used by conditional-GAN and diffusion papers (the "classification accuracy"
    of Shmelkov et al. 2018, "How good is my GAN?"): far above chance means the generator's classes are
    recognisable; at chance, the conditioning is not working. None when the run has no synthetic set.
    """
    import pyarrow.parquet as pq

    shards = layout(run_dir).synthetic_images
    if not shards.is_dir():
        return None
    rows = pq.read_table(shards, columns=["image", "label", "generator_id"]).to_pandas()
    if rows.empty:
        return None
    labels = rows["label"].to_numpy(np.int64)
    preds = predict_probs(model, rows["image"], tta=tta).argmax(1)
    present = sorted(set(labels.tolist()))
    recall = {CLASSES[c]: float(np.mean(preds[labels == c] == c)) for c in present}
    return {
        "n": int(len(rows)),
        "generator_id": str(rows["generator_id"].iloc[0]),
        "accuracy": float(np.mean(preds == labels)),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "recall_per_class": recall,
        "n_per_class": {CLASSES[c]: int(np.sum(labels == c)) for c in present},
        "chance_balanced_accuracy": 1.0 / len(present),
        "chance_accuracy_uniform_guess": 1.0 / len(CLASSES),
    }


def _fmt_ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[n/a]"


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return str(value)


def write_model_card(model_dir: Path, info: dict[str, Any], report: dict[str, Any], cfg: ExperimentConfig) -> Path:
    """``model_card.json`` next to the weights (Mitchell et al. 2019, "Model cards for model reporting")."""
    import timm
    import torchmetrics

    from skinsynth.classify.models import pretrained_source

    test = report["test"]
    card = {
        "model": info["model"],
        "weights": str(model_dir / MODEL_WEIGHTS),
        "pretrained": pretrained_source(info["model"], info["train_config"]["pretrained"]),
        "classes": info["classes"],
        "image_size": info["image_size"],
        # the side the network sees: images are upsampled inside the model when train.input_size sets it
        "input_size": info["train_config"].get("input_size") or info["image_size"],
        "data": {"source": info.get("data_source"), "run_dir": str(local_run_dir(cfg.run).resolve())},
        "training": {k: info[k] for k in ("best_epoch", "best_val_balanced_accuracy")},
        "metrics_test": {
            "balanced_accuracy": test["balanced_accuracy"],
            "macro_auroc": test["macro_auroc"],
            "malignant_vs_benign": test["malignant_vs_benign"],
            "ece": test["ece"],
            "intervals_95": test["intervals_95"],
        },
        # how often this data set's test split had been looked at, by how many models, when these were computed
        "test_looks": report.get("test_looks"),
        "operating_point": report["operating_point"],
        "logit_adjustment": report.get("logit_adjustment"),
        "intended_use": "Research on skin-lesion classification, data efficiency and fairness. " + DISCLAIMER,
        "limitations": [
            "Not validated clinically; never use for diagnosis.",
            "Skin tone is estimated (ITA), not Fitzpatrick type; dark skin is scarce or absent in the real data.",
            "Trained on dermoscopy images of one source; performance drops under domain shift (see external).",
        ],
        "versions": {
            "skinsynth": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "torchmetrics": torchmetrics.__version__,
            "python": platform.python_version(),
        },
        "seed": info["train_config"]["seed"],
        "git_commit": git_commit(),
    }
    path = model_dir / MODEL_CARD
    path.write_text(json.dumps(card, indent=2, default=_json_default))
    return path
