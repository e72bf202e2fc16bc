"""Semi-supervised learning and real/synthetic mixing: the losses by hand, the partition, the mix counts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from skinsynth.classify.mixing import labelled_partition, select_synthetic, synthetic_counts
from skinsynth.classify.ssl import (
    DistributionAlignment,
    StrongAugmentation,
    UnlabelledCollate,
    fixmatch_loss,
    pseudo_label_loss,
)
from skinsynth.config import MixConfig, load_config
from skinsynth.data.schema import CLASSES
from skinsynth.errors import SkinsynthError

# --- the losses against hand-computed values ---

WEAK = torch.log(torch.tensor([[0.96, 0.02, 0.02], [1 / 3, 1 / 3, 1 / 3]]))  # confident, then uncertain
STRONG = torch.log(torch.tensor([[1 / 5, 3 / 5, 1 / 5], [0.1, 0.1, 0.8]]))


def test_fixmatch_loss_on_a_hand_made_batch():
    loss, mask = fixmatch_loss(WEAK, STRONG, threshold=0.95)
    # image 1: confidence 0.96 >= 0.95, pseudo-label 0, strong-view probability of class 0 is 1/5 -> -ln(1/5)
    # image 2: confidence 1/3 < 0.95 -> masked; the mean is over both images
    assert mask.tolist() == [1.0, 0.0]
    assert float(loss) == pytest.approx(math.log(5) / 2, rel=1e-6)
    # at threshold 0.3 both count; image 2's pseudo-label is class 0 (ties go to the first), p = 0.1
    loss_all, mask_all = fixmatch_loss(WEAK, STRONG, threshold=0.3)
    assert mask_all.tolist() == [1.0, 1.0]
    assert float(loss_all) == pytest.approx((math.log(5) + math.log(10)) / 2, rel=1e-6)


def test_fixmatch_gradient_flows_through_the_strong_view_only():
    weak = WEAK.clone().requires_grad_(True)
    strong = STRONG.clone().requires_grad_(True)
    loss, _ = fixmatch_loss(weak, strong, threshold=0.95)
    loss.backward()
    assert weak.grad is None or float(weak.grad.abs().sum()) == 0.0
    # d/dz of CE(softmax(z), 0) / N is (softmax(z) - onehot(0)) / N for the unmasked image, 0 for the masked one
    expected = torch.tensor([[1 / 5 - 1, 3 / 5, 1 / 5], [0.0, 0.0, 0.0]]) / 2
    assert torch.allclose(strong.grad, expected, atol=1e-6)


def test_distribution_alignment_matches_the_hand_computed_rescaling_and_changes_the_mask():
    alignment = DistributionAlignment(torch.tensor([2.0, 1.0, 1.0]), momentum=0.0)  # prior 0.5, 0.25, 0.25
    probs = torch.softmax(WEAK, dim=1)
    aligned = alignment(probs)
    running = probs.mean(0)  # momentum 0: the running mean is this batch's mean
    assert torch.allclose(running, torch.tensor([(0.96 + 1 / 3) / 2, (0.02 + 1 / 3) / 2, (0.02 + 1 / 3) / 2]))
    by_hand = torch.tensor([0.96 * 0.5 / running[0], 0.02 * 0.25 / running[1], 0.02 * 0.25 / running[2]])
    assert torch.allclose(aligned[0], by_hand / by_hand.sum(), atol=1e-6)
    # 0.96 becomes about 0.929: below the threshold, so alignment takes the (majority-class) pseudo-label away
    assert float(aligned[0, 0]) == pytest.approx(0.9291, abs=1e-4)
    loss, mask = fixmatch_loss(WEAK, STRONG, 0.95, DistributionAlignment(torch.tensor([2.0, 1.0, 1.0]), momentum=0.0))
    assert mask.tolist() == [0.0, 0.0] and float(loss) == 0.0


def test_pseudo_label_loss_is_cross_entropy_on_confident_own_predictions():
    loss, mask = pseudo_label_loss(WEAK, threshold=0.95)
    assert mask.tolist() == [1.0, 0.0]
    assert float(loss) == pytest.approx(-math.log(0.96) / 2, rel=1e-5)  # float32 logits


def test_strong_augmentation_changes_images_and_is_seeded():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    a = StrongAugmentation(magnitude=9, cutout=0.5, seed=1)(images)
    torch.manual_seed(0)
    b = StrongAugmentation(magnitude=9, cutout=0.5, seed=1)(images)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, images.float() / 255)
    # Cutout fills its square with grey 0.5
    assert (a == 0.5).all(dim=1).any()  # some pixel grey in all three channels


def test_the_unlabelled_collate_refuses_a_batch_that_carries_labels():
    collate = UnlabelledCollate((0.5,) * 3, (0.5,) * 3, 32, seed=0)
    with pytest.raises(RuntimeError, match="labels must stay hidden"):
        collate({"image": np.array([b""], dtype=object), "label": np.array([0])})


# --- the labelled / unlabelled partition ---


def _train_rows(seed: int = 0) -> pd.DataFrame:
    """300 images of 200 lesions over the 7 classes (imbalanced), one or two images per lesion."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(200):
        dx = CLASSES[min(6, int(rng.exponential(1.5)))]
        for v in range(1 + int(rng.random() < 0.5)):
            rows.append({"image_id": f"img{g:03d}_{v}", "group_id": f"les{g:03d}", "dx": dx, "labelled": g % 2 == 0})
    return pd.DataFrame(rows)


def test_partition_splits_train_into_disjoint_labelled_and_unlabelled_by_lesion():
    rows = _train_rows()
    part = labelled_partition(rows, 0.2, seed=3)
    labelled, unlabelled = set(part.labelled), set(part.unlabelled)
    assert not labelled & unlabelled
    assert labelled | unlabelled == set(rows["image_id"])
    lesion = rows.set_index("image_id")["group_id"]
    assert not set(lesion[list(labelled)]) & set(lesion[list(unlabelled)])  # no lesion on both sides
    # stratified: every class keeps about a fifth of its images labelled (within one lesion of two images)
    for dx, group in rows.groupby("dx"):
        n_lab = group["image_id"].isin(labelled).sum()
        assert n_lab >= 1 and abs(n_lab - 0.2 * len(group)) <= 2, dx


def test_label_budgets_are_nested_for_one_seed_and_grow_from_the_prepared_labelled_set():
    rows = _train_rows()  # the prepared flag labels every other lesion: about half the images
    parts = [set(labelled_partition(rows, f, seed=7).labelled) for f in (0.05, 0.1, 0.2, 0.5, 0.7, 1.0)]
    assert all(small <= large for small, large in zip(parts, parts[1:]))
    assert parts[-1] == set(rows["image_id"])
    prepared = set(rows.loc[rows["labelled"], "image_id"])
    # per class, a budget below the prepared share is drawn from within it, a larger one keeps all of it (the
    # images a generator learnt from): one always contains the other
    for _, group in rows.groupby("dx"):
        ids, prepared_here = set(group["image_id"]), prepared & set(group["image_id"])
        for part in parts:
            assert part & ids <= prepared_here or prepared_here <= part & ids
    bcc = set(rows.loc[rows["dx"] == "bcc", "image_id"])  # 42% of bcc images are prepared-labelled
    assert prepared & bcc <= parts[3] and parts[2] & bcc <= prepared  # a 50% budget keeps them, 20% stays inside
    assert labelled_partition(rows, None, seed=0).labelled == sorted(prepared)
    with pytest.raises(SkinsynthError, match="label_fraction"):
        labelled_partition(rows, 0.0, seed=0)


# --- the synthetic mix ---


def test_mixing_counts_uniform_and_minority():
    labelled = {"akiec": 30, "bcc": 50, "bkl": 110, "df": 10, "mel": 110, "nv": 670, "vasc": 14}  # 994 images
    uniform = synthetic_counts(labelled, MixConfig(ratio=1.0, classes="uniform"))
    assert sum(uniform.values()) == 994
    assert sorted(uniform.values()) == [142] * 7  # 994 = 7 x 142
    minority = synthetic_counts(labelled, MixConfig(ratio=0.5, classes="minority"))
    # mean per class is 142: every class but nv is a minority; 497 over 6 classes = 82 each, 5 left for the smallest
    assert minority["nv"] == 0 and sum(minority.values()) == 497
    assert minority == {"akiec": 83, "bcc": 83, "bkl": 83, "df": 83, "mel": 82, "nv": 0, "vasc": 83}
    assert synthetic_counts(labelled, MixConfig(ratio=0.0)) == dict.fromkeys(CLASSES, 0)
    with pytest.raises(SkinsynthError, match="ratio"):
        synthetic_counts(labelled, MixConfig(ratio=-1.0))


def test_select_synthetic_draws_the_requested_count_of_each_class_or_says_what_is_missing():
    pool = pd.DataFrame({"image_id": [f"syn-{i:03d}" for i in range(70)], "dx": [CLASSES[i % 7] for i in range(70)]})
    counts = {"akiec": 3, "bcc": 0, "bkl": 10, "df": 1, "mel": 5, "nv": 2, "vasc": 7}
    chosen = select_synthetic(pool, counts, seed=0)
    got = pool.set_index("image_id").loc[chosen, "dx"].value_counts().to_dict()
    assert got == {dx: n for dx, n in counts.items() if n}
    assert len(set(chosen)) == len(chosen)
    assert select_synthetic(pool, counts, seed=0) == chosen and select_synthetic(pool, counts, seed=1) != chosen
    with pytest.raises(SkinsynthError, match=r"bkl 10/11"):
        select_synthetic(pool, {**counts, "bkl": 11}, seed=0)


# --- the datasets a run trains on (real prepared shards, a hand-written synthetic shard, local Ray) ---


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A prepared phantom run plus a synthetic shard: copies of train images relabelled as synthetic rows."""
    from skinsynth.data.prepare import prepare_images

    out = tmp_path_factory.mktemp("mix") / "run"
    settings = [
        f"run.out={out}",
        "data.phantom.n_images=140",
        "data.preprocess.size=32",
        "data.split.label_fraction=0.3",
    ]
    cfg = load_config(None, settings)
    prepare_images(cfg.data, out, engine="local", progress=lambda _m: None)
    real = pq.read_table(out / "data" / "images").to_pandas()
    synthetic = pd.concat([real] * 2, ignore_index=True)
    synthetic["image_id"] = [f"syn-test-{i:05d}" for i in range(len(synthetic))]
    synthetic["group_id"] = synthetic["image_id"]
    synthetic["source"], synthetic["synthetic"] = "synthetic", True
    (out / "synthetic" / "images").mkdir(parents=True)
    shard = out / "synthetic" / "images" / "part-0.parquet"
    pq.write_table(pa.Table.from_pandas(synthetic, preserve_index=False), shard)
    _record_generator(out, labelled_train_ids(out))  # as 'generate train' would, on the prepared labelled 30%
    return cfg, out


def labelled_train_ids(out) -> list[str]:
    from skinsynth.core.shards import load_split_table, split_ids

    return split_ids(load_split_table(out), "train", labelled_only=True)


def _record_generator(out, ids: list[str], generator_id: str = "test-generator") -> None:
    """What a trained generator leaves for the provenance guard: its card's id and the ids it learnt from."""
    import json

    from skinsynth.core.rundir import layout

    run = layout(out)
    run.generator.mkdir(parents=True, exist_ok=True)
    run.generator_card.write_text(json.dumps({"generator_id": generator_id}))
    run.generator_training_ids.write_text(json.dumps(sorted(ids)))


@pytest.mark.parametrize("cache_rows", [True, False])  # read once by the driver, or streamed by Ray Data
def test_training_datasets_keep_labels_out_of_the_pool_and_synthetic_out_of_validation(
    ray_local, mixed_run, cache_rows
):
    from skinsynth.classify.train import training_datasets, training_inputs
    from skinsynth.core.shards import load_split_table

    cfg, out = mixed_run
    # the run was prepared with 30% labelled
    settings = ["train.ssl.method=fixmatch", "train.mix.ratio=1", f"train.cache_rows={str(cache_rows).lower()}"]
    tc = load_config(None, settings).train
    inputs = training_inputs(out, tc)
    splits = load_split_table(out)
    train_ids = set(splits.loc[splits["split"] == "train", "image_id"])
    assert set(inputs.labelled) | set(inputs.unlabelled) == train_ids
    assert not set(inputs.labelled) & set(inputs.unlabelled)
    assert len(inputs.synthetic) == len(inputs.labelled)  # ratio 1
    datasets = training_datasets(out, inputs, tc)
    pool = datasets["unlabelled"]
    assert pool.schema().names == ["image_id", "image"]  # no label column reaches a worker
    assert set(pool.to_pandas()["image_id"]) == set(inputs.unlabelled)
    train = datasets["train"].to_pandas()
    assert set(train["image_id"]) == set(inputs.labelled) | set(inputs.synthetic)
    assert len(train) == len(inputs.labels)
    val_ids = set(datasets["val"].to_pandas()["image_id"])
    assert val_ids == set(splits.loc[splits["split"] == "val", "image_id"])
    assert not any(i.startswith("syn-") for i in val_ids)
    # the mix follows the counts: uniform over the 7 classes, ratio 1 -> len(labelled) spread evenly
    per_class = train[train["image_id"].str.startswith("syn-")]["label"].value_counts()
    assert per_class.max() - per_class.min() <= 1 and per_class.sum() == len(inputs.labelled)


@pytest.mark.parametrize("cache_rows", [True, False])
def test_balanced_sampling_repeats_rare_rows_in_the_training_dataset(ray_local, mixed_run, cache_rows):
    from skinsynth.classify.train import training_datasets, training_inputs

    cfg, out = mixed_run
    settings = ["train.sampling=balanced", "train.mix.ratio=1", f"train.cache_rows={str(cache_rows).lower()}"]
    tc = load_config(None, settings).train
    inputs = training_inputs(out, tc)
    assert inputs.repeats.sum() > len(inputs.labels)  # the phantom set is imbalanced, so something is repeated
    train = training_datasets(out, inputs, tc)["train"].to_pandas()
    shown = train["image_id"].value_counts()
    ids = [*inputs.labelled, *inputs.synthetic]
    assert shown.to_dict() == {ids[i]: int(n) for i, n in enumerate(inputs.repeats)}  # real and synthetic alike
    assert (np.bincount(train["label"], minlength=7) == np.bincount(inputs.sampled_labels, minlength=7)).all()


def test_a_mix_without_a_synthetic_set_or_with_too_few_images_is_refused(mixed_run, tmp_path):
    from skinsynth.classify.train import training_inputs

    cfg, out = mixed_run
    with pytest.raises(SkinsynthError, match="have/need"):
        training_inputs(out, load_config(None, ["train.mix.ratio=50"]).train)
    # the generator learnt from the prepared 30%: a mix in a run that hides some of those labels is refused ...
    with pytest.raises(SkinsynthError, match=r"in the unlabelled pool.*their labels would reach the run"):
        training_inputs(out, load_config(None, ["train.mix.ratio=1", "train.label_fraction=0.2"]).train)
    # ... and allowed in one whose budget contains them, which records the generator and the ids it checked
    larger = training_inputs(out, load_config(None, ["train.mix.ratio=1", "train.label_fraction=0.6"]).train)
    assert len(larger.synthetic) == len(larger.labelled)
    provenance = larger.synthetic_provenance
    assert provenance["generator_id"] == "test-generator"
    assert provenance["training_images"] == len(labelled_train_ids(out)) and provenance["ids_sha256"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "data").symlink_to(out / "data")
    with pytest.raises(SkinsynthError, match="generate sample"):
        training_inputs(bare, load_config(None, ["train.mix.ratio=1"]).train)


def test_the_provenance_guard_refuses_a_full_label_generator_after_a_re_prepare_at_10_percent(mixed_run, tmp_path):
    """A generator trained while every training label was visible carries those labels in its samples; after the
    run is prepared again at 10% labels, its samples may not be mixed in: the ids it actually learnt from are
    checked, not the split table's current flags, and the message gives both counts."""
    from skinsynth.classify.train import training_inputs
    from skinsynth.data.prepare import prepare_images
    from tests.conftest import copy_run

    cfg, mixed = mixed_run
    out = copy_run(mixed, tmp_path / "run")
    full = load_config(None, [f"run.out={out}", "data.phantom.n_images=140", "data.preprocess.size=32"])
    prepare_images(full.data, out, engine="local", force=True, progress=lambda _m: None)  # 100% labels
    all_train = labelled_train_ids(out)
    _record_generator(out, all_train, "full-label-generator")
    ten = load_config(
        None,
        [f"run.out={out}", "data.phantom.n_images=140", "data.preprocess.size=32", "data.split.label_fraction=0.1"],
    )
    prepare_images(ten.data, out, engine="local", force=True, progress=lambda _m: None)
    labelled = labelled_train_ids(out)
    assert len(labelled) < len(all_train)
    with pytest.raises(SkinsynthError) as refused:
        training_inputs(out, load_config(None, ["train.mix.ratio=0.5"]).train)
    message = str(refused.value)
    assert f"trained on {len(all_train)} images, but this run labels {len(labelled)}" in message
    assert f"{len(all_train) - len(labelled)} in the unlabelled pool, 0 in validation or test" in message
    assert "full-label-generator" in message and "Retrain the generator" in message
