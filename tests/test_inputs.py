"""Inputs as people write them: --config files whose values YAML or JSON types otherwise than the flag, and
text files as Windows editors save them (a UTF-8 byte-order mark, CRLF line ends). Each is read as the user
meant it, or refused in one line that names the file or flag and the fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_error, write_imagefolder

from text_to_image.common import UserError
from text_to_image.config import DataConfig, RunConfig, parse_args
from text_to_image.data import caption_cell_to_list, read_image_table
from text_to_image.models import load_unet_config
from text_to_image.outputs import choose_validation_prompts

WINDOWS_BOM = b"\xef\xbb\xbf"  # what Notepad and Excel's "CSV UTF-8" put before the first character


def windows_text(text: str) -> bytes:
    """`text` as a Windows editor saves it: a byte-order mark, then CRLF line ends."""
    return WINDOWS_BOM + text.replace("\n", "\r\n").encode("utf-8")


def args_from_config(tmp_path: Path, text: str, name: str = "run.yaml", *extra: str):
    config = tmp_path / name
    config.write_text(text)
    return parse_args(["--config", str(config), "--train_data_dir", str(tmp_path), *extra])


# ---------------------------------------------------------------------------------------------
# --config values


def test_config_yaml_values_are_read_as_written_on_the_command_line(tmp_path):
    """YAML 1.1 reads no/yes/on/off as booleans and 8:30 as 510; a flag reads the text the user wrote."""
    args = args_from_config(
        tmp_path,
        "mixed_precision: no\n"
        "data_on_device: yes\n"
        "max_train_time: 3600\n"
        "validation_prompts: a red circle\n"
        "learning_rate: 1e-4\n"
        "max_train_steps: 1e4\n"
        "resolution: 32.0\n"
        "output_dir: 2024\n"
        "train_text_encoder: on\n"
        "center_crop: off\n"
        "random_flip: yes\n"
        "seed: ~\n"
        "eval_steps: 9007199254740993\n"  # 2**53 + 1: no float on the way
        "keep_best:\n",
    )
    assert args.mixed_precision == "no" and args.data_on_device == "yes"
    assert args.max_train_time == "3600" and args.validation_prompts == ["a red circle"]
    assert (args.learning_rate, args.max_train_steps, args.resolution) == (1e-4, 10000, 32)
    assert args.output_dir == Path("2024")
    assert (args.train_text_encoder, args.center_crop, args.random_flip) == (True, False, True)
    assert args.seed is None and args.keep_best is None and args.eval_steps == 2**53 + 1
    config = RunConfig.from_args(args)
    assert config.optim.max_train_seconds == 3600 and config.optim.mixed_precision == "no"


def test_config_yaml_durations_with_a_colon_stay_text(tmp_path, capsys):
    """YAML 1.1 reads 8:30 as the number 510 (base 60): the duration is refused as written, not trained 510 s."""
    config = tmp_path / "run.yaml"
    config.write_text(f"train_data_dir: {tmp_path}\nmax_train_time: 8:30\n")
    error = run_error(["--config", str(config)], capsys)
    assert error == "error: --max_train_time '8:30' is not a duration; write e.g. 8h30m, 90m or 3600s\n"


def test_config_json_values_are_read_as_the_text_they_stand_for(tmp_path):
    values = {"max_train_time": 3600, "validation_prompts": "a red circle", "mixed_precision": False, "resolution": 32}
    args = args_from_config(tmp_path, json.dumps(values), "run.json")
    assert (args.max_train_time, args.validation_prompts, args.mixed_precision) == ("3600", ["a red circle"], "no")
    assert args.resolution == 32


@pytest.mark.parametrize(
    "line, words",
    [
        ("logger: off", 'logger is "off", but --logger takes one of tensorboard, wandb, none'),
        ("model_size: 7", 'model_size is "7", but --model_size takes one of tiny, small, base, large'),
        ("resolution: yes", 'resolution is "yes", but --resolution takes a whole number'),
        ("resolution: 3.5", 'resolution is "3.5", but --resolution takes a whole number'),
        ("resolution:", "resolution is empty, but --resolution takes a whole number"),
        ("learning_rate: fast", 'learning_rate is "fast", but --learning_rate takes a number'),
        ("center_crop: maybe", 'center_crop is "maybe", but --center_crop takes true or false'),
        ("train_batch_size: [8, 16]", 'train_batch_size is ["8", "16"], but --train_batch_size takes a whole number'),
        (
            "validation_prompts: {a: b}",
            'validation_prompts is {"a": "b"}, but --validation_prompts takes a text or a list',
        ),
        (
            "validation_prompts: [[a, b]]",
            'validation_prompts is [["a", "b"]], but --validation_prompts takes a text or',
        ),
    ],
)
def test_a_config_value_the_flag_does_not_take_is_named_in_one_line(tmp_path, capsys, line, words):
    config = tmp_path / "run.yaml"
    config.write_text(f"train_data_dir: {tmp_path}\n{line}\n")
    error = run_error(["--config", str(config)], capsys)
    assert error.startswith(f"error: --config {config}: {words}") and error.count("\n") == 1


@pytest.mark.parametrize(
    "value, words",
    [
        (
            {"resume_from_checkpoint": False},
            "resume_from_checkpoint is false, but --resume_from_checkpoint takes a text",
        ),
        ({"logger": False}, "logger is false, but --logger takes one of tensorboard, wandb, none"),
        ({"resolution": True}, "resolution is true, but --resolution takes a whole number"),
        ({"seed": 1.5}, "seed is 1.5, but --seed takes a whole number"),
    ],
)
def test_a_json_config_value_the_flag_does_not_take_is_named_in_one_line(tmp_path, capsys, value, words):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train_data_dir": str(tmp_path), **value}))
    error = run_error(["--config", str(config)], capsys)
    assert error == f"error: --config {config}: {words}\n"


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("run.yaml", "resolution: [32\n", "is not valid YAML (line 2, column 1: expected ',' or ']', but got"),
        ("run.json", '{"resolution": 32,}', "is not valid JSON (line 1, column 19: "),
        ("run.yaml", "- resolution: 32\n", "must hold a mapping of flag names to values"),
    ],
)
def test_a_config_file_that_does_not_parse_is_named_in_one_line(tmp_path, capsys, name, text, words):
    config = tmp_path / name
    config.write_text(text)
    error = run_error(["--config", str(config)], capsys)
    assert error.startswith(f"error: --config {config} {words}") and error.count("\n") == 1


@pytest.mark.parametrize("name", ["run.yaml", "run.json"])
def test_a_config_file_saved_by_a_windows_editor_is_read(tmp_path, name):
    text = (
        json.dumps({"resolution": 32, "validation_prompts": ["a cat", "a dog"]}, indent=1)
        if name.endswith(".json")
        else "resolution: 32\nvalidation_prompts:\n  - a cat\n  - a dog\n"
    )
    (tmp_path / name).write_bytes(windows_text(text))
    args = parse_args(["--config", str(tmp_path / name)])
    assert (args.resolution, args.validation_prompts) == (32, ["a cat", "a dog"])


def test_the_quickstart_config_reads_as_before():
    args = parse_args(["--config", str(Path(__file__).parents[1] / "examples" / "quickstart.yaml")])
    assert (args.train_text_encoder, args.overwrite_output_dir, args.use_ema) == (True, True, True)
    assert (args.learning_rate, args.max_train_steps, args.max_train_time) == (0.002, 1200, "15m")
    assert (args.prediction_type, args.timestep_sampling, args.lr_scheduler) == (
        "flow_matching",
        "logit_normal",
        "warmup_stable_decay",
    )
    assert (args.guidance_scale, args.logger, len(args.validation_prompts)) == (3.0, "tensorboard", 8)
    assert args.validation_prompts[0] == "a large red circle"


# ---------------------------------------------------------------------------------------------
# Text files saved by Windows editors: a byte-order mark and CRLF line ends


def table_of(folder: Path):
    return read_image_table(DataConfig(train_data_dir=str(folder), resolution=16), None, show_progress=False)


def test_txt_captions_saved_by_a_windows_editor_carry_no_byte_order_mark_or_carriage_return(tmp_path):
    data = write_imagefolder(tmp_path / "data", count=4)
    (data / "metadata.jsonl").unlink()
    for index, caption in enumerate(["a red square", "a green square", "a blue square", "a yellow square"]):
        (data / f"{index:03d}.txt").write_bytes(windows_text(f"{caption}\n"))
    captions = [options[0] for options in table_of(data).caption_options]
    assert captions == ["a red square", "a green square", "a blue square", "a yellow square"]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_saved_by_a_windows_editor_gives_clean_captions(tmp_path, kind):
    data = write_imagefolder(tmp_path / "data", count=4)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").unlink()
    text = (
        "".join(json.dumps(row) + "\n" for row in rows)
        if kind == "jsonl"
        else "file_name,text\n" + "".join(f"{row['file_name']},{row['text']}\n" for row in rows)
    )
    (data / f"metadata.{kind}").write_bytes(windows_text(text))
    captions = [options[0] for options in table_of(data).caption_options]
    assert captions == ["a red square", "a green square", "a blue square", "a yellow square"]


def test_a_bad_row_of_a_windows_metadata_jsonl_is_named_by_its_line(tmp_path):
    data = write_imagefolder(tmp_path / "data", count=4)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"file_name": "002.png", "text": 7})
    (data / "metadata.jsonl").write_bytes(windows_text("\n".join(lines) + "\n"))
    with pytest.raises(UserError, match=re.escape('metadata.jsonl line 3: the caption column "text" holds 7')):
        table_of(data)


def test_caption_cells_lose_byte_order_marks_and_carriage_returns():
    """Whatever table a caption comes from (a Hub dataset, a CSV cell, a shard's .txt), it is trained as written."""
    assert caption_cell_to_list("\ufeffa red circle\r\n", 0, "text") == ["a red circle"]
    assert caption_cell_to_list("a red circle,\r\nsmall\rcentred", 0, "text") == ["a red circle,\nsmall\ncentred"]
    assert caption_cell_to_list(["\ufeffa cat\r", "a dog"], 0, "text") == ["a cat", "a dog"]


def test_a_validation_prompts_file_saved_by_a_windows_editor_gives_clean_prompts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(windows_text("a yellow circle\n\n  a green square  \n"))
    assert choose_validation_prompts([str(prompts)], ["", "x"], 4, 0) == ["a yellow circle", "a green square"]


def test_a_unet_config_saved_by_a_windows_editor_is_read(tmp_path, tiny_unet_config_file):
    config = tmp_path / "config.json"
    config.write_bytes(windows_text(json.dumps(json.loads(tiny_unet_config_file.read_text()), indent=1)))
    assert load_unet_config(str(config), 16) == json.loads(tiny_unet_config_file.read_text())


def test_the_text_encoder_example_reads_windows_caption_files(tmp_path):
    from make_text_encoder import read_captions

    (tmp_path / "metadata.jsonl").write_bytes(windows_text('{"text": "a cat"}\n{"text": ["a dog", "a pup"]}\n'))
    (tmp_path / "captions.txt").write_bytes(windows_text("a cat\na dog\n"))
    assert read_captions(tmp_path / "metadata.jsonl", "text") == ["a cat", "a dog", "a pup"]
    assert read_captions(tmp_path / "captions.txt", "text") == ["a cat", "a dog"]
