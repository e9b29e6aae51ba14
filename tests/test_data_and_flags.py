"""What the trainer's middle must keep: data modes agree, every flag does what it says, no secret is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_captions, train_argv, write_imagefolder
from test_train import assert_same_tensors, run_error, run_ok, unet_weights

import train_text_to_image as trainer
from text_to_image.batches import crop_and_flip, draw_batch
from text_to_image.checkpoints import list_checkpoints
from text_to_image.config import DataConfig, DiffusionConfig, RunConfig, build_parser, parse_args, public_flags
from text_to_image.data import Shard, decode_image, read_image_table
from text_to_image.loss import DiffusionObjective, MinSnrWeighting, StepLoss
from text_to_image.models import build_noise_scheduler
from text_to_image.optimization import build_ema
from text_to_image.outputs import append_to_gif, choose_validation_prompts
from text_to_image.setup import setup_run

# ---------------------------------------------------------------------------------------------
# Augmentation


def test_crop_takes_the_asked_window_and_flip_mirrors_it():
    image = torch.arange(3 * 4 * 6, dtype=torch.uint8).reshape(3, 4, 6)  # every pixel differs; 2 spare columns
    crop_at = torch.tensor([[0.0, 0.0], [0.0, 0.99], [0.0, 0.5], [0.0, 0.5]])
    flip = torch.tensor([False, False, False, True])
    batch = crop_and_flip([image] * 4, 4, crop_at, flip)

    def scaled(window: torch.Tensor) -> torch.Tensor:
        return window.float() / 127.5 - 1

    assert torch.equal(batch[0], scaled(image[:, :, 0:4]))
    assert torch.equal(batch[1], scaled(image[:, :, 2:6]))
    assert torch.equal(batch[2], scaled(image[:, :, 1:5]))
    assert torch.equal(batch[3], scaled(image[:, :, 1:5].flip(-1)))


def test_center_crop_keeps_the_middle_of_a_wide_image(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file):
    from PIL import Image

    data = write_imagefolder(tmp_path / "data", count=8)
    for path in data.glob("*.png"):  # 48x16: a red left third, green middle, blue right third
        wide = Image.new("RGB", (48, 16), (220, 30, 30))
        wide.paste((30, 180, 60), (16, 0, 32, 16))
        wide.paste((30, 60, 220), (32, 0, 48, 16))
        wide.save(path)
    middle = decode_image({"path": str(data / "000.png"), "bytes": None}, 16, center_crop=True)
    assert middle.shape == (3, 16, 16) and middle[:, 4:12, 4:12].float().mean((1, 2)).tolist() == [30, 180, 60]
    run_ok(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out", "--center_crop"))


# ---------------------------------------------------------------------------------------------
# Unreadable images: one policy whether images are decoded once or per batch


PER_BATCH = ("--image_cache_max_gb", "0", "--dataloader_num_workers", "2")


def unreadable_lines(caplog) -> list[str]:
    return sorted(record.getMessage() for record in caplog.records if "unreadable" in record.getMessage())


def test_per_batch_decoding_skips_the_same_images_with_the_same_messages_as_decoding_once(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, capsys, caplog
):
    data = write_imagefolder(tmp_path / "data", count=16)
    (data / "003.png").write_bytes(b"")
    (data / "007.png").write_bytes((data / "008.png").read_bytes()[:40])
    lines, summaries = {}, {}
    for mode, extra in (("cached", ()), ("per_batch", PER_BATCH)):
        caplog.clear()
        flags = ("--max_train_steps", "6", "--random_flip", *extra)
        run_ok(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / mode, *flags))
        lines[mode] = unreadable_lines(caplog)
        summaries[mode] = [line for line in capsys.readouterr().out.splitlines() if "img/s" in line]
    assert lines["cached"] == lines["per_batch"] and len(lines["cached"]) == 2
    for mode in ("cached", "per_batch"):
        (summary,) = summaries[mode]
        assert summary.split(";")[0].endswith("img/s, skipped 2 unreadable images"), mode
    # the same 14 rows in the same order: the same weights
    assert_same_tensors(unet_weights(tmp_path / "cached"), unet_weights(tmp_path / "per_batch"))


def test_mostly_unreadable_data_is_refused_when_decoding_per_batch(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, capsys
):
    data = write_imagefolder(tmp_path / "data", count=8)
    for index in range(6):
        (data / f"{index:03d}.png").write_bytes(b"not a png")
    flags = train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out", *PER_BATCH)
    assert "6 of 8 images could not be read" in run_error(flags, capsys)


# ---------------------------------------------------------------------------------------------
# Data formats


def write_parquet(folder: Path, count: int, size: int) -> int:
    """A parquet dataset of noisy PNGs (they do not compress): returns the encoded bytes."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    generator = np.random.default_rng(0)
    images, texts = [], []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        texts.append(tiny_captions()[index % len(tiny_captions())])
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"image": images, "text": texts}), folder / "train.parquet")
    return sum(len(image["bytes"]) for image in images)


def test_per_batch_decoding_of_parquet_data_does_not_load_the_encoded_images(tmp_path, tiny_text_encoder_dir):
    import tracemalloc

    encoded = write_parquet(tmp_path / "parquet", count=24, size=256)  # ~4.7 MB of encoded images
    flags = ["--dataset_name", str(tmp_path / "parquet"), "--resolution", "16", "--image_cache_max_gb", "0"]
    args = parse_args([*flags, "--text_encoder_name_or_path", str(tiny_text_encoder_dir)])
    config = DataConfig.from_args(args)
    read_image_table(config, None, show_progress=False)  # the first load converts parquet to Arrow
    tracemalloc.start()
    data = read_image_table(config, None, show_progress=False)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held < encoded / 10, f"{held} bytes held for {encoded} encoded bytes"
    assert len(data.captions) == len(tiny_captions()) + 1


def test_metadata_csv_and_list_captions_train(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file):
    data = write_imagefolder(tmp_path / "data", count=8)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").unlink()
    (data / "metadata.csv").write_text("file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows))
    run_ok(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out", "--max_train_steps", "2"))


@pytest.mark.slow
def test_a_save_to_disk_folder_and_a_dataset_config_name_are_read(
    tmp_path, tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file
):
    import datasets

    saved = tmp_path / "saved"
    datasets.load_dataset("imagefolder", data_dir=str(tiny_imagefolder), split="train").save_to_disk(str(saved))
    flags = train_argv(
        tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "a", "--max_train_steps", "2"
    )
    flags[flags.index("--train_data_dir") : flags.index("--train_data_dir") + 2] = ["--dataset_name", str(saved)]
    run_ok(flags)
    # a local dataset with two configurations (README front matter), the second chosen by name
    hub_style = tmp_path / "hub_style"
    for config, count in (("small", 4), ("large", 8)):
        write_imagefolder(hub_style / config, count=count)
    (hub_style / "README.md").write_text(
        "---\nconfigs:\n- config_name: small\n  data_dir: small\n- config_name: large\n  data_dir: large\n---\n"
    )
    cache = ["--cache_dir", str(tmp_path / "cache")]  # paths inside datasets' shared cache outlive a test's folder
    args = parse_args(["--dataset_name", str(hub_style), "--dataset_config_name", "large", *cache])
    assert len(read_image_table(DataConfig.from_args(args), None, False).caption_options) == 8
    args = parse_args(["--dataset_name", str(hub_style), "--dataset_config_name", "small", *cache])
    assert len(read_image_table(DataConfig.from_args(args), None, False).caption_options) == 4


@pytest.mark.parametrize(
    "given",
    [
        ["--validation_prompts", "a red square", "a blue circle"],
        ["--validation_prompts", "a red square", "--validation_prompts", "a blue circle"],
    ],
)
def test_validation_prompts_are_listed_after_one_flag_or_one_flag_each(argv, given):
    assert parse_args(argv(*given)).validation_prompts == ["a red square", "a blue circle"]


def test_validation_prompts_on_the_command_line_replace_the_config_files_list(argv, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("validation_prompts: [a cat, a dog]\n")
    assert parse_args(argv("--config", str(config))).validation_prompts == ["a cat", "a dog"]
    given = argv("--config", str(config), "--validation_prompts", "a red square", "--validation_prompts", "a fox")
    assert parse_args(given).validation_prompts == ["a red square", "a fox"]


def test_validation_prompts_from_a_file_are_the_grids_captions(argv, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a yellow circle\n\n  a green square  \n")
    args = parse_args(argv("--validation_prompts", str(prompts)))
    assert choose_validation_prompts(args.validation_prompts, ["", "x"], 4, 0) == [
        "a yellow circle",
        "a green square",
    ]
    run_ok(argv("--validation_prompts", str(prompts), "--eval_batch_size", "2", "--max_train_steps", "2"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "a yellow circle" in card


# ---------------------------------------------------------------------------------------------
# Flags that change the model, the noise or the memory layout


def test_noise_offset_and_zero_terminal_snr_change_the_noise(tiny_unet_config_file):
    from diffusers import UNet2DConditionModel

    args = parse_args(
        ["--dataset_name", "x", "--rescale_betas_zero_snr", "--ddpm_num_steps", "100", "--ddpm_beta_schedule", "linear"]
    )
    zero_snr = build_noise_scheduler(DiffusionConfig.from_args(args))
    assert zero_snr.alphas_cumprod[-1] < 1e-6 and zero_snr.config.rescale_betas_zero_snr
    plain = build_noise_scheduler(
        DiffusionConfig.from_args(
            parse_args(["--dataset_name", "x", "--ddpm_num_steps", "100", "--ddpm_beta_schedule", "linear"])
        )
    )
    assert plain.alphas_cumprod[-1] > 1e-4
    unet = UNet2DConditionModel.from_config(json.loads(tiny_unet_config_file.read_text()))
    clean, text = torch.zeros(4, 3, 16, 16), torch.randn(4, 5, 64)
    losses = []
    for offset in (0.0, 0.0, 0.5):
        torch.manual_seed(0)
        objective = DiffusionObjective(MinSnrWeighting(0.0), noise_offset=offset)
        losses.append(StepLoss(unet, plain, objective).micro_batch(clean, text).item())
    assert losses[0] == losses[1] != losses[2]


@pytest.mark.parametrize(
    "flag, same_weights",
    [("--gradient_checkpointing", True), ("--ema_offload", True), ("--channels_last", False)],
)
def test_memory_flags_train_the_same_model(argv, tmp_path, flag, same_weights):
    flags = ("--use_ema", "--max_train_steps", "3")
    run_ok(argv(*flags, output=tmp_path / "plain"))
    run_ok(argv(*flags, flag, output=tmp_path / "flagged"))
    plain, flagged = unet_weights(tmp_path / "plain"), unet_weights(tmp_path / "flagged")
    if same_weights:
        assert_same_tensors(plain, flagged)
    else:  # another memory layout sums in another order
        for name in plain:
            assert torch.allclose(plain[name], flagged[name], atol=1e-5), name


def test_memory_flags_reach_the_model(argv):
    args = parse_args(argv("--gradient_checkpointing", "--channels_last", "--use_ema", "--ema_offload"))
    args.output_dir.mkdir(parents=True)
    run = setup_run(RunConfig.from_args(args))
    unet = run.accelerator.unwrap_model(run.trainer.unet)
    assert unet.is_gradient_checkpointing
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(shadow.device.type == "cpu" for shadow in run.trainer.ema.shadow_params)


# ---------------------------------------------------------------------------------------------
# What a run writes


TWO_LEARNING_RATES = ("--train_text_encoder", "--text_encoder_learning_rate", "1e-3")  # logs lr_text_encoder too


def test_metric_names_are_in_the_tensorboard_events(argv, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_ok(argv("--logger", "tensorboard", "--use_ema", "--logging_steps", "1", *TWO_LEARNING_RATES))
    tags = {"scalars": set(), "images": set()}
    for events in (tmp_path / "out" / "logs").rglob("events.out.tfevents.*"):  # hparams get a file of their own
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for kind in tags:
            tags[kind].update(accumulator.Tags()[kind])
    assert {"loss", "lr", "lr_text_encoder", "grad_norm", "ema_decay", "images_per_second"} <= tags["scalars"]
    assert {"train/loss_t000", "train/loss_t090", "memorization/copy_rate"} <= tags["scalars"]  # 100 timesteps
    assert tags["images"] == {"samples", "nearest"}


@pytest.mark.parametrize("logger_name", ["tensorboard", "wandb"])
def test_the_hub_token_is_written_nowhere(argv, tmp_path, monkeypatch, logger_name):
    import huggingface_hub

    class Repo:
        repo_id = "me/shapes"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *args, **kwargs: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda *args, **kwargs: None)
    secret = "hf_SeCrEt0123456789"
    run_ok(argv("--push_to_hub", "--hub_token", secret, "--logger", logger_name, "--max_train_steps", "2"))
    written = [tmp_path / "out"] + ([Path(os.environ["WANDB_DIR"])] if logger_name == "wandb" else [])
    files = [path for folder in written for path in folder.rglob("*") if path.is_file()]
    assert files
    leaks = [str(path) for path in files if secret.encode() in path.read_bytes()]
    assert not leaks
    assert "hub_token" not in public_flags(parse_args(argv("--hub_token", secret)))


def test_leftover_checkpoint_staging_is_removed_and_resume_reuses_the_caption_cache(argv, tmp_path, caplog):
    output = tmp_path / "out"
    run_ok(argv("--max_train_steps", "2"))
    stale = output / ".checkpoint-3.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    caplog.clear()
    run_ok(argv("--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    assert not stale.exists()
    assert "caption embeddings loaded from" in caplog.text
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_sigterm_during_setup_exits_cleanly_with_one_line(argv, tmp_path):
    data = write_imagefolder(tmp_path / "many", count=400, size=64)  # decoding takes a few seconds
    flags = argv("--max_train_steps", "2")
    flags[flags.index("--train_data_dir") + 1] = str(data)
    process = subprocess.Popen(
        [sys.executable, str(Path(trainer.__file__)), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    deadline, seen = time.monotonic() + 60, ""
    while "preparing" not in seen and time.monotonic() < deadline:
        seen += process.stderr.readline()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in seen + stderr
    (line,) = [line for line in (seen + stderr).splitlines() if "SIGTERM" in line]
    assert "before the first step" in line and "nothing was saved" in line
    assert not list_checkpoints(tmp_path / "out")
    shutil.rmtree(data)


def test_streaming_help_says_what_an_epoch_is():
    help_text = " ".join(build_parser().format_help().split())
    assert help_text.count("with --streaming, an epoch is --checkpointing_steps steps") == 2


def test_the_progress_gif_grows_by_appending_each_grid(tmp_path):
    import io

    import numpy as np
    from PIL import Image, ImageSequence

    gif = tmp_path / "progress.gif"
    grids = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), np.uint8)) for seed in range(3)]
    sizes = []
    for grid in grids:
        before = gif.read_bytes()[:-1] if gif.exists() else b""
        append_to_gif(gif, grid)
        assert gif.read_bytes().startswith(before)  # earlier frames are not rewritten
        sizes.append(gif.stat().st_size)
    assert Image.open(gif).n_frames == 3 and Image.open(gif).info["loop"] == 0
    for frame, grid in zip(ImageSequence.Iterator(Image.open(gif)), grids, strict=True):  # one image, advanced
        alone = io.BytesIO()
        grid.save(alone, format="GIF")
        expected = np.asarray(Image.open(alone).convert("RGB"))
        assert np.array_equal(np.asarray(frame.convert("RGB")), expected) and frame.info["duration"] == 500
    append_to_gif(gif, Image.new("RGB", (10, 10)))  # another grid size starts a new GIF
    assert Image.open(gif).n_frames == 1


def test_configs_are_frozen_and_keep_the_token_out_of_their_repr(argv):
    import dataclasses

    config = RunConfig.from_args(parse_args(argv("--hub_token", "hf_SeCrEt0123")))
    assert config.output.hub_token == "hf_SeCrEt0123" and "hf_SeCrEt0123" not in repr(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.learning_rate = 1.0  # type: ignore[misc]


def test_the_default_ema_averages_the_last_twentieth_of_the_steps_up_to_its_ceiling(argv):
    config = RunConfig.from_args(parse_args(argv("--use_ema")))
    model = torch.nn.Linear(2, 2)
    model.config = {}  # build_ema keeps the UNet's config for saving
    ema = build_ema(model, config.optim)
    for step in (600, 1600, 10_000):
        window = 1 / (1 - ema.get_decay(step + 1))  # steps an exponential average effectively spans
        assert window == pytest.approx(step / 20 + 1)
    assert ema.get_decay(10_000_000) == config.optim.ema_max_decay == 0.9999


def test_a_micro_batch_draws_caption_choice_dropout_crop_then_flip_for_the_whole_global_batch():
    shard = Shard(index=1, count=2, size=3)  # the second of two processes
    torch.manual_seed(7)
    draws = draw_batch(shard, dropout_prob=0.5, center_crop=False, random_flip=True)
    torch.manual_seed(7)
    choice, dropped, crop, flip = torch.rand(6), torch.rand(6) < 0.5, torch.rand(6, 2), torch.rand(6) < 0.5
    assert torch.equal(draws.caption_choice, choice[3:]) and torch.equal(draws.dropped, dropped[3:])
    assert torch.equal(draws.crop_at, crop[3:]) and torch.equal(draws.flip, flip[3:])
    after = torch.rand(1)  # the loss draws next: the batch took exactly these numbers
    torch.manual_seed(7)
    torch.rand(6 * 5)
    assert torch.equal(after, torch.rand(1))


def test_flags_doc_is_regenerated_from_the_parser():
    from text_to_image.config import build_parser, flags_markdown

    written = (Path(__file__).parents[1] / "docs" / "flags.md").read_text()
    assert written == flags_markdown(build_parser()), (
        "docs/flags.md is stale: python -m text_to_image.config > docs/flags.md"
    )
