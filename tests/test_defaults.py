"""What a user who passes only data, an encoder and --model_size gets: the learning rate chosen for the UNet and
the batch, EMA on, a short warm-up (docs/results/learning-rates.md)."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import run_error, run_ok

import train_text_to_image as trainer
from text_to_image.config import (
    LEARNING_RATE_REFERENCE_BATCH,
    MODEL_SIZES,
    PRESET_LEARNING_RATES,
    ModelConfig,
    OptimConfig,
    build_parser,
    parse_args,
)
from text_to_image.models import build_unet, default_unet_config
from text_to_image.optimization import build_ema, choose_learning_rates, count_parameters, interpolated_learning_rate

REFERENCE = LEARNING_RATE_REFERENCE_BATCH


def configs(argv, *flags: str) -> tuple:
    args = parse_args(argv(*flags))
    return OptimConfig.from_args(args), ModelConfig.from_args(args)


def first_group(output) -> dict:
    optimizer = torch.load(output / "checkpoint-2" / "optimizer.bin", weights_only=False)
    return optimizer["param_groups"]


def test_the_measured_rates_are_the_ones_the_docs_give():
    assert PRESET_LEARNING_RATES == {"tiny": 2e-3, "small": 2e-3, "base": 5e-4, "large": 2.5e-4}
    assert REFERENCE == 32


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_each_model_size_gets_its_rate_at_the_reference_batch_scaled_by_the_square_root_of_the_batch(argv, size):
    optim, model = configs(argv)
    model = dataclasses.replace(model, model_config_name_or_path=None, model_size=size)
    rates = {batch: choose_learning_rates(optim, model, None, batch) for batch in (8, 32, 128)}
    preset = PRESET_LEARNING_RATES[size]
    assert [rates[batch].unet for batch in (8, 32, 128)] == [preset / 2, preset, preset * 2]
    assert rates[128].why == f"chosen: {preset:.2g} for --model_size {size} x sqrt(128 images a step / 32)"
    assert rates[32].text_encoder is None  # frozen encoder: one parameter group


def test_a_unet_config_is_placed_between_the_presets_by_its_parameter_count():
    counts = {"tiny": 1_000_000, "small": 2_000_000, "base": 8_000_000, "large": 16_000_000}
    rate = interpolated_learning_rate
    assert rate(500_000, counts) == 2e-3  # below the smallest preset: its rate
    assert rate(2_000_000, counts) == 2e-3
    assert rate(4_000_000, counts) == pytest.approx(1e-3)  # halfway in log between small's 2e-3 and base's 5e-4
    assert rate(8_000_000, counts) == pytest.approx(5e-4)
    assert rate(10**9, counts) == 2.5e-4  # above the largest: its rate


def test_a_config_equal_to_a_preset_gets_that_presets_rate(argv, tmp_path):
    config = default_unet_config(16, "small")
    path = tmp_path / "small.json"
    path.write_text(json.dumps(config))
    optim, model = configs(argv, "--model_config_name_or_path", str(path))
    unet = build_unet(str(path), 16, cross_attention_dim=32)
    rates = choose_learning_rates(optim, model, unet, REFERENCE)
    assert rates.unet == pytest.approx(PRESET_LEARNING_RATES["small"])
    assert rates.why.startswith(f"chosen: 0.002 for {count_parameters(unet) / 1e6:.1f}M parameters")


def test_the_run_trains_at_the_chosen_rate_and_says_why_and_a_given_rate_wins(argv, tmp_path, caplog):
    # conftest's UNet is smaller than every preset (tiny's rate); 4 images a step
    with caplog.at_level("INFO", logger="text_to_image"):
        run_ok(argv("--max_train_steps", "2"))
    chosen = PRESET_LEARNING_RATES["tiny"] * math.sqrt(4 / REFERENCE)
    assert [group["initial_lr"] for group in first_group(tmp_path / "out")] == [chosen]
    assert f"learning rate {chosen:.2g} (chosen: 0.002 for " in caplog.text
    assert "x sqrt(4 images a step / 32))" in caplog.text
    card = (tmp_path / "out" / "README.md").read_text()  # the model card gives the rate the run trained at
    assert f'"learning_rate": {json.dumps(chosen)},' in card

    caplog.clear()
    with caplog.at_level("INFO", logger="text_to_image"):
        run_ok(argv("--max_train_steps", "2", "--learning_rate", "1e-2", output=tmp_path / "given"))
    assert [group["initial_lr"] for group in first_group(tmp_path / "given")] == [1e-2]
    assert "learning rate 0.01 (given)" in caplog.text


def test_a_trained_encoder_gets_half_the_chosen_rate_unless_a_rate_is_given(argv, tmp_path):
    run_ok(argv("--train_text_encoder", "--max_train_steps", "2"))
    chosen = PRESET_LEARNING_RATES["tiny"] * math.sqrt(4 / REFERENCE)
    assert [group["initial_lr"] for group in first_group(tmp_path / "out")] == [chosen, chosen * 0.5]
    # --learning_rate given, no encoder rate: one group, the layout older checkpoints have
    run_ok(argv("--train_text_encoder", "--max_train_steps", "2", "--learning_rate", "1e-3", output=tmp_path / "one"))
    assert [group["initial_lr"] for group in first_group(tmp_path / "one")] == [1e-3]


def test_ema_is_on_and_the_warm_up_short_by_default_and_the_old_flags_still_work(argv, capsys):
    defaults = build_parser().parse_args([])
    assert (defaults.use_ema, defaults.lr_warmup_steps, defaults.learning_rate) == (True, 100, None)
    assert parse_args(argv("--use_ema")).use_ema is True
    assert parse_args(argv("--no-use_ema")).use_ema is False
    optim, _ = configs(argv, "--no-use_ema")
    assert build_ema(torch.nn.Linear(2, 2), optim) is None
    assert trainer.main(argv("--learning_rate", "0")) == 2
    assert "--learning_rate must be > 0, got 0.0" in capsys.readouterr().err


def test_a_run_trained_without_ema_resumes_only_with_no_use_ema(argv, capsys):
    run_ok(argv("--no-use_ema", "--max_train_steps", "2"))
    error = run_error(argv("--max_train_steps", "4", "--resume_from_checkpoint", "latest"), capsys)
    assert "that run trained without an EMA and --use_ema is on" in error and "pass --no-use_ema" in error
    run_ok(argv("--no-use_ema", "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))


def test_grids_and_the_pipeline_sample_at_guidance_5_by_default_and_the_old_3_is_a_flag():
    import inspect

    from pipeline_text_to_image import TextToImagePipeline

    pipeline_default = inspect.signature(TextToImagePipeline.__call__).parameters["guidance_scale"].default
    assert pipeline_default == parse_args(["--train_data_dir", "data"]).guidance_scale == 5.0
    assert parse_args(["--train_data_dir", "data", "--guidance_scale", "3"]).guidance_scale == 3.0
