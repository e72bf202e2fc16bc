"""The skinsynth results viewer (Streamlit): reads run directories, calls the serve endpoint, computes nothing heavy.

Run it with ``skinsynth view --runs runs/ --endpoint http://127.0.0.1:8000``, which starts
``streamlit run app.py -- --runs ... --endpoint ...``. Without script arguments the settings come from the
environment (``SKINSYNTH_RUNS``, ``SKINSYNTH_ENDPOINT``), which is how the tests drive it.

Pages: Overview, Data, Synthetic, Audit, Study, Evaluation, Try it. Each page works on a run directory with only some
stages done: it names what is missing and the command that makes it, and a damaged file is shown as an error naming
that file while the rest of the page, and every other page, still renders.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import streamlit as st

from skinsynth import DISCLAIMER
from skinsynth.core.ledger import count_test_looks
from skinsynth.core.rundir import (
    AUDIT_GALLERY,
    AUDIT_SIMILARITY,
    BEST_MODEL,
    CONFIG_FILE,
    DATA_CARD,
    EVAL_FAIRNESS,
    EVAL_REPORT,
    MANIFEST,
    MODEL_TRAINING,
    SWEEP_BEST,
    SWEEP_SUMMARY,
    SYNTHETIC_CARD,
    layout,
)
from skinsynth.data.schema import CLASSES
from skinsynth.view import runs as R

PAGES = ("Overview", "Data", "Synthetic", "Audit", "Study", "Evaluation", "Try it")
IMAGE_WIDTH = 96  # prepared images are 32-128 px; shown at one size so galleries line up


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Show a damaged file as an error naming it, and let the rest of the page render."""
    try:
        yield
    except R.UnreadableFile as err:
        st.error(f"Cannot read {what}: {err}")


def _signature(path: Path) -> tuple[tuple[str, float, int], ...]:
    """Names, modification times and sizes of a file or a folder's files: the cache key that notices rewrites."""
    files = sorted(path.glob("*")) if path.is_dir() else [path] if path.exists() else []
    return tuple((f.name, f.stat().st_mtime, f.stat().st_size) for f in files if f.is_file())


@st.cache_data(show_spinner=False, max_entries=32)
def _image_index(images_dir: str, extra: tuple[str, ...], _key: tuple) -> pd.DataFrame | None:
    return R.read_image_index(Path(images_dir), list(extra))


@st.cache_data(show_spinner=False, max_entries=64)
def _image_bytes(images_dir: str, image_ids: tuple[str, ...], _key: tuple) -> dict[str, bytes]:
    return R.read_image_bytes(Path(images_dir), list(image_ids))


def image_index(images_dir: Path, extra: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """The shard index of ``images_dir`` (cached until its files change)."""
    return _image_index(str(images_dir), extra, _signature(images_dir))


def image_bytes(images_dir: Path, image_ids: list[str]) -> dict[str, bytes]:
    """PNG bytes of ``image_ids`` from ``images_dir`` (cached until its files change)."""
    return _image_bytes(str(images_dir), tuple(image_ids), _signature(images_dir))


def _missing(stage: str, run_dir: Path, what: str | None = None) -> None:
    st.info(R.missing_message(stage, run_dir, what))


def _fmt(value: object, digits: int = 3) -> str:
    """A number for a metric tile; ``—`` for a figure the report leaves undefined."""
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# --- pages ---------------------------------------------------------------------------------------------------------


def page_overview(run_dir: Path, endpoint: str) -> None:
    """Which stages exist, when they were made and how long they took; the resolved config."""
    st.header(f"Overview: {run_dir.name}")
    st.caption(str(run_dir))
    statuses = R.stage_statuses(run_dir)
    rows = [
        {
            "stage": s.stage.name,
            "status": ("STALE" if s.stale else "done") if s.done else "missing",
            "created": s.created or "",
            "seconds": s.seconds,
            "contents": s.detail,
            "command to make it": "" if s.done else s.stage.how_to_make(run_dir),
        }
        for s in statuses
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    done = sum(s.done for s in statuses)
    st.caption(
        f"{done} of {len(statuses)} stages done. 'created' comes from each stage's {MANIFEST} (written by "
        "`skinsynth run`/`demo`); 'seconds' is the duration the stage recorded in its card or report."
    )
    for status in statuses:
        for problem in status.problems:
            st.error(f"Stage {status.stage.name}: {problem}")
    for status in statuses:
        for line in status.stale:
            st.warning(f"Stale: {line}")
    st.subheader("Compute and energy")
    compute = R.compute_table(run_dir)
    if compute is None:
        st.info(f"No stage of {run_dir} recorded its compute: stages record it in their {MANIFEST} when they run.")
    else:
        st.dataframe(compute, hide_index=True)
        st.caption(
            f"Each stage's figures as its {MANIFEST} recorded them when it last ran; TOTAL sums them (peak MB: the "
            "highest). CPU time and energy cover this machine's processes (the driver and its descendants, a local "
            "Ray's included). Energy is CodeCarbon's estimate (its TDP model where the CPU has no RAPL counters) or, "
            "where it could not run, CPU time x run.cpu_watts_per_core; CO2e = energy x "
            "run.carbon_intensity_g_per_kwh."
        )
    st.subheader("Each stage's config")
    st.caption(f"The resolved config each stage ran with (`--set` values included), from its {MANIFEST}.")
    for status in statuses:
        for folder, config in status.configs.items():
            with st.expander(f"{status.stage.name}: {folder}"):
                st.json(config, expanded=False)
    st.subheader(CONFIG_FILE)
    with reading(CONFIG_FILE):
        text = R.load_yaml_text(layout(run_dir).config)
        if text is None:
            st.info(f"No {CONFIG_FILE} in {run_dir}: every skinsynth command writes the resolved config there.")
        else:
            st.code(text, language="yaml")


def _distribution(card: dict, key: str, title: str) -> None:
    table = R.card_distribution(card, key)
    if table is None:
        st.caption(f"{title}: not in the data card")
        return
    st.markdown(f"**{title}**")
    st.bar_chart(table.set_index(key), height=220)


def _gallery(images_dir: Path, rows: pd.DataFrame, captions: list[str]) -> None:
    pngs = image_bytes(images_dir, list(rows["image_id"]))
    shown = [(pngs[i], c) for i, c in zip(rows["image_id"], captions) if i in pngs]
    if shown:
        st.image([p for p, _ in shown], caption=[c for _, c in shown], width=IMAGE_WIDTH)


def page_data(run_dir: Path, endpoint: str) -> None:
    """The data card, the distributions it counts, the splits and a few images per class."""
    st.header("Data")
    run = layout(run_dir)
    if not run.data.is_dir():
        _missing("data", run_dir)
        return
    card = None
    with reading(run.relative(run.data_card)):
        card = R.load_json_object(run.data_card)
        if card is None:
            _missing("data", run_dir, run.relative(run.data_card))
    if card:
        if card.get("simulated"):
            st.warning(f"Simulated data ({card.get('source')}): {card.get('licence', '')}. Not clinical images.")
        cols = st.columns(4)
        cols[0].metric("images", card.get("images"))
        cols[1].metric("lesion groups", card.get("lesion_groups"))
        cols[2].metric("quarantined", card.get("quarantined"))
        cols[3].metric("image size (px)", card.get("image_size"))
        st.caption(f"source: {card.get('source')} · licence: {card.get('licence')} · citation: {card.get('citation')}")
        left, right = st.columns(2)
        with left:
            _distribution(card, "classes", "class")
            _distribution(card, "sex", "sex")
        with right:
            _distribution(card, "tone", "estimated skin tone (ITA)")
            _distribution(card, "age_band", "age band")
        if card.get("tone_note"):
            st.caption(card["tone_note"])
        if card.get("class_by_split"):
            st.markdown("**class by split**")
            st.dataframe(pd.DataFrame(card["class_by_split"]).T)
        if card.get("quarantine_reasons"):
            st.markdown("**quarantine reasons**")
            st.dataframe(pd.Series(card["quarantine_reasons"], name="items"))
        with st.expander(DATA_CARD):
            st.json(card, expanded=False)
    with reading(run.relative(run.splits)):
        splits = R.load_table(run.splits, ("image_id", "split"))
        if splits is None:
            _missing("data", run_dir, run.relative(run.splits))
        else:
            st.markdown("**splits** (lesion-grouped; `labelled` = images whose label training may use)")
            st.dataframe(R.split_counts(splits), hide_index=True)
    st.subheader("Sample images per class")
    with reading(run.relative(run.data_images)):
        index = image_index(run.data_images)
        if index is None:
            _missing("data", run_dir, f"{run.relative(run.data_images)}/*.parquet")
            return
        per_class = st.slider("images per class", 1, 8, 4, key="data_per_class")
        picked = R.pick_per_class(index, per_class)
        for dx in [c for c in CLASSES if c in set(picked["dx"])]:
            rows = picked[picked["dx"] == dx]
            st.markdown(f"**{dx}**")
            _gallery(run.data_images, rows, list(rows["image_id"]))


def page_synthetic(run_dir: Path, endpoint: str) -> None:
    """Real and synthetic images of each class side by side, with the synthetic images' provenance."""
    st.header("Synthetic")
    run = layout(run_dir)
    if not run.synthetic.is_dir():
        _missing("synthetic", run_dir)
        if not run.generator.is_dir():
            _missing("generator", run_dir, f"{run.relative(run.generator)}/ (needed first)")
        return
    with reading(run.relative(run.synthetic_card)):
        card = R.load_json_object(run.synthetic_card)
        if card is None:
            _missing("synthetic", run_dir, run.relative(run.synthetic_card))
        else:
            st.warning(card.get("note", "synthetic images from a generative model: not real patients"))
            cols = st.columns(4)
            cols[0].metric("synthetic images", card.get("images"))
            cols[1].metric("generator", card.get("generator_id"))
            settings = card.get("sample") or {}
            cols[2].metric("sampler", f"{settings.get('sampler')} · {settings.get('steps')} steps")
            cols[3].metric("guidance", settings.get("guidance"))
            if card.get("classes"):
                st.bar_chart(pd.Series(card["classes"], name="images"), height=200)
            with st.expander(SYNTHETIC_CARD):
                st.json(card, expanded=False)
    grid = run.generator_grid
    if grid.is_file():
        with st.expander(f"{run.relative(grid)} (one row per class)"):
            st.image(str(grid))
    st.subheader("Real | synthetic, per class")
    per_class = st.slider("images per class", 1, 8, 4, key="synthetic_per_class")
    real_index = None
    with reading(run.relative(run.data_images)):
        real_index = image_index(run.data_images)
        if real_index is None:
            _missing("data", run_dir, f"{run.relative(run.data_images)} (the real side)")
    with reading(run.relative(run.synthetic_images)):
        fake_index = image_index(run.synthetic_images, tuple(R.PROVENANCE_COLUMNS))
        if fake_index is None:
            _missing("synthetic", run_dir, f"{run.relative(run.synthetic_images)}/*.parquet")
            return
        fake = R.pick_per_class(fake_index, per_class)
        real = R.pick_per_class(real_index, per_class) if real_index is not None else None
        for dx in [c for c in CLASSES if c in set(fake["dx"])]:
            st.markdown(f"**{dx}**")
            left, right = st.columns(2)
            with left:
                st.caption("real")
                if real is not None and (real["dx"] == dx).any():
                    rows = real[real["dx"] == dx]
                    _gallery(run.data_images, rows, [f"real · {i}" for i in rows["image_id"]])
            with right:
                st.caption("synthetic")
                rows = fake[fake["dx"] == dx]
                _gallery(run.synthetic_images, rows, [R.provenance_caption(r) for r in rows.to_dict("records")])


def page_audit(run_dir: Path, endpoint: str) -> None:
    """Fidelity, utility and privacy of the synthetic set, and the export gate."""
    st.header("Audit")
    run = layout(run_dir)
    report = None
    with reading(run.relative(run.audit_report)):
        report = R.load_json_object(run.audit_report)
    if report is None:
        if not run.audit_report.exists():
            _missing("audit", run_dir, run.relative(run.audit_report))
        return
    gate = report.get("gate") or {}
    if gate.get("share_ok"):
        worst = f", {gate['attack']}, the worst attack" if gate.get("attack") else ""
        st.success(
            f"Gate passed, private and useful: memorised share {_fmt(gate.get('memorised_share'))} (upper bound "
            f"{_fmt(gate.get('memorised_share_upper'))}) < {gate.get('max_memorised_share')}, attack AUC "
            f"{_fmt(gate.get('attack_auc'))} (upper bound {_fmt(gate.get('attack_auc_upper'))}{worst}) < "
            f"{gate.get('max_attack_auc')}; synthetic-only probe above chance; `generate export` may share it."
        )
    else:
        failed = [f"not {name}" for name in ("private", "useful") if not (gate.get(name) or {}).get("ok", True)]
        st.error(
            "Gate failed"
            + (f" ({', '.join(failed)})" if failed else "")
            + ": "
            + "; ".join(gate.get("reasons") or ["no verdict recorded"])
        )
    images = report.get("images") or {}
    cols = st.columns(4)
    for col, key in zip(cols, ("synthetic", "train", "held_out", "test")):
        col.metric(f"{key} images", images.get(key))
    for note in report.get("notes") or []:
        st.caption(note)

    st.subheader("Fidelity")
    st.dataframe(R.fidelity_table(report), hide_index=True)
    st.caption(
        "FID/KID (lower is better) and precision/recall/density/coverage (higher is better) per feature extractor. "
        "Every figure is at n images per side (the larger set subsampled): FID is biased upwards at small n, so only "
        "figures at the same n compare. fid_floor/kid_floor are real training against held-out real images at "
        "floor_n: the floor. n_real_available/n_synthetic_available are the counts n was drawn from."
    )
    for extractor, block in (report.get("fidelity") or {}).items():
        if block.get("floor_note"):
            st.caption(f"{extractor}: {block['floor_note']}")
        with st.expander(f"per class ({extractor})"):
            st.dataframe(R.fidelity_per_class_table(report, extractor), hide_index=True)

    st.subheader("Utility (Classification Accuracy Score)")
    utility = report.get("utility")
    if not utility:
        st.info("No utility block in this report (audit.utility was off, or the audit predates it).")
    else:
        st.dataframe(R.utility_table(utility), hide_index=True)
        cols = st.columns(3)
        cols[0].metric("balanced accuracy ratio (synthetic / real)", _fmt(utility.get("balanced_accuracy_ratio")))
        cols[1].metric("chance balanced accuracy", _fmt(utility.get("chance_balanced_accuracy")))
        # older reports scored on test ("n_test"); since then on validation ("n_scored")
        scored_on = utility.get("scored_on", "test")
        cols[2].metric(f"real {scored_on} images scored", utility.get("n_scored", utility.get("n_test")))
        st.caption(utility.get("method", ""))

    st.subheader("Privacy")
    privacy = report.get("privacy") or {}
    memo, attacks = privacy.get("memorisation") or {}, R.membership_attacks(privacy)
    # the tiles show the attack the gate judged worst (the highest upper bound of its AUC)
    worst = gate.get("attack") or next(iter(attacks), None)
    attack = attacks.get(worst) or {}
    cols = st.columns(4)
    cols[0].metric("memorisation rate", _fmt(memo.get("memorised_share")))
    cols[1].metric("memorised images", memo.get("memorised_images"))
    cols[2].metric("membership attack AUC", _fmt(attack.get("auc")), help=f"the worst attack: {worst}")
    cols[3].metric("attack TPR at 1% FPR", _fmt(attack.get("tpr_at_1pct_fpr")), help=f"the worst attack: {worst}")
    st.caption(
        f"copy threshold {_fmt(memo.get('threshold'))} ({memo.get('measure', '')}); the tiles show the attack "
        f"with the highest upper bound of its AUC ({worst}), on {attack.get('n_members')} members vs "
        f"{attack.get('n_non_members')} non-members (0.5 = no leak)."
    )
    calibration = memo.get("calibration") or {}
    if calibration:
        positives, planted = calibration.get("positives") or {}, calibration.get("planted") or {}
        st.caption(
            f"copy threshold calibrated on {positives.get('n')} {positives.get('what', '')}: caught "
            f"{_fmt(positives.get('rate'))}; held-out real images above it "
            f"{_fmt(memo.get('held_out_above_threshold'))} of {memo.get('held_out_n')}; planted near-copies caught: "
            + ", ".join(f"{kind} {_fmt(entry.get('rate'))}" for kind, entry in planted.items())
        )
    if attacks:
        st.dataframe(R.membership_table(privacy), hide_index=True)
        with st.expander("membership attacks per class (rarest first)"):
            st.dataframe(R.membership_per_class_table(privacy), hide_index=True)
    for figure, title in (
        (AUDIT_GALLERY, "nearest training image of the most similar synthetic images"),
        (AUDIT_SIMILARITY, "similarity to the training set"),
    ):
        path = run.audit / figure
        if path.is_file():
            st.image(str(path), caption=f"{run.relative(path)}: {title}")
        else:
            st.warning(f"{run.relative(path)} is missing from {run.audit}")
    st.caption(report.get("disclaimer", DISCLAIMER))


def _error_bar_chart(frame: pd.DataFrame, x_title: str, y_title: str) -> None:
    import altair as alt

    base = alt.Chart(frame).encode(
        x=alt.X("x:Q", title=x_title), color=alt.Color("series:N", title="cell"), tooltip=list(frame.columns)
    )
    chart = base.mark_line(point=True).encode(y=alt.Y("mean:Q", title=y_title)) + base.mark_errorbar().encode(
        y="low:Q", y2="high:Q"
    )
    st.altair_chart(chart)


LABEL_FRACTION_KEYS = ("train.label_fraction", "data.split.label_fraction")


def page_study(run_dir: Path, endpoint: str) -> None:
    """A sweep's trials, its metric against the synthetic ratio and the label fraction, and the best trial."""
    st.header("Study")
    run = layout(run_dir)
    sweeps = R.find_sweeps(run_dir)
    if not sweeps:
        _missing("sweep", run_dir, run.relative(run.sweep_trials("<name>")))
        return
    sweep_dir = sweeps[0] if len(sweeps) == 1 else st.selectbox("sweep", sweeps, format_func=lambda p: p.name)
    st.caption(str(sweep_dir))
    trials = R.read_trials(sweep_dir)
    for problem in trials.problems:
        st.error(f"Cannot read the trials table: {problem}")
    if trials.table is not None:
        table = trials.table
        if trials.problems:
            st.warning(f"Showing {trials.source.name} instead.")
        errored = int(table["error"].notna().sum()) if "error" in table.columns else 0
        st.markdown(f"**{len(table)} trials** ({errored} failed) from `{trials.source.name}`; click a header to sort.")
        st.dataframe(table, hide_index=True)

    st.subheader("Metric vs synthetic ratio and label fraction")
    summary = None
    with reading(run.relative(sweep_dir / SWEEP_SUMMARY)):
        summary = R.load_table(sweep_dir / SWEEP_SUMMARY)
    if summary is not None and R.summary_metrics(summary):
        metrics = R.summary_metrics(summary)
        metric = st.selectbox("metric", metrics, key="study_metric")
        keys = R.summary_keys(summary)
        st.dataframe(summary, hide_index=True)
        plotted = [k for k in ("train.mix.ratio", *LABEL_FRACTION_KEYS) if k in keys]
        for key in plotted:
            st.markdown(f"**{metric} vs {key}** (mean ± sample std over seeds)")
            _error_bar_chart(R.error_bar_frame(summary, key, metric), key, metric)
        if not plotted:
            st.info(f"This grid sweeps {keys}, neither the synthetic ratio nor the label fraction.")
    elif trials.table is not None:
        table = trials.table
        keys = [k for k in ("train.mix.ratio", *LABEL_FRACTION_KEYS) if k in table.columns]
        st.info(f"No {SWEEP_SUMMARY} (an Optuna search, not a grid): one point per trial, no error bars.")
        for key in keys:
            st.scatter_chart(table, x=key, y="best_val_balanced_accuracy")

    st.subheader("Best trial (chosen on validation)")
    with reading(run.relative(sweep_dir / SWEEP_BEST)):
        best = R.load_json_object(sweep_dir / SWEEP_BEST)
        if best is None:
            st.info(
                f"No {SWEEP_BEST} in {sweep_dir}: the sweep has not finished (re-run `skinsynth tune` to resume it)."
            )
        else:
            cols = st.columns(3)
            cols[0].metric("best validation balanced accuracy", _fmt(best.get("best_val_balanced_accuracy")))
            cols[1].metric("its test balanced accuracy", _fmt(best.get("test_balanced_accuracy")))
            cols[2].metric("its test macro AUROC", _fmt(best.get("test_macro_auroc")))
            st.markdown(f"trial `{best.get('trial_id')}` with")
            st.json(best.get("params") or {})
    best_model = run.model(BEST_MODEL)
    with reading(run.relative(best_model / MODEL_TRAINING)):
        training = R.load_json_object(best_model / MODEL_TRAINING)
        if training is None:
            st.info(
                f"No {run.relative(best_model)} in {run_dir}: the sweep exports its best trial there when it finishes."
            )
        else:
            with st.expander(f"{run.relative(best_model)}: the best trial's training config"):
                st.json(training.get("train_config") or {}, expanded=False)


def page_evaluation(run_dir: Path, endpoint: str) -> None:
    """A model's test metrics with intervals, figures, fairness per group, and internal vs external sets."""
    st.header("Evaluation")
    run = layout(run_dir)
    evaluations = R.find_evaluations(run_dir)
    if not evaluations:
        _missing("eval", run_dir)
        return
    eval_dir = st.selectbox("model", evaluations, format_func=lambda p: p.name, key="eval_model")
    report = None
    with reading(run.relative(eval_dir / EVAL_REPORT)):
        report = R.load_json_object(eval_dir / EVAL_REPORT)
        if report is None:
            _missing("eval", run_dir, run.relative(eval_dir / EVAL_REPORT))
    if report is None:
        return
    test = report.get("test") or {}
    intervals = test.get("intervals_95") or {}
    st.markdown(f"**{report.get('model')}** on {report.get('data_source')} test split, n = {test.get('n')}")
    # the ledger now (every look since, by any model) and what it held when this report was written
    now = count_test_looks(run_dir)
    then = report.get("test_looks") or {}
    looked = f"this report was look {then['looks']}; " if then.get("looks") else ""
    st.caption(
        f"Test split looked at {now['looks']} time(s) by {now['models']} model(s) for this data set ({looked}ledger: "
        f"{run.relative(Path(now['ledger']))}). Every look that informs a choice spends the test set's independence: "
        "choose on validation."
    )
    cols = st.columns(4)
    for col, metric in zip(cols, ("balanced_accuracy", "macro_auroc", "malignant_auroc", "ece")):
        ci = intervals.get(metric)
        col.metric(metric, _fmt(test.get(metric)), help=None)
        if ci:
            col.caption(f"95% CI {_fmt(ci[0])}-{_fmt(ci[1])}")
    mvb = test.get("malignant_vs_benign") or {}
    op = report.get("operating_point") or {}
    if mvb:
        sens_ci = mvb.get("sensitivity_ci") or [None, None]
        st.markdown(
            f"Malignant vs benign at threshold {_fmt(op.get('threshold'), 4)} (chosen on {op.get('chosen_on')} for "
            f"sensitivity >= {op.get('min_sensitivity')}): sensitivity {_fmt(mvb.get('sensitivity'))} "
            f"(95% CI {_fmt(sens_ci[0])}-{_fmt(sens_ci[1])}), "
            f"specificity {_fmt(mvb.get('specificity'))} on {mvb.get('n_pos')} malignant / {mvb.get('n_neg')} benign."
        )
    st.dataframe(R.per_class_table(test), hide_index=True)

    st.subheader("Figures")
    figures = [name for name in report.get("figures") or [] if isinstance(name, str)]
    cols = st.columns(2)
    for i, name in enumerate(figures):
        path = eval_dir / name
        with cols[i % 2]:
            if path.is_file():
                st.image(str(path), caption=name)
            else:
                st.warning(f"{run.relative(path)} is listed in the report but missing")

    st.subheader("Fairness")
    gaps = R.fairness_gaps(test)
    if not gaps.empty:
        st.dataframe(gaps, hide_index=True)
    with reading(run.relative(eval_dir / EVAL_FAIRNESS)):
        fairness = R.load_table(eval_dir / EVAL_FAIRNESS, ("attribute", "group", "n"))
        if fairness is not None:
            small = R.small_groups(fairness)
            if not small.empty:
                st.warning(
                    f"{len(small)} of {len(fairness)} groups are too small to judge (too_small: few images or few "
                    "malignant ones); their figures are noise, not evidence of (un)fairness: "
                    + ", ".join(f"{a}={g} (n={n})" for a, g, n in small[["attribute", "group", "n"]].itertuples(False))
                )
            st.dataframe(fairness, hide_index=True)

    st.subheader("Internal vs external")
    comparison = R.internal_vs_external(report)
    st.dataframe(comparison, hide_index=True)
    if not report.get("external"):
        st.caption(f"No external set evaluated: `skinsynth evaluate --out {run_dir} --external RUN_DIR`.")
    conditioning = report.get("synthetic_conditioning")
    if conditioning:
        st.caption(
            f"On {conditioning.get('n')} synthetic images this classifier names the generator's conditioning class "
            f"with balanced accuracy {_fmt(conditioning.get('balanced_accuracy'))} "
            f"(chance {_fmt(conditioning.get('chance_balanced_accuracy'))})."
        )
    st.caption(report.get("disclaimer", DISCLAIMER))


def page_try_it(run_dir: Path | None, endpoint: str) -> None:
    """Upload an image, send it to the serve endpoint, show what the model says and the endpoint's disclaimer."""
    st.header("Try it")
    st.caption(f"endpoint: {endpoint}/v1/predict")
    upload = st.file_uploader("dermoscopy image (JPEG or PNG)", type=["jpg", "jpeg", "png"], key="upload")
    explain = st.checkbox("Grad-CAM heatmap", value=True, key="explain")
    if upload is None:
        st.info("Upload an image to send it to the endpoint.")
        return
    try:
        st.image(upload.getvalue(), caption=upload.name, width=2 * IMAGE_WIDTH)
    except Exception:  # Pillow cannot open it: show that, and let the endpoint give its own reason on Predict
        st.warning(f"{upload.name} cannot be previewed: it may not be a valid JPEG or PNG.")
    if not st.button("Predict", key="predict"):
        return
    content_type = upload.type or ("image/png" if upload.name.lower().endswith(".png") else "image/jpeg")
    with st.spinner("asking the endpoint"):
        answer = R.predict(endpoint, upload.name, upload.getvalue(), content_type, explain=explain)
    if answer.error:
        st.error(answer.error)
        return
    body = answer.body or {}
    cols = st.columns(4)
    cols[0].metric("top class", body.get("top_class"))
    cols[1].metric("malignant probability", _fmt(body.get("malignant_probability")))
    cols[2].metric("risk band", body.get("risk_band"))
    cols[3].metric("out of distribution", "yes" if body.get("out_of_distribution") else "no")
    if body.get("out_of_distribution"):
        st.warning("The image looks unlike the training data: the probabilities below mean little.")
    probabilities = R.probabilities_table(body)
    if not probabilities.empty:
        st.bar_chart(probabilities.set_index("class"), height=220)
        st.dataframe(probabilities, hide_index=True)
    uncertainty = body.get("uncertainty")
    if isinstance(uncertainty, dict):
        st.markdown("**uncertainty** " + ", ".join(f"{k} {_fmt(v)}" for k, v in uncertainty.items()))
    elif uncertainty is not None:
        st.markdown(f"**uncertainty** {_fmt(uncertainty)}")
    heatmap = body.get("heatmap_png_base64")
    if heatmap:
        try:
            st.image(base64.b64decode(heatmap), caption="Grad-CAM heatmap (top class)", width=2 * IMAGE_WIDTH)
        except ValueError:
            st.warning("The heatmap in the response is not valid base64.")
    elif explain:
        st.caption("The response carries no heatmap.")
    if body.get("disclaimer"):
        st.warning(f"Endpoint: {body['disclaimer']}")
    else:
        st.error("The response carries no disclaimer; treat it with extra care: it is never a diagnosis.")


PAGE_FUNCTIONS: dict[str, Callable[[Path, str], None]] = {
    "Overview": page_overview,
    "Data": page_data,
    "Synthetic": page_synthetic,
    "Audit": page_audit,
    "Study": page_study,
    "Evaluation": page_evaluation,
}


def main() -> None:
    """Sidebar (page, experiment), the disclaimer, then the chosen page."""
    st.set_page_config(page_title="skinsynth viewer", layout="wide")
    runs_root, endpoint = R.viewer_settings(sys.argv[1:], os.environ)
    st.sidebar.title("skinsynth viewer")
    page = st.sidebar.radio("page", PAGES, key="page")
    st.warning(DISCLAIMER)
    if page == "Try it":
        page_try_it(None, endpoint)
        return
    try:
        experiments = R.find_experiments(runs_root)
    except R.ViewError as err:
        st.error(str(err))
        return
    if not experiments:
        st.info(f"No run directories under {runs_root}: make one with `skinsynth demo --out {runs_root}/demo`.")
        return
    run_dir = st.sidebar.selectbox("experiment", experiments, format_func=lambda p: p.name, key="experiment")
    st.sidebar.caption(f"{len(experiments)} run directories under {runs_root}")
    try:
        PAGE_FUNCTIONS[page](run_dir, endpoint)
    except Exception as err:  # a report shaped unlike any the stages write: say so, keep the viewer up
        st.error(f"The {page} page could not show {run_dir}: {type(err).__name__}: {err}")


main()
