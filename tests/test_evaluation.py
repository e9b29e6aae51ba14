"""Know your model: held-out loss, nearest training images and copy rate, FD/KID/CLIP score, the best pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_ok, write_imagefolder

import train_text_to_image as trainer
from text_to_image.checkpoints import read_train_state
from text_to_image.common import UserError
from text_to_image.config import VALIDATION_MAX_HELD_OUT, RunConfig, parse_args
from text_to_image.evaluation import (
    BEST_DIR,
    EVALUATION_LOG,
    TrainingReference,
    copy_threshold,
    eval_mode,
    frechet_distance,
    kernel_inception_distance,
    nearest_neighbours,
    newest_values,
)
from text_to_image.loss import bucket_names
from text_to_image.setup import held_out_count, hold_out_rows, setup_run
from text_to_image.training import Meter, evaluation_summary


def evaluations(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / EVALUATION_LOG).read_text().splitlines()]


def write_distinct_images(folder: Path, count: int, size: int = 16, seed: int = 0) -> Path:
    """Images no two alike (random 4x4 colour blocks), each with its own caption."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        blocks = generator.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(folder / f"{index:03d}.png")
        rows.append(
            {"file_name": f"{index:03d}.png", "text": f"a {['red', 'green', 'blue', 'yellow'][index % 4]} square"}
        )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


# --- held-out images ------------------------------------------------------------------------


def test_a_share_holds_out_at_most_256_images_and_rounds_down_to_none_on_tiny_data():
    assert held_out_count(0.02, 40) == 0
    assert held_out_count(0.02, 1000) == 20
    assert held_out_count(0.02, 50_000) == VALIDATION_MAX_HELD_OUT == 256
    assert held_out_count(5, 1000) == 5


def test_held_out_rows_depend_on_the_usable_rows_only():
    rows = torch.arange(100)
    held = hold_out_rows(rows, 0.1)
    assert len(held) == 10 and torch.equal(held, held.sort().values)
    assert torch.equal(held, hold_out_rows(torch.arange(100), 0.1))
    with pytest.raises(UserError, match="leaving none to train on"):
        hold_out_rows(torch.arange(4), 4)


@pytest.mark.parametrize("seed", ["0", "7"])
def test_held_out_images_never_train_whatever_the_seed(argv, seed):
    args = parse_args(argv("--validation_split", "4", "--seed", seed))
    run = setup_run(RunConfig.from_args(args))
    held = hold_out_rows(torch.arange(16), 4).tolist()
    batches = run.trainer.batches.source
    trained = {row for micro_index in range(batches.batches_per_epoch * 3) for row in batches.rows(micro_index)}
    assert trained == set(range(16)) - set(held)
    validation = run.outputs.checks.validation
    assert validation.pixels.shape == (4, 3, 16, 16) and validation.pixels.dtype == torch.uint8
    assert "12 images (0 skipped), 9 captions (4 more held out for the validation loss)" in run.plan


def test_validation_loss_is_the_same_on_every_call_for_the_same_weights(argv):
    args = parse_args(argv("--validation_split", "4"))
    run = setup_run(RunConfig.from_args(args))
    unet, checks = run.accelerator.unwrap_model(run.trainer.unet), run.outputs.checks
    with eval_mode(unet, None):
        first = checks.validate(unet, run.outputs.noise_scheduler)
        second = checks.validate(unet, run.outputs.noise_scheduler)
    names = bucket_names("val", 100)
    assert first == second and set(first) == {"val/loss", *names}
    assert names[0] == "val/loss_t000" and names[-1] == "val/loss_t090"
    assert first["val/loss"] == pytest.approx(sum(first[name] for name in names) / 10)
    assert first["val/loss_t090"] != first["val/loss_t000"]


def test_validation_loss_after_resume_equals_the_uninterrupted_runs_bit_for_bit(argv, tmp_path):
    flags = ("--validation_split", "4", "--validation_steps", "2", "--use_ema", "--random_flip")
    run_ok(argv(*flags, output=tmp_path / "straight"))
    run_ok(argv(*flags, "--max_train_steps", "2", output=tmp_path / "resumed"))
    run_ok(argv(*flags, "--resume_from_checkpoint", "latest", output=tmp_path / "resumed"))

    def validation_records(output):
        return [{k: v for k, v in r.items() if k == "step" or k.startswith("val/")} for r in evaluations(output)]

    straight, resumed = validation_records(tmp_path / "straight"), validation_records(tmp_path / "resumed")
    assert [record["step"] for record in straight] == [2, 4]
    assert resumed == straight  # exact floats: same weights, same fixed noise and timesteps


def test_resume_drops_the_evaluations_the_interrupted_run_made_after_its_checkpoint(argv, tmp_path):
    output = tmp_path / "out"
    flags = ("--validation_split", "4", "--validation_steps", "1", "--checkpointing_steps", "2")
    run_ok(argv(*flags, "--max_train_steps", "3", output=output))
    assert [record["step"] for record in evaluations(output)] == [1, 2, 3]
    shutil.rmtree(output / "checkpoint-3")  # as if killed after evaluating step 3, before its checkpoint
    run_ok(argv(*flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", output=output))
    assert [record["step"] for record in evaluations(output)] == [1, 2, 3, 4]


def test_validation_data_dir_scores_captions_the_training_set_lacks(argv, tmp_path, capsys):
    held_out = write_imagefolder(tmp_path / "held_out", count=4, captions=["an empty caption"] * 4)
    run_ok(argv("--validation_data_dir", str(held_out), "--validation_steps", "2"))
    records = evaluations(tmp_path / "out")
    assert [record["step"] for record in records] == [2, 4]
    assert all(np.isfinite(record["val/loss"]) for record in records)
    assert f"last evaluated: val/loss {records[-1]['val/loss']:.4g} (step 4)" in capsys.readouterr().out


def test_training_loss_is_logged_per_timestep_bucket():
    meter = Meter(num_train_timesteps=100)
    buckets = torch.zeros(2, 10)
    buckets[:, 3] = torch.tensor([0.6, 2.0])  # two samples in timesteps 30-39, losses summing to 0.6
    meter.add(torch.tensor(0.3), 2, buckets)
    logs = meter.flush(1, Path("."))
    assert logs["train/loss_t030"] == pytest.approx(0.3) and "train/loss_t040" not in logs


# --- memorization -----------------------------------------------------------------------------


def test_nearest_neighbours_find_the_closest_image_and_leave_one_out_skips_itself():
    images = torch.tensor([0, 100, 110, 255], dtype=torch.uint8)[:, None, None, None].expand(4, 3, 2, 2).contiguous()
    distances, indices = nearest_neighbours(images[[1]], images)
    assert indices.tolist() == [1] and distances.tolist() == [0.0]
    distances, indices = nearest_neighbours(images, images, exclude=torch.arange(4))
    assert indices.tolist() == [1, 2, 1, 2]
    assert distances[0].item() == pytest.approx(100 / 255, abs=1e-5)


def test_copy_rate_is_one_for_training_images_and_zero_for_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), generator=generator, dtype=torch.uint8)
    reference = TrainingReference(images=images, captions=["x"] * 20, copy_threshold=copy_threshold(images))
    copies = (images.int() + torch.randint(-2, 3, images.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    assert reference.memorization(copies)[0]["memorization/copy_rate"] == 1.0
    noise = torch.randint(0, 256, (20, 3, 8, 8), generator=generator, dtype=torch.uint8)
    assert reference.memorization(noise)[0]["memorization/copy_rate"] == 0.0


def known_pairs() -> torch.Tensor:
    """20 pairs of images: pair k is a random image and the same image k + 1 levels brighter, so every image's
    nearest other training image is its pair, at an RMS distance of (k + 1) / 255 (random images lie ~0.18 apart)."""
    generator = torch.Generator().manual_seed(0)
    bases = torch.randint(70, 180, (20, 3, 8, 8), generator=generator, dtype=torch.uint8)
    brighter = bases + torch.arange(1, 21, dtype=torch.uint8).view(20, 1, 1, 1)
    return torch.stack([bases, brighter], dim=1).reshape(40, 3, 8, 8)


def test_the_copy_threshold_is_the_5th_percentile_of_leave_one_out_distances():
    images = known_pairs()
    distances, indices = nearest_neighbours(images, images, exclude=torch.arange(40))
    assert indices.tolist() == [index ^ 1 for index in range(40)]  # each image's nearest other: its pair
    # distances 1/255, 1/255, 2/255, 2/255, ...: the 5th percentile of 40 lies at 1.95 (numpy's linear rule)
    assert copy_threshold(images) == pytest.approx(1.95 / 255, rel=1e-3)


@pytest.mark.parametrize(("brightened", "copy"), [(64, True), (96, False)])
def test_a_sample_just_inside_the_threshold_is_a_copy_and_just_outside_is_not(brightened, copy):
    images = known_pairs()
    reference = TrainingReference(images=images, captions=["x"] * 40, copy_threshold=copy_threshold(images))
    sample = images[38].clone().reshape(-1)  # of the pair 20 levels apart: its nearest is images[38]
    sample[:brightened] += 3  # of its 192 values: RMS distance 3 * sqrt(n / 192) / 255, 1.73 / 255 or 2.12 / 255
    metrics, distances, indices = reference.memorization(sample.reshape(1, 3, 8, 8))
    assert indices.tolist() == [38]
    assert distances.item() == pytest.approx(3 * (brightened / 192) ** 0.5 / 255, rel=1e-3)
    assert metrics["memorization/copy_rate"] == (1.0 if copy else 0.0)


@pytest.mark.parametrize(("steps", "low", "high"), [("1", 0.0, 0.0)])
def test_a_model_overfit_on_4_images_copies_them_and_an_untrained_one_does_not(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, steps, low, high
):
    from conftest import train_argv

    data = write_imagefolder(tmp_path / "data", count=4)  # four colours, one shape: no two alike
    flags = ("--max_train_steps", steps, "--learning_rate", "2e-3", "--use_ema", "--ema_max_decay", "0.9")
    grid = (
        "--eval_batch_size",
        "8",
        "--ddpm_num_inference_steps",
        "10",
        "--checkpointing_steps",
        "1000",
        "--save_images_epochs",
        "1000",
    )
    run_ok(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out", *flags, *grid))
    (record,) = evaluations(tmp_path / "out")
    assert low <= record["memorization/copy_rate"] <= high
    strip = tmp_path / "out" / "samples" / f"nearest-{int(steps):07d}.png"
    from PIL import Image

    from pipeline_text_to_image import MIN_CELL_PIXELS

    cell = 16 * -(-MIN_CELL_PIXELS // 16)  # cells upscaled to at least MIN_CELL_PIXELS
    assert Image.open(strip).size[0] == 8 * cell  # sample | nearest, 4 pairs a row


def test_memorization_check_and_validation_off_write_no_evaluations(argv, tmp_path):
    run_ok(argv("--validation_split", "0", "--no-memorization_check"))
    assert not (tmp_path / "out" / EVALUATION_LOG).exists()
    assert not list((tmp_path / "out" / "samples").glob("nearest-*.png"))


# --- sample-quality metrics ------------------------------------------------------------------


def test_frechet_distance_matches_scipy():
    from scipy import linalg

    generator = np.random.default_rng(0)
    a, b = generator.normal(size=(200, 8)), generator.normal(0.5, 2.0, size=(150, 8)) @ generator.normal(size=(8, 8))
    mean_a, mean_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-6)


def kid_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    def kernel(u, v):
        return (u @ v / len(u) + 1) ** 3

    m = len(x)
    within = sum(kernel(x[i], x[j]) + kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
    return within / (m * (m - 1)) - 2 * across / m**2


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel_and_grows_with_a_shift():
    generator = np.random.default_rng(1)
    a, b = generator.normal(size=(30, 5)), generator.normal(size=(30, 5))
    kid = kernel_inception_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert kid == pytest.approx(kid_by_loops(a, b), rel=1e-9)
    assert abs(kid) < 0.5
    shifted = kernel_inception_distance(torch.from_numpy(a), torch.from_numpy(b + 1.0))
    assert shifted > 5 * max(abs(kid), 0.1)
    subsets = kernel_inception_distance(torch.from_numpy(a), torch.from_numpy(b), subset_size=10)
    assert abs(subsets - kid) < 1.0  # random subsets estimate the same quantity


@pytest.fixture(scope="session")
def tiny_feature_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer DINOv2 with its image processor: features, no meaning."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tiny_text_encoder_dir) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_text_encoder_dir)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=32, **small),
        vision_config=dict(image_size=16, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def test_fd_kid_clip_score_are_logged_and_keep_best_fd_saves_a_loadable_pipeline(
    argv, tmp_path, tiny_feature_model_dir, tiny_clip_dir, capsys
):
    from pipeline_text_to_image import TextToImagePipeline

    output = tmp_path / "out"
    models = ("--eval_feature_model", str(tiny_feature_model_dir), "--eval_clip_model", str(tiny_clip_dir))
    run_ok(argv(*models, "--eval_num_images", "4", "--eval_steps", "2", "--keep_best", "fd", "--use_ema"))
    records = [record for record in evaluations(output) if "eval/fd" in record]
    assert [record["step"] for record in records] == [2, 4]
    for record in records:
        assert record["eval/fd"] >= 0 and 0 <= record["eval/clip_score"] <= 100
        assert {"eval/kid", "eval/copy_rate"} <= set(record)
    best_step = min(records, key=lambda record: record["eval/fd"])["step"]
    state = read_train_state(output / "checkpoint-4")
    assert state.best == {"metric": "fd", "value": pytest.approx(min(r["eval/fd"] for r in records)), "step": best_step}
    card = (output / BEST_DIR / "README.md").read_text()
    assert f"| eval/fd | {state.best['value']:.6g} | {best_step} |" in card
    TextToImagePipeline.from_pretrained(output / BEST_DIR)
    assert f"best fd {state.best['value']:.4g} at step {best_step}" in capsys.readouterr().out
    assert f"| eval/fd | {records[-1]['eval/fd']:.6g} | 4 |" in (output / "README.md").read_text()


def test_keep_best_val_loss_holds_the_ema_weights_of_the_best_step(argv, tmp_path):
    from pipeline_text_to_image import TextToImagePipeline

    output = tmp_path / "out"
    run_ok(argv("--validation_split", "4", "--validation_steps", "1", "--keep_best", "val_loss", "--use_ema"))
    records = evaluations(output)
    best = min(records, key=lambda record: record["val/loss"])
    assert read_train_state(output / "checkpoint-4").best["step"] == best["step"]
    if best["step"] in (2, 4):  # a checkpoint holds that step's EMA weights to compare with
        saved = TextToImagePipeline.from_pretrained(output / BEST_DIR).unet
        ema = torch.load(output / f"checkpoint-{best['step']}" / "custom_checkpoint_1.pkl", weights_only=False)
        for shadow, parameter in zip(ema["shadow_params"], saved.parameters(), strict=True):
            assert torch.equal(shadow, parameter)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--validation_split", "1.5"), "--validation_split must be a share below 1, a whole count, or 0"),
        (("--validation_split", "0", "--keep_best", "val_loss"), "--keep_best val_loss needs held-out images"),
        (("--keep_best", "kid"), "--keep_best kid needs --eval_feature_model"),
        (("--validation_data_dir", "/no/such/folder"), "--validation_data_dir /no/such/folder is not a folder"),
        (("--eval_feature_model", "/no/such/model"), "--eval_feature_model /no/such/model: could not be loaded"),
        (("--validation_split", "16"), "holds out 16 of the 16 usable images"),
    ],
)
def test_evaluation_mistakes_get_one_line_naming_the_flag(argv, capsys, flags, message):
    assert trainer.main(argv(*flags)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "objective",
    [
        (),
        ("--prediction_type", "flow_matching", "--timestep_shift", "2", "--max_train_steps", "2"),
        ("--min_snr_variant", "snr_plus_one"),
    ],
    ids=["v_prediction", "flow_matching", "min_snr_plus_one"],
)
def test_evaluate_script_reproduces_the_trainers_validation_loss_for_a_finished_run(argv, tmp_path, capsys, objective):
    import evaluate

    held_out = write_imagefolder(tmp_path / "held_out", count=4, captions=["an empty caption"] * 4)
    run_ok(argv("--validation_data_dir", str(held_out), "--use_ema", *objective))
    last = evaluations(tmp_path / "out")[-1]
    report = tmp_path / "metrics.json"
    command = ["--model", str(tmp_path / "out"), "--data", str(tmp_path / "data"), "--validation_data_dir"]
    flags = ("--num_images", "4", "--num_inference_steps", "2", "--output_json", str(report))
    assert evaluate.main([*command, str(held_out), *flags]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["val/loss"] == pytest.approx(last["val/loss"], rel=1e-5)
    assert 0 <= metrics["eval/copy_rate"] <= 1 and "val/loss_t090" in metrics
    assert "val/loss" in capsys.readouterr().out


def test_the_last_line_gives_each_metrics_newest_value_with_its_step():
    records = [
        {"step": 100, "epoch": 1, "val/loss": 0.03, "memorization/copy_rate": 0.5},
        {"step": 112, "epoch": 2, "memorization/copy_rate": 0.25},
    ]
    latest = newest_values(records)
    assert latest == {"val/loss": (100, 0.03), "memorization/copy_rate": (112, 0.25)}
    best = {"metric": "val_loss", "value": 0.02, "step": 50}
    assert evaluation_summary(latest, best) == (
        "; last evaluated: val/loss 0.03 (step 100), memorization/copy_rate 0.25 (step 112);"
        " best val_loss 0.02 at step 50 (saved in best/)"
    )
    assert evaluation_summary({}, None) == ""
