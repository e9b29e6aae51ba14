"""The quickstart's pieces: the shapes dataset, the evaluator's pixel rules, and the script end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections import Counter

import evaluate_shapes
import make_shapes_dataset
import make_text_encoder
import numpy as np
import pytest
from conftest import REPO
from PIL import Image


def test_shapes_dataset_draws_every_prompt_equally_often(tmp_path):
    folder = make_shapes_dataset.make_shapes_dataset(tmp_path / "shapes", count=72, resolution=32)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 72 and len(list(folder.glob("*.png"))) == 72
    assert set(Counter(row["text"] for row in rows).values()) == {2}
    assert rows[0]["text"] == "a small red circle"
    assert Image.open(folder / rows[0]["file_name"]).size == (32, 32)


def test_the_pixel_rules_read_every_training_image_correctly(tmp_path, capsys):
    folder = make_shapes_dataset.make_shapes_dataset(tmp_path / "shapes", count=144, resolution=32, seed=3)
    shares = evaluate_shapes.main(["--dataset", str(folder)])
    assert shares == {"colour": 1.0, "shape": 1.0, "size": 1.0, "all": 1.0}
    assert "colour 100% (chance 17%), shape 100% (chance 33%), size 100% (chance 50%), all 100% (chance 3%)" in (
        capsys.readouterr().out
    )


def test_a_blank_or_wrong_image_does_not_match():
    blank = np.full((16, 16, 3), 255, np.uint8)
    assert evaluate_shapes.read_image(blank) == evaluate_shapes.Reading(None, None, None)
    blue_square = np.asarray(make_shapes_dataset.draw_shape("square", "blue", "large", 32, random.Random(0)))
    reading = evaluate_shapes.read_image(blue_square)
    assert reading == evaluate_shapes.Reading("blue", "square", "large")
    assert evaluate_shapes.score([(reading, ("red", "square", "small"))]) == {
        "colour": 0.0,
        "shape": 1.0,
        "size": 0.0,
        "all": 0.0,
    }


def test_make_text_encoder_fits_the_longest_caption_unless_max_length_says_otherwise(tmp_path, capsys):
    from transformers import CLIPTokenizer

    captions = ["a red square", "a big blue circle on the left", "a red square"]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    make_text_encoder.main(["--captions", str(tmp_path / "captions.txt"), "--output_dir", str(tmp_path / "fit")])
    assert "token limit 9: the longest caption's tokens, with start and end" in capsys.readouterr().out
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "fit")
    lengths = [len(tokenizer(caption)["input_ids"]) for caption in captions]
    assert tokenizer.model_max_length == max(lengths) == 9  # start, 7 words, end: no caption is cut

    flags = ["--captions", str(tmp_path / "captions.txt"), "--output_dir", str(tmp_path / "cut"), "--max_length", "6"]
    make_text_encoder.main(flags)
    assert CLIPTokenizer.from_pretrained(tmp_path / "cut").model_max_length == 6
    assert (
        "token limit 6 (--max_length) cuts 1 of 2 distinct captions (the longest has 9 tokens); leave --max_length"
        " out to fit them all"
    ) in capsys.readouterr().out


def test_make_text_encoder_reads_a_dataset_folders_metadata_and_names_a_wrong_captions_path(tmp_path, capsys):
    folder = make_shapes_dataset.make_shapes_dataset(tmp_path / "shapes", count=36, resolution=16)
    make_text_encoder.main(["--captions", str(folder), "--output_dir", str(tmp_path / "encoder")])
    assert "token limit 6: the longest caption's tokens" in capsys.readouterr().out  # "a small red circle"
    for path, why in [
        (tmp_path, "a folder without a metadata.jsonl; pass a metadata.jsonl or a .txt of captions"),
        (tmp_path / "missing.txt", "no such file; pass a metadata.jsonl or a .txt file with one caption a line"),
    ]:
        with pytest.raises(SystemExit):
            make_text_encoder.main(["--captions", str(path), "--output_dir", str(tmp_path / "other")])
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: --captions {path}: {why}")


@pytest.mark.slow
def test_quickstart_script_trains_saves_and_scores(tmp_path):
    environment = dict(
        os.environ,
        DATA_DIR=str(tmp_path / "data"),
        OUTPUT_DIR=str(tmp_path / "out"),
        EVALUATE_ARGS="--num_inference_steps 2",
    )
    quick = ["--max_train_steps", "2", "--eval_batch_size", "2"]
    quick += ["--ddpm_num_inference_steps", "2", "--logger", "none"]
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "quickstart.sh"), *quick],
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = tmp_path / "out"
    assert (output / "model_index.json").is_file() and (output / "text_encoder" / "config.json").is_file()
    assert len(list((output / "samples").glob("epoch-*.png"))) == 1
    assert "144 generated images" in result.stdout and "all " in result.stdout
    # 18 prompt rows (colour x shape) of 2 sizes x 4 images, 16 px each
    assert Image.open(output / "evaluation.png").size == (8 * 16, 18 * 16)


def test_adherence_table_gives_images_seen_to_reach_each_threshold():
    import adherence_curve

    curves = {("after", 0): {6400: 0.3, 12800: 0.55, 19200: 0.92}, ("before", 0): {6400: 0.1, 12800: 0.2}}
    assert adherence_curve.images_to_reach(curves[("after", 0)], 0.5) == 12800
    lines = adherence_curve.format_table(curves).splitlines()
    assert lines[0] == "| recipe | seed | 6.4k | 12.8k | 19.2k | to 50% | to 90% |"
    assert lines[2] == "| after | 0 | 30% | 55% | 92% | 12.8k | 19.2k |"
    assert lines[3] == "| before | 0 | 10% | 20% |  | > 12.8k | > 12.8k |"


def test_adherence_summary_reads_the_seeds_mean_curve_between_points():
    import adherence_curve

    curves = {
        ("v", 0): {6400: 0.25, 12800: 0.5, 19200: 1.0},
        ("v", 1): {6400: 0.25, 12800: 1.0, 19200: 0.875, 25600: 1.0},  # 25.6k: only one seed scored it
        ("slow", 0): {6400: 0.125, 12800: 0.25},
    }
    mean = {6400: 0.25, 12800: 0.75, 19200: 0.9375}
    assert adherence_curve.mean_curves(curves)["v"] == (2, mean)
    # 50%: halfway from 25% at 6.4k to 75% at 12.8k; 90%: 0.15 / 0.1875 = 4/5 of the way on to 19.2k
    assert adherence_curve.interpolated_crossing(mean, 0.5) == 9600
    assert adherence_curve.interpolated_crossing(mean, 0.9) == pytest.approx(17920)
    assert adherence_curve.interpolated_crossing({6400: 1.0}, 0.5) == 3200  # the curve starts at 0 at 0 images
    assert adherence_curve.interpolated_crossing(mean, 0.95) is None
    lines = adherence_curve.format_summary(curves).splitlines()
    assert lines[0] == "| recipe | seeds | to 50% (mean) | to 90% (mean) |"
    assert lines[2:] == ["| v | 2 | 9.6k | 17.9k |", "| slow | 1 | > 12.8k | > 12.8k |"]


def test_adherence_plot_draws_each_seed_pale_and_the_seeds_mean_in_the_recipes_colour(tmp_path):
    import adherence_curve

    adherence_curve.plot({("v", 0): {200: 1.0}, ("v", 1): {200: 0.0}}, tmp_path / "c.png")
    image = Image.open(tmp_path / "c.png")
    column = [image.getpixel((200, y)) for y in range(image.height)]  # x = 200 of 48..592: 152/544 of the way
    seed_at, mean_at = round(312 - 264 * 152 / 544), round(312 - 0.5 * 264 * 152 / 544)
    assert (233, 169, 169) in column[seed_at - 2 : seed_at + 3]  # seed 0, rising to 100%: pale red
    assert (200, 40, 40) in column[mean_at - 2 : mean_at + 3]  # the mean, rising to 50%: red
    assert (200, 40, 40) not in column[seed_at - 2 : seed_at + 3]


def test_true_defaults_recipes_give_the_trainer_nothing_that_changes_training_but_size_batch_rate_and_steps(tmp_path):
    import argparse

    import adherence_curve

    from text_to_image.config import build_parser

    args = argparse.Namespace(max_train_steps=1600, eval_every=200)
    data, encoder = tmp_path / "shapes", tmp_path / "encoder"
    command = adherence_curve.train_command("tiny defaults, batch 128", 3, args, data, encoder, tmp_path / "run")
    flags = build_parser().parse_args(command[2:])
    given = {key for key, value in vars(flags).items() if value != build_parser().get_default(key)}
    writes_only = {"logger", "save_images_epochs", "save_model_epochs", "validation_steps", "checkpointing_steps"}
    places = {"train_data_dir", "text_encoder_name_or_path", "output_dir", "overwrite_output_dir"}
    trains = {"resolution", "model_size", "train_batch_size", "seed", "max_train_steps"}
    assert given == writes_only | places | trains
    assert (flags.model_size, flags.train_batch_size, flags.max_train_steps, flags.checkpointing_steps) == (
        "tiny",
        128,
        400,  # the same 51.2k images as 1600 steps of 32
        50,
    )


def test_adherence_report_reads_scores_of_finished_and_cut_runs(tmp_path):
    import adherence_curve

    (tmp_path / "tiny defaults-seed0").mkdir()
    (tmp_path / "tiny defaults-seed0" / "scores.json").write_text(json.dumps({"6400": 0.5, "12800": 0.95}))
    (tmp_path / "tiny defaults, batch 128-seed0").mkdir()  # cut short: scores by step
    (tmp_path / "tiny defaults, batch 128-seed0" / "scores.partial.json").write_text(json.dumps({"50": 0.25}))
    runs = ["--runs", "tiny defaults@0,1", "tiny defaults, batch 128@0", "--report_only", "--output_dir"]
    curves = adherence_curve.main([*runs, str(tmp_path)])
    assert curves == {
        ("tiny defaults", 0): {6400: 0.5, 12800: 0.95},
        ("tiny defaults, batch 128", 0): {6400: 0.25},
    }
    assert not (tmp_path / "shapes").exists()  # a report makes no data


@pytest.mark.slow
def test_adherence_curve_trains_scores_each_checkpoint_and_plots(tmp_path, monkeypatch):
    import adherence_curve

    # the trainer's closing grid (16 images, 25 steps) is not what this checks: 2 images, 2 steps
    quick_grid = ["--eval_batch_size", "2", "--ddpm_num_inference_steps", "2"]
    monkeypatch.setattr(adherence_curve, "COMMON_FLAGS", [*adherence_curve.COMMON_FLAGS, *quick_grid])
    argv = ["--recipes", "after", "--seeds", "0", "--max_train_steps", "2", "--eval_every", "1"]
    argv += ["--dataset_size", "72"]  # two images per caption: the count does not matter to a 2-step run
    argv += ["--num_inference_steps", "2"]  # a 2-step run scores whatever its sampler's steps: 2, not 25
    argv += [
        "--images_per_prompt",
        "1",
        "--jobs",
        "1",
        "--output_dir",
        str(tmp_path),
        "--plot",
        str(tmp_path / "c.png"),
    ]
    curves = adherence_curve.main(argv)
    assert list(curves) == [("after", 0)] and sorted(curves[("after", 0)]) == [32, 64]
    assert all(0 <= share <= 1 for share in curves[("after", 0)].values())
    assert Image.open(tmp_path / "c.png").size == (640, 360)
    assert not list((tmp_path / "after-seed0" / "model").glob("checkpoint-*"))  # scored, then removed
    assert "| after | 0 |" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_gpu_check_dry_run_takes_every_step_on_cpu_and_writes_its_table(tmp_path):
    import subprocess

    output = tmp_path / "gpu_check.md"
    result = subprocess.run(
        # the rows tests/test_data_and_flags.py (channels_last) and tests/test_small_datasets.py already train,
        # and the throughput table, which tests/test_throughput.py runs through the same row
        ["bash", str(REPO / "examples" / "gpu_check.sh"), "--cpu", "--output", str(output)]
        + ["--skip_rows", "channels_last", "small-dataset flags", "throughput"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[1]
        for line in output.read_text().splitlines()
        if line.startswith("| ") and " | " in line
    }
    assert rows.pop("check") == "result"
    assert [name for name, result in rows.items() if result == "ok"] == [
        "train (CPU: fp32)",
        "train 2 steps with --use_ema, checkpoint",
        "resume --use_ema, 1 more step",
        "pipeline (CPU: float32, no offload)",
        "MFU at 16 px, batch 2 (gpu_check-mfu-16px.md)",
    ]
    assert set(rows.values()) == {"ok", "skipped"}
    assert rows["throughput table (gpu_check-throughput.md)"] == "skipped"
    assert (tmp_path / "gpu_check-mfu-16px.md").read_text().count("M |") == 4


def test_ci_runs_exactly_the_readme_test_command():
    """CI and a contributor run the same suite, in parallel (pytest-xdist) where README says so."""
    readme_command = next(
        line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("python -m pytest")
    )
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == readme_command == "python -m pytest -q -n auto --dist worksteal"
    assert "pytest-xdist" in (REPO / "requirements-dev.txt").read_text()
