"""``skinsynth <command>``: thin wrappers over each stage's ``run`` function.

Errors the user can fix (bad config key, missing path, ...) print one ``skinsynth: error: ...`` line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from skinsynth import DISCLAIMER, __version__
from skinsynth.errors import SkinsynthError

EXAMPLES = """examples:
  skinsynth demo                                   # phantom data, whole pipeline, a few minutes on a laptop
  skinsynth run experiments/ham10000_baseline.yaml --set data.path=../shared/data/ham10000
  skinsynth data prepare --source ham10000 --path ../shared/data/ham10000 --out runs/ham --size 64
  skinsynth data summary runs/ham
  skinsynth train --out runs/ham --set train.epochs=20
  skinsynth evaluate --out runs/ham --external runs/isic2017
  skinsynth generate train --out runs/demo --set generator.train_steps=2000 --set generator.size=small
  skinsynth generate sample --out runs/demo --set sample.plan=fill --set sample.fill_to=200
  skinsynth audit runs/demo                        # FID/KID, near-copies, membership attacks; the export gate
  skinsynth generate export runs/demo --to synthetic_pngs
  skinsynth tune --config experiments/ratio_sweep.yaml   # Ray Tune + Optuna; re-run to resume
  skinsynth data download ham10000 --out data/ham10000
  skinsynth bench prepare --source ham10000 --path ../shared/data/ham10000
  skinsynth bench train --out runs/demo --set train.model=tf_efficientnet_lite0
  skinsynth bench sample --out runs/demo --images 64
  skinsynth bench generator --config experiments/ham10000_generator_64.yaml --steps 750
  skinsynth predict --model runs/demo/models/best --input new_images/ --out predictions.parquet --explain
  skinsynth bench predict --model runs/demo/models/best --images 256
"""


def _add_config_args(parser: argparse.ArgumentParser, *, with_file: bool = True) -> None:
    if with_file:
        parser.add_argument(
            "--config",
            metavar="EXPERIMENT.yaml",
            help="experiment file (without one: the built-in defaults of docs/configuration.md, on phantom data; "
            "the demo's own settings are experiments/demo.yaml)",
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.split.label_fraction=0.1 (repeatable)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own log lines on the terminal (they always go to RUN_DIR/logs/<stage>.log)",
    )


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=["phantom", "ham10000", "isic", "folder"], help="data.source")
    parser.add_argument("--path", metavar="DIR", help="data.path: the source folder")
    parser.add_argument("--size", type=int, metavar="PX", help="data.preprocess.size: output side in pixels")


def _data_overrides(args: argparse.Namespace) -> list[str]:
    """Explicit flags become overrides applied before ``--set`` (so ``--set`` has the last word)."""
    flags = []
    if getattr(args, "source", None):
        flags.append(f"data.source={args.source}")
    if getattr(args, "path", None):
        flags.append(f"data.path={args.path}")
    if getattr(args, "size", None):
        flags.append(f"data.preprocess.size={args.size}")
    if getattr(args, "out", None):
        flags.append(f"run.out={args.out}")
    return flags + list(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``skinsynth`` command."""
    parser = argparse.ArgumentParser(
        prog="skinsynth",
        description="Synthetic dermoscopy + semi-supervised learning experiments on Ray. " + DISCLAIMER,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"skinsynth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole pipeline on phantom data (offline, laptop-sized)")
    demo.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/demo)")
    demo.add_argument("--force", action="store_true", help="redo stages even when up to date")
    _add_config_args(demo, with_file=False)

    run = commands.add_parser("run", help="run an experiment file, skipping stages that are up to date")
    run.add_argument("experiment", metavar="EXPERIMENT.yaml")
    run.add_argument("--out", metavar="RUN_DIR", help="override run.out")
    run.add_argument("--force", action="store_true", help="redo stages even when up to date")
    _add_config_args(run, with_file=False)

    data = commands.add_parser("data", help="data sources: prepare, summary, download")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prepare = data_commands.add_parser(
        "prepare",
        help="Ray Data pipeline: source -> Parquet shards, splits, data card, quarantine",
        description="Decode, validate, remove hair, estimate skin tone, colour-normalise and resize a source into "
        "RUN_DIR/data/ (Parquet shards, splits.parquet, data_card.json, quarantine.csv).",
    )
    _add_data_flags(prepare)
    prepare.add_argument("--out", metavar="RUN_DIR", help="run directory (run.out)")
    prepare.add_argument("--engine", choices=["ray", "local"], default="ray", help="ray (default) or a plain loop")
    prepare.add_argument("--force", action="store_true", help="redo even when the manifest matches")
    _add_config_args(prepare)

    summary = data_commands.add_parser("summary", help="print the data card of a run directory as a table")
    summary.add_argument("run_dir", metavar="RUN_DIR")

    download = data_commands.add_parser(
        "download", help="fetch an official dataset release (needs internet; resumable, checksummed)"
    )
    download.add_argument("dataset", choices=["ham10000"])
    download.add_argument("--out", metavar="DIR", required=True, help="folder to download and unpack into")
    download.add_argument("--base-url", default=None, help="Dataverse server (default: Harvard Dataverse)")

    train = commands.add_parser(
        "train",
        help="train a timm classifier on RUN_DIR/data with Ray Train (resumes an interrupted run)",
        description="Train the classifier of an experiment (section train:) on its prepared data. Re-running the "
        "same command continues from the last checkpoint.",
    )
    train.add_argument("--out", metavar="RUN_DIR", help="run directory with a prepared data/ (run.out)")
    _add_config_args(train)

    evaluate = commands.add_parser(
        "evaluate",
        help="clinical metrics with lesion-bootstrap intervals, fairness per group, external sets",
        description="Evaluate RUN_DIR/models/<train.name>: operating point on validation, metrics on test, "
        "per-group fairness, optional external prepared run dirs; writes RUN_DIR/eval/<name>/.",
    )
    evaluate.add_argument("--out", metavar="RUN_DIR", help="run directory (run.out)")
    evaluate.add_argument(
        "--external", action="append", default=[], metavar="RUN_DIR", help="a prepared external set (repeatable)"
    )
    evaluate.add_argument("--tta", action="store_true", help="average predictions over the four flips")
    evaluate.add_argument("--n-boot", type=int, default=1000, help="lesion-bootstrap resamples for the 95%% CIs")
    evaluate.add_argument(
        "--shift",
        action="store_true",
        help="also score test under a seeded suite of acquisition corruptions (blur, JPEG, exposure, colour cast, "
        "noise, rotation/zoom, hair, vignette, ruler/ink) at 3 severities: eval/<name>/shift.csv and shift.png",
    )
    _add_config_args(evaluate)

    generate = commands.add_parser("generate", help="class-conditional diffusion generator: train, sample, export")
    generate_commands = generate.add_subparsers(dest="generate_command", required=True, metavar="GENERATE_COMMAND")
    generate_train = generate_commands.add_parser(
        "train",
        help="train the generator on the real train split with Ray Train (resumes an interrupted run)",
        description="Train a class-conditional diffusers UNet (section generator:) from scratch on RUN_DIR/data's "
        "real train split; writes RUN_DIR/generator/ (EMA weights, grid.png, generator_card.json). Re-running the "
        "same command (or with more generator.train_steps) continues from the last checkpoint.",
    )
    generate_train.add_argument("--out", metavar="RUN_DIR", help="run directory with a prepared data/ (run.out)")
    _add_config_args(generate_train)
    generate_sample = generate_commands.add_parser(
        "sample",
        help="sample a plan of synthetic images with a Ray Data actor pool (one replica per GPU or CPU)",
        description="Sample the plan of section sample: (fill / ratio / counts per class) from RUN_DIR/generator "
        "into RUN_DIR/synthetic/ (Parquet shards with provenance). An interrupted run continues where it stopped.",
    )
    generate_sample.add_argument("--out", metavar="RUN_DIR", help="run directory with a trained generator/ (run.out)")
    generate_sample.add_argument("--force", action="store_true", help="sample again even when up to date")
    _add_config_args(generate_sample)
    generate_export = generate_commands.add_parser(
        "export", help="write synthetic images as PNG files whose text chunks say they are synthetic"
    )
    generate_export.add_argument("run_dir", metavar="RUN_DIR")
    generate_export.add_argument("--to", required=True, metavar="DIR", help="destination folder")
    generate_export.add_argument("--limit", type=int, help="only the first N images")
    generate_export.add_argument(
        "--force", action="store_true", help="export even if the audit gate failed (the verdict is recorded)"
    )

    audit = commands.add_parser(
        "audit",
        help="fidelity (FID/KID, precision/recall) and privacy (near-copies, membership attacks) of a synthetic set",
        description="Audit RUN_DIR/synthetic against the real training and held-out images and the generator; "
        "writes RUN_DIR/audit/report.json, gallery.png and similarity.png. Its gate (section audit:) decides "
        "whether 'generate export' may share the set.",
    )
    audit.add_argument("run_dir", metavar="RUN_DIR")
    audit.add_argument("--config", metavar="EXPERIMENT.yaml", help="experiment file (default: RUN_DIR/config.yaml)")
    _add_config_args(audit, with_file=False)

    tune = commands.add_parser(
        "tune",
        help="Ray Tune + Optuna sweep of classifier trials (Ray Train): synthetic ratio, SSL, label budget, ...",
        description="Run the sweep of the experiment's tune: section (trials are classifier training runs on "
        "RUN_DIR/data, plus RUN_DIR/synthetic when mixing). Re-running the same command resumes an interrupted sweep "
        "without repeating finished trials. Writes RUN_DIR/tune/<tune.name>/ (trials.parquet, trials.csv, "
        "summary.csv for grids, best.json), the best trial on validation to RUN_DIR/models/best/ and its single "
        "evaluation to RUN_DIR/eval/best/.",
    )
    tune.add_argument("--out", metavar="RUN_DIR", help="run directory with prepared data (run.out)")
    tune.add_argument("--fresh", action="store_true", help="discard an earlier sweep of the same name, start again")
    _add_config_args(tune)

    serve = commands.add_parser(
        "serve",
        help="Ray Serve HTTP endpoint for a trained classifier (POST /v1/predict)",
        description="Serve a trained classifier over HTTP with Ray Serve (FastAPI ingress; OpenAPI schema at "
        "/openapi.json). By default RUN_DIR/models/best (the sweep's best trial), else RUN_DIR/models/<train.name>. "
        "Runs until Ctrl-C or SIGTERM, which answer the requests in flight before stopping. Research tool: responses "
        "carry the disclaimer and are never a diagnosis.",
    )
    serve.add_argument("--out", metavar="RUN_DIR", help="run directory whose model to serve (run.out)")
    serve.add_argument("--model", metavar="MODEL_DIR", help="a models/<name> directory (serve.model)")
    serve.add_argument("--host", help="serve.host (default 127.0.0.1: the endpoint has no authentication)")
    serve.add_argument("--port", type=int, help="serve.port (default 8000)")
    _add_config_args(serve)

    view = commands.add_parser(
        "view",
        help="Streamlit results viewer: run directories, audit, study, evaluation, and a page that calls serve",
        description="Start the Streamlit viewer (headless, on 127.0.0.1) over the run directories in --runs; its "
        "'Try it' page posts images to the serve endpoint. Runs until Ctrl-C or SIGTERM, which stop Streamlit too.",
    )
    view.add_argument("--runs", default="runs", metavar="DIR", help="folder of run directories (default runs/)")
    view.add_argument("--endpoint", default="http://127.0.0.1:8000", help="serve endpoint base URL")
    view.add_argument("--port", type=int, default=8501, help="the viewer's port (default 8501)")

    predict = commands.add_parser(
        "predict",
        help="Ray Data batch inference: the endpoint's predictions for a folder, bucket or prepared run",
        description="Score every image of a folder (or storage URI) of image files, or a prepared run's split, "
        "exactly as POST /v1/predict would (same preprocessing, pixel cap and response fields), with a Ray Data "
        "actor pool (GPU actors when the cluster has GPUs). Writes the table (.parquet or .csv), "
        "<stem>.quarantine.csv (every refused file and its reason) and, with --explain, <stem>.gradcam/*.png. "
        "Re-running the same command resumes: finished blocks (<stem>.parts/) are not redone. " + DISCLAIMER,
    )
    predict.add_argument("--model", metavar="MODEL_DIR", help="a models/<name> directory (default: as serve picks)")
    predict.add_argument("--input", required=True, metavar="FOLDER|URI|RUN_DIR", help="images to score")
    predict.add_argument(
        "--out", default="predictions.parquet", metavar="FILE", help="result table, .parquet or .csv (local or URI)"
    )
    predict.add_argument(
        "--split",
        choices=["train", "val", "test", "all"],
        help="a prepared run's split to score (required for a RUN_DIR; test and all are recorded in its test ledger)",
    )
    predict.add_argument("--explain", action="store_true", help="write a Grad-CAM PNG of the top class per image")
    predict.add_argument("--tta", action="store_true", help="add the flip spread (test-time augmentation)")
    predict.add_argument("--out-run", dest="out_run", metavar="RUN_DIR", help="run.out, to find the default model")
    _add_config_args(predict)

    bench = commands.add_parser("bench", help="performance measurements against a plain baseline")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    bench_prepare = bench_commands.add_parser(
        "prepare", help="Ray Data prepare vs a single-process loop (images/s and ratio)"
    )
    _add_data_flags(bench_prepare)
    bench_prepare.add_argument("--limit", type=int, help="only the first N images of the source")
    bench_prepare.add_argument("--json", default="bench/prepare.json", help="where to write the record")
    _add_config_args(bench_prepare)
    bench_train = bench_commands.add_parser(
        "train", help="Ray Train classifier epoch vs a plain PyTorch loop (images/s and ratio)"
    )
    bench_train.add_argument("--out", metavar="RUN_DIR", help="run directory with prepared data (run.out)")
    bench_train.add_argument("--json", default="bench/train.json", help="where to write the record")
    _add_config_args(bench_train)
    bench_sample = bench_commands.add_parser(
        "sample", help="sampler actor pool with 1 and 2 actors vs a single-process loop (images/s and ratios)"
    )
    bench_sample.add_argument("--out", metavar="RUN_DIR", help="run directory with a trained generator/ (run.out)")
    bench_sample.add_argument("--images", type=int, default=64, help="images in the benchmark plan")
    bench_sample.add_argument("--json", default="bench/sample.json", help="where to write the record")
    _add_config_args(bench_sample)
    bench_generator = bench_commands.add_parser(
        "generator",
        help="generator recipes (training objectives) at the same steps: matched-n FID and CAS beside the first",
    )
    bench_generator.add_argument("--out", metavar="RUN_DIR", help="run directory with prepared data (run.out)")
    bench_generator.add_argument(
        "--recipes",
        default="ddpm,min_snr,v,v_min_snr,edm",
        help="comma-separated recipe names (ddpm, min_snr, v, v_min_snr, edm, latent); the first is the baseline",
    )
    bench_generator.add_argument(
        "--latent-steps",
        default="1000,2000",
        metavar="AE,UNET",
        help="the latent recipe's autoencoder and UNet steps (its training seconds are reported beside the others')",
    )
    bench_generator.add_argument("--steps", type=int, help="optimiser steps of every recipe (generator.train_steps)")
    bench_generator.add_argument("--images", type=int, default=500, help="synthetic images per recipe (FID's n)")
    bench_generator.add_argument("--json", default="bench/generator.json", help="where to write the record")
    _add_config_args(bench_generator)
    bench_serve = bench_commands.add_parser(
        "serve",
        help="Ray Serve endpoint behind its proxy and behind HAProxy vs a plain one-process FastAPI server, in one "
        "run: latency, throughput, errors and ratios",
    )
    bench_serve.add_argument("--out", metavar="RUN_DIR", help="run directory whose model to serve (run.out)")
    bench_serve.add_argument("--model", metavar="MODEL_DIR", help="a models/<name> directory (serve.model)")
    bench_serve.add_argument("--seconds", type=float, default=10.0, help="duration of each load level")
    bench_serve.add_argument("--rate", type=float, default=50.0, help="open-loop requests per second")
    bench_serve.add_argument(
        "--ingress",
        default="proxy,haproxy",
        help="comma-separated Serve ingresses to measure beside the plain server (proxy, haproxy)",
    )
    bench_serve.add_argument(
        "--image-size", type=int, default=128, help="side in px of the uploaded PNGs (default 128)"
    )
    bench_serve.add_argument("--json", default="bench/serve.json", help="where to write the record")
    _add_config_args(bench_serve)
    bench_predict = bench_commands.add_parser(
        "predict", help="Ray Data batch prediction vs a plain single-process loop on the same images (images/s, ratio)"
    )
    bench_predict.add_argument("--model", metavar="MODEL_DIR", help="a models/<name> directory (default: as serve)")
    bench_predict.add_argument(
        "--input", metavar="FOLDER|URI|RUN_DIR", help="images to score (default: --images phantom images)"
    )
    bench_predict.add_argument("--split", choices=["train", "val", "test", "all"], help="a RUN_DIR input's split")
    bench_predict.add_argument("--images", type=int, default=256, help="phantom images rendered without --input")
    bench_predict.add_argument("--limit", type=int, help="only the first N image files of a local --input folder")
    bench_predict.add_argument("--out-run", dest="out_run", metavar="RUN_DIR", help="run.out, for the default model")
    bench_predict.add_argument("--json", default="bench/predict.json", help="where to write the record")
    _add_config_args(bench_predict)
    return parser


def _synced(cfg):
    """The run's storage for one command: a remote ``run.out`` is pulled into its local copy first and pushed back
    however the command ends (see skinsynth/core/storage.py); a local one is used as it is."""
    from skinsynth.core.storage import synced_run

    return synced_run(cfg.run)


def _cmd_demo(args: argparse.Namespace) -> int:
    from skinsynth.config import DEMO_SETTINGS, load_config
    from skinsynth.core.storage import local_run_dir
    from skinsynth.pipeline import data_summary_text, format_run_summary, run_experiment

    cfg = load_config(None, _data_overrides(args), base=DEMO_SETTINGS)
    outcomes = run_experiment(cfg, force=args.force)
    print()
    # the card's head (source, licence, counts); `skinsynth data summary` prints it whole
    print(data_summary_text(local_run_dir(cfg.run)).split("\n\n")[0])
    print(format_run_summary(cfg, outcomes))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from skinsynth.config import load_config
    from skinsynth.pipeline import format_run_summary, run_experiment

    cfg = load_config(args.experiment, _data_overrides(args))
    outcomes = run_experiment(cfg, force=args.force)
    print(format_run_summary(cfg, outcomes))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "summary":
        from skinsynth.pipeline import data_summary_text

        print(data_summary_text(args.run_dir))
        return 0
    if args.data_command == "download":
        from skinsynth.data.download import download_dataset

        kwargs = {"base_url": args.base_url} if args.base_url else {}
        out = download_dataset(args.dataset, args.out, **kwargs)
        print(f"downloaded {args.dataset} into {out}; prepare it with:")
        print(f"  skinsynth data prepare --source {args.dataset} --path {out} --out runs/{args.dataset}")
        return 0
    from skinsynth.config import dump_config, load_config
    from skinsynth.core.compute import record_compute, track_compute
    from skinsynth.data.card import format_data_card
    from skinsynth.data.prepare import prepare_images

    cfg = load_config(args.config, _data_overrides(args))
    with _synced(cfg) as store:
        dump_config(cfg, store.local)
        with track_compute(cfg.run) as meter:
            result = prepare_images(cfg.data, store.local, engine=args.engine, force=args.force)
        if not result.skipped:  # an up-to-date stage keeps the figures of the run that made it
            record_compute(result.data_dir, meter.figures)
    print()
    print(format_data_card(result.card))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from skinsynth.classify.train import train_classifier
    from skinsynth.config import load_config
    from skinsynth.core.compute import record_compute, track_compute

    cfg = load_config(args.config, _data_overrides(args))
    with _synced(cfg):
        with track_compute(cfg.run) as meter:
            result = train_classifier(cfg)
        record_compute(result.model_dir, meter.figures)
    print(f"model: {result.model_dir} (best validation balanced accuracy {result.best_val_balanced_accuracy:.3f})")
    print(DISCLAIMER)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from skinsynth.classify.evaluate import evaluate_model
    from skinsynth.config import load_config
    from skinsynth.core.compute import record_compute, track_compute
    from skinsynth.core.rundir import layout

    cfg = load_config(args.config, _data_overrides(args))
    with _synced(cfg) as store:
        with track_compute(cfg.run) as meter:
            evaluate_model(cfg, external=args.external, tta=args.tta, n_boot=args.n_boot, shift=args.shift)
        record_compute(layout(store.local).evaluation(cfg.train.name), meter.figures)
    print(DISCLAIMER)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.generate_command == "export":
        from skinsynth.audit.export import export_synthetic

        written = export_synthetic(args.run_dir, args.to, limit=args.limit, force=args.force)
        print(f"exported {written} synthetic PNGs to {args.to} (provenance in their text chunks, audit in AUDIT.json)")
        print(DISCLAIMER)
        return 0
    from skinsynth.config import load_config
    from skinsynth.core.compute import record_compute, track_compute

    cfg = load_config(args.config, _data_overrides(args))
    with _synced(cfg) as store:
        if args.generate_command == "train":
            from skinsynth.generate.train import train_generator

            with track_compute(cfg.run) as meter:
                trained = train_generator(cfg)
            record_compute(trained.generator_dir, meter.figures)
        else:
            from skinsynth.generate.sample import sample_synthetic

            with track_compute(cfg.run) as meter:
                result = sample_synthetic(cfg.sample, store.local, force=args.force)
            if not result.skipped:  # an up-to-date set keeps the figures of the run that made it
                record_compute(result.synthetic_dir, meter.figures)
            card = result.card
            print(f"synthetic set: {card['images']} images in {result.synthetic_dir}; classes {card['classes']}")
    print(DISCLAIMER)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from skinsynth.audit.report import run_audit
    from skinsynth.config import RunConfig, load_config
    from skinsynth.core.compute import record_compute, track_compute
    from skinsynth.core.rundir import layout
    from skinsynth.core.storage import synced_run

    # RUN_DIR may be a storage URI: audited in a pulled local copy, and its audit/ pushed back however it ends
    with synced_run(RunConfig(out=args.run_dir)) as store:
        run_dir = store.local
        config = args.config or (layout(run_dir).config if layout(run_dir).config.is_file() else None)
        cfg = load_config(config, list(args.overrides))
        with track_compute(cfg.run) as meter:
            run_audit(cfg, run_dir)
        record_compute(layout(run_dir).audit, meter.figures)
    print(DISCLAIMER)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from skinsynth.config import load_config
    from skinsynth.core.compute import record_compute, track_compute
    from skinsynth.tune.sweep import run_sweep

    cfg = load_config(args.config, _data_overrides(args))
    with _synced(cfg):
        with track_compute(cfg.run) as meter:
            result = run_sweep(cfg, fresh=args.fresh)
        record_compute(result.sweep_dir, meter.figures)
    print(f"sweep: {result.sweep_dir} (trials.csv{', summary.csv' if result.summary is not None else ''}, best.json)")
    print(DISCLAIMER)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from skinsynth.bench import write_record
    from skinsynth.config import load_config

    if args.bench_command == "predict":
        from skinsynth.bench.predict import bench_predict
        from skinsynth.serve.model import default_model_dir

        cfg = _predict_config(args)
        model_dir = default_model_dir(cfg)
        record = bench_predict(cfg, model_dir, args.input, split=args.split, images=args.images, limit=args.limit)
        print(f"record written to {write_record(record, args.json)}")
        return 0
    cfg = load_config(args.config, _data_overrides(args))
    if args.bench_command == "prepare":  # a data.path URI is mirrored by the source listing, as in prepare
        from skinsynth.bench.prepare import bench_prepare

        record = bench_prepare(cfg.data, limit=args.limit)
    else:
        with _synced(cfg):  # a remote run.out is benchmarked from its pulled local copy
            record = _bench_on_run(args, cfg)
    print(f"record written to {write_record(record, args.json)}")
    return 0


def _predict_config(args: argparse.Namespace):
    """The config of ``predict`` and ``bench predict``: ``--out-run`` as ``run.out``, ``--model`` as ``serve.model``
    (without it, the model is the one ``serve`` picks: :func:`skinsynth.serve.model.default_model_dir`, called once
    the run is synced, since it looks for ``models/best`` in the run's local copy)."""
    from skinsynth.config import load_config

    flags = [f"run.out={args.out_run}"] if args.out_run else []
    cfg = load_config(args.config, flags + list(args.overrides))
    if args.model:
        cfg.serve.model = args.model
    return cfg


def _cmd_predict(args: argparse.Namespace) -> int:
    from skinsynth.serve.model import default_model_dir
    from skinsynth.serve.predict import batch_predict, quarantine_lines

    cfg = _predict_config(args)
    with _synced(cfg):  # a remote run's model is picked and read in its local copy, as serve does
        if "://" not in args.out:
            from skinsynth.core.console import set_run_dir

            set_run_dir(Path(args.out).expanduser().resolve().parent)  # its log: <out folder>/logs/predict.log
        result = batch_predict(
            default_model_dir(cfg),
            args.input,
            args.out,
            sc=cfg.serve,
            pc=cfg.predict,
            split=args.split,
            explain=args.explain,
            tta=args.tta,
        )
    if result.quarantined:
        print("\n".join(quarantine_lines(result.quarantine)))
    if result.test_looks is not None:
        from skinsynth.core.ledger import describe_looks

        print(f"predict: scored the test split: {describe_looks(result.test_looks)}")
    print(DISCLAIMER)
    return 0


def _bench_on_run(args: argparse.Namespace, cfg) -> dict:
    if args.bench_command == "train":
        from skinsynth.bench.train import bench_train

        return bench_train(cfg)
    if args.bench_command == "serve":
        from skinsynth.bench.serve import bench_serve
        from skinsynth.serve.model import default_model_dir, load_served_model

        if args.model:
            cfg.serve.model = args.model
        model_dir = default_model_dir(cfg)
        load_served_model(model_dir, cfg.serve)  # fails early with its reason; writes the calibration once
        ingresses = tuple(name.strip() for name in args.ingress.split(",") if name.strip())
        unknown = sorted(set(ingresses) - {"proxy", "haproxy"})
        if unknown or not ingresses:
            raise SkinsynthError(f"--ingress takes proxy and/or haproxy, got {args.ingress!r}")
        return bench_serve(
            cfg, model_dir, seconds=args.seconds, rate=args.rate, ingresses=ingresses, image_size=args.image_size
        )
    if args.bench_command == "generator":
        from skinsynth.bench.generator import bench_generator

        recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
        try:
            latent_steps = tuple(int(n) for n in args.latent_steps.split(","))
        except ValueError:
            latent_steps = ()
        if len(latent_steps) != 2 or min(latent_steps) < 1:
            raise SkinsynthError(f"--latent-steps takes two positive step counts, AE,UNET; got '{args.latent_steps}'")
        return bench_generator(cfg, recipes=recipes, steps=args.steps, images=args.images, latent_steps=latent_steps)
    from skinsynth.bench.sample import bench_sample

    return bench_sample(cfg, images=args.images)


def _stop_on_sigterm() -> None:
    """SIGTERM (what docker, Kubernetes and systemd send) stops a long-running command as Ctrl-C does: the main thread
    gets ``KeyboardInterrupt`` and the command's own cleanup runs. A second SIGTERM during that cleanup is ignored.

    For ``serve`` this must run after Ray has started: ``ray.init`` installs its own handler, which exits at once
    (and Ray's core worker one that aborts with a stack trace)."""
    import signal

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from skinsynth.config import load_config
    from skinsynth.serve.app import check_ingress, start_endpoint, stop_endpoint, wait_until_healthy
    from skinsynth.serve.model import default_model_dir, load_served_model

    flags = [f"serve.{key}={value}" for key in ("model", "host", "port") if (value := getattr(args, key)) is not None]
    cfg = load_config(args.config, _data_overrides(args) + flags)
    check_ingress(cfg.serve)  # a missing HAProxy binary is named before the model loads
    with _synced(cfg):  # a remote run's model is served from its local copy
        model_dir = default_model_dir(cfg)
        # load once here: a model that cannot be served fails with its reason before Serve starts, and the first
        # load writes the serving calibration next to the model
        served = load_served_model(model_dir, cfg.serve)
    print(f"serve: model {served.model_id} from {model_dir}; calibration {served.calibration.summary()}")
    _stop_on_sigterm()  # a SIGTERM while Ray starts: the cleanup below, not Ray's abort
    try:
        url = start_endpoint(str(model_dir), cfg.serve)
        _stop_on_sigterm()  # again: ray.init replaced it
        wait_until_healthy(url)
        print(f"serve: {url}/v1/predict (POST an image), {url}/docs, {url}/healthz ({cfg.serve.ingress} ingress)")
        print("serve: Ctrl-C or SIGTERM stops, after answering the requests in flight")
        print(DISCLAIMER)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the drain short either
        import ray

        print("serve: stopping: answering the requests in flight", flush=True)
        if ray.is_initialized():
            try:
                stop_endpoint()
            except Exception as err:  # stopped while Serve was starting: nothing to drain, Ray stops below
                print(f"serve: {type(err).__name__}: {err}")
            ray.shutdown()
        print("serve: stopped")
        return 0


def _cmd_view(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    from skinsynth.view import launch_command
    from skinsynth.view.runs import ViewError, find_experiments

    runs_root = Path(args.runs).expanduser().resolve()
    found = find_experiments(runs_root)  # a missing folder is a one-line error, before Streamlit starts
    if not args.endpoint.startswith(("http://", "https://")):
        raise ViewError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000, got {args.endpoint!r}")
    print(f"view: {len(found)} run directories under {runs_root}; http://127.0.0.1:{args.port} (Ctrl-C stops)")
    print(DISCLAIMER)
    _stop_on_sigterm()
    viewer = subprocess.Popen(launch_command(runs_root, args.endpoint, args.port))
    try:
        return viewer.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Streamlit stops cleanly on SIGTERM (on Ctrl-C the terminal has sent it SIGINT already); a viewer that does
        # not stop within 15 s is killed, so its port is never left held by an orphan
        if viewer.poll() is None:
            viewer.terminate()
        try:
            viewer.wait(timeout=15)
        except subprocess.TimeoutExpired:
            viewer.kill()
            viewer.wait()
        print("view: stopped")
        return 0


COMMANDS = {
    "demo": _cmd_demo,
    "run": _cmd_run,
    "data": _cmd_data,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "generate": _cmd_generate,
    "audit": _cmd_audit,
    "tune": _cmd_tune,
    "serve": _cmd_serve,
    "view": _cmd_view,
    "bench": _cmd_bench,
    "predict": _cmd_predict,
}


def _stage_of(args: argparse.Namespace) -> str | None:
    """The stage a command runs, named as the pipeline names it ('' for demo and run, which run them all; None for
    commands that run none). Its terminal shows skinsynth's progress; Ray's lines go to RUN_DIR/logs/<stage>.log."""
    if args.command in ("demo", "run"):
        return ""
    if args.command in ("train", "evaluate", "audit", "tune"):
        return args.command
    sub = (
        args.command,
        getattr(args, "data_command", None)
        or getattr(args, "generate_command", None)
        or getattr(args, "bench_command", None),
    )
    return {
        ("data", "prepare"): "prepare",
        ("generate", "train"): "generate",
        ("generate", "sample"): "sample",
        ("predict", None): "predict",  # Ray's lines to <out folder>/logs/predict.log
        # trains and samples generators for many minutes: their Ray lines to RUN_DIR/logs/bench-generator.log
        ("bench", "generator"): "bench-generator",
    }.get(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skinsynth`` console script; returns the exit code."""
    import contextlib

    from skinsynth.core.console import quiet_terminal, stage_log

    args = build_parser().parse_args(argv)
    from skinsynth.core.allocator import keep_freed_memory

    keep_freed_memory()  # torch's large CPU blocks reused, not re-faulted from the kernel (skinsynth.core.allocator)
    stage = _stage_of(args)
    quiet = quiet_terminal(verbose=args.verbose) if stage is not None else contextlib.nullcontext()
    with quiet as console, stage_log(stage) if stage else contextlib.nullcontext():

        def error(message: str, *, log: bool = False) -> None:
            if console is None:
                print(message, file=sys.stderr)
            else:
                console.error(message, with_log=log)

        try:
            return COMMANDS[args.command](args)
        except SkinsynthError as err:
            error(f"skinsynth: error: {err}")
            return 2
        except KeyboardInterrupt:
            error("skinsynth: interrupted; finished stages are kept, re-run the same command to resume")
            return 130
        except Exception as err:
            if console is None:
                raise  # a bug: its traceback, as Python prints it
            import traceback

            # a failure in a stage's code or in a Ray worker: the whole traceback goes to the stage's log, the
            # error itself to the terminal with that log's path
            console.write_log(traceback.format_exc())
            error(f"skinsynth: error: {type(err).__name__}: {err}", log=True)
            return 1


if __name__ == "__main__":
    sys.exit(main())
