"""OUTPUT_DIR/run_config.yaml: what a run resolved its flags to, read back to repeat it; --dry_run shows it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from conftest import assert_same_tensors, run_error, run_ok, train_argv
from safetensors.torch import load_file

import train_text_to_image as trainer
from text_to_image.checkpoints import list_checkpoints
from text_to_image.config import parse_args
from text_to_image.run_config import NOT_RECORDED, RUN_CONFIG_FILE, Choice, run_config_text


@pytest.fixture
def argv_without_seed(tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, monkeypatch):
    """The tiny run of test_train.py with no --seed (and no --learning_rate, --mixed_precision or launch config):
    every choice left to the run."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)

    def make(output: Path, *extra: str) -> list[str]:
        flags = train_argv(tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, output, *extra)
        seed_at = flags.index("--seed")
        return flags[:seed_at] + flags[seed_at + 2 :]

    return make


def test_a_run_repeated_from_its_run_config_trains_the_same_weights_bit_for_bit(argv_without_seed, tmp_path):
    first, repeat = tmp_path / "first", tmp_path / "repeat"
    run_ok(argv_without_seed(first, "--train_text_encoder"))
    text = (first / RUN_CONFIG_FILE).read_text()
    written = yaml.safe_load(text)
    seed = written["seed"]
    assert isinstance(seed, int) and f"# seed, chosen: drawn at random (no --seed)\nseed: {seed}\n" in text
    rate = written["learning_rate"]
    assert (
        f"# learning_rate, chosen: 0.002 for 1.0M parameters x sqrt(4 images a step / 32)\nlearning_rate: {rate!r}"
        in text
    )
    assert math.isclose(rate, 0.002 * math.sqrt(4 / 32), rel_tol=1e-12)
    assert written["text_encoder_learning_rate"] == rate * 0.5
    assert "# text_encoder_learning_rate, chosen: 0.5 x the chosen UNet rate\n" in text
    assert "# mixed_precision, chosen: no --mixed_precision and no accelerate launch config: full precision\n" in text
    assert "# data_on_device, chosen: auto: no GPU, so the host draws the batches\ndata_on_device: 'no'\n" in text
    assert written["mixed_precision"] == "no" and written["caption_max_length"] == 5
    assert written["train_text_encoder"] is True and written["max_train_steps"] == 4  # given flags as given
    assert not set(NOT_RECORDED) & set(written) and not list(first.glob(f".{RUN_CONFIG_FILE}*"))

    run_ok(["--config", str(first / RUN_CONFIG_FILE), "--output_dir", str(repeat)])  # the command line wins
    for step in (2, 4):
        checkpoint = f"checkpoint-{step}/model.safetensors"
        assert_same_tensors(load_file(first / checkpoint), load_file(repeat / checkpoint))
    pipeline_unet = "unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(load_file(first / pipeline_unet), load_file(repeat / pipeline_unet))
    repeated = yaml.safe_load((repeat / RUN_CONFIG_FILE).read_text())
    assert repeated == written | {"output_dir": str(repeat)}  # nothing left to choose, nothing chosen otherwise


def test_run_config_loads_back_through_the_parser_to_the_values_it_holds(tmp_path):
    flags = vars(parse_args(["--train_data_dir", str(tmp_path), "--validation_prompts", "a: b", "no"]))
    flags = {name: str(value) if isinstance(value, Path) else value for name, value in flags.items()}
    flags = {name: value for name, value in flags.items() if name not in NOT_RECORDED}
    choices = {"learning_rate": Choice(0.1 + 0.2, "a test"), "data_on_device": Choice("no", "auto: no GPU")}
    (tmp_path / RUN_CONFIG_FILE).write_text(run_config_text(flags, choices, complete=True))
    loaded = vars(parse_args(["--config", str(tmp_path / RUN_CONFIG_FILE)]))
    expected = flags | {"learning_rate": 0.30000000000000004, "data_on_device": "no"}
    assert {name: loaded[name] for name in flags} == expected | {"output_dir": Path(flags["output_dir"])}


def test_dry_run_prints_the_plan_and_run_config_and_trains_nothing(argv_without_seed, tmp_path, capsys):
    output = tmp_path / "out"
    assert trainer.main(argv_without_seed(output, "--dry_run", "--hub_token", "hf_secret")) == 0
    printed = capsys.readouterr().out
    text = (output / RUN_CONFIG_FILE).read_text()
    assert f"{output / RUN_CONFIG_FILE}:\n{text}" in printed
    assert printed.startswith("run plan: 16 images") and "4 per step" in printed and "learning rate 0.00071" in printed
    assert printed.rstrip().endswith(f"train it with --config {output / RUN_CONFIG_FILE}")
    assert "learning_rate: 0.000707" in text and "hf_secret" not in text and "\ndry_run:" not in text
    assert not list_checkpoints(output) and not (output / "model_index.json").exists()
    assert not (output / "samples").exists() and not (output / "logs").exists()


def test_a_run_that_fails_in_setup_still_leaves_what_it_was_asked(argv_without_seed, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    output = tmp_path / "out"
    run_error(argv_without_seed(output, "--train_data_dir", str(empty)), capsys)
    text = (output / RUN_CONFIG_FILE).read_text()
    assert "# Written before setup: the choices the run makes itself" in text
    written = yaml.safe_load(text)
    assert written["train_data_dir"] == str(empty) and written["seed"] is None and written["learning_rate"] is None
