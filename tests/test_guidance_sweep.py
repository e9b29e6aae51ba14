"""The guidance sweep: a trained run's checkpoint re-scored per guidance scale and sampler steps."""

from __future__ import annotations

import shutil

import guidance_sweep
import pytest
import retrieval_curve
from conftest import run_ok, train_argv, write_imagefolder
from PIL import Image


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_text_encoder_dir, tiny_unet_config_file):
    """Two runs laid out as retrieval_curve.py --keep_checkpoints leaves them: SWEEP/text-encoder, SWEEP/RUN/model."""
    folder = tmp_path_factory.mktemp("guidance_sweep")
    data = write_imagefolder(folder / "data", count=24)
    sweep = folder / "sweep"
    shutil.copytree(tiny_text_encoder_dir, sweep / "text-encoder")
    runs = []
    for seed in (0, 1):
        run = sweep / f"defaults-seed{seed}"
        run_ok(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, run / "model", "--seed", str(seed)))
        runs.append(run)
    return data, runs


def test_each_run_is_scored_at_each_setting_with_its_grid_and_the_settings_means(two_runs, monkeypatch):
    monkeypatch.setattr(retrieval_curve, "CAPTIONS", 8)  # of the 64 a real sweep scores: the test's time
    data, runs = two_runs
    argv = ["--data", str(data), "--runs", *map(str, runs), "--images", "8", "--batch", "4"]
    table = guidance_sweep.main(argv + ["--guidance_scales", "1", "4", "--num_inference_steps", "2", "3"])
    for run in runs:
        for guidance, steps in (("1", 2), ("1", 3), ("4", 2), ("4", 3)):
            assert f"| {run.name} | {guidance} | {steps} | " in table
            assert (run / f"guidance-{guidance}-steps-{steps}.png").is_file()
    assert table.count("| mean of 2 | ") == 4
    # the setting reaches the sampler: guidance 4 draws other samples than guidance 1 (no guidance) from the same noise
    unguided, guided = (Image.open(runs[0] / f"guidance-{g}-steps-2.png") for g in ("1", "4"))
    assert unguided.size == guided.size and unguided.tobytes() != guided.tobytes()


def test_a_checkpoint_the_run_did_not_keep_is_named_with_the_ones_it_did(two_runs):
    data, runs = two_runs
    with pytest.raises(SystemExit, match=r"no checkpoint at --images 12 \(kept: 8, 16\)"):
        guidance_sweep.main(["--data", str(data), "--runs", str(runs[0]), "--images", "12", "--batch", "4"])


def test_a_run_without_a_saved_pipeline_is_named(two_runs, tmp_path):
    data, runs = two_runs
    unfinished = tmp_path / "defaults-seed9"
    (unfinished / "model" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no saved pipeline in .*defaults-seed9 \(still training\?\)"):
        guidance_sweep.main(["--data", str(data), "--runs", str(runs[0]), str(unfinished)])
