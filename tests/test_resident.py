"""--data_on_device: the images and caption embeddings held on the device, each batch drawn and gathered there
(text_to_image/resident.py). On the CPU the device's generator is the host's, so the path must train the host
path's batches bit for bit; it resumes exactly, splits over processes like the host path, and says in one line
why it cannot run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import draw_shape, run_error, train_argv
from test_captured import set_up

from text_to_image.batches import HostBatches
from text_to_image.common import UserError
from text_to_image.data import IndexedBatches, Shard
from text_to_image.resident import ResidentBatches, choose_on_device

SIDED = ["a red square on the left", "a blue circle on the right", "a green square", "a yellow circle"]


def write_sided_imagefolder(folder, count: int = 16, size: int = 16):
    """Shapes whose captions say left or right, some with two caption options."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        colour, shape = SIDED[index % 4].split()[1:3]
        draw_shape(colour, shape, size).save(folder / f"{index:03d}.png")
        text = [SIDED[index % 4], f"a {colour} {shape}"] if index % 3 == 0 else [SIDED[index % 4]]
        rows.append({"file_name": f"{index:03d}.png", "text": text})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture
def argv(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file):
    data = write_sided_imagefolder(tmp_path / "sided")

    def make(*extra: str, output: str = "out") -> list[str]:
        return train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / output, *extra)

    return make


def batches_and_weights(run, micro_batches: int, steps: int) -> tuple[list, dict]:
    """The first micro-batches (pixels, caption embeddings, labels), then the UNet's weights after `steps` steps."""
    trainer = run.trainer
    batches = []
    for index in range(micro_batches):
        pixels, captions, labels = trainer.batches.micro_batch(index)
        batches.append((pixels, trainer.conditioner.embed(captions), labels))
    for step in range(steps):
        trainer.step(step)
    return batches, {name: weight.detach().clone() for name, weight in trainer.unet.named_parameters()}


@pytest.mark.parametrize(
    "flags",
    [
        (),
        ("--random_flip", "--augment_prob", "0.5", "--alpha_background", "random", "--conditioning_dropout_prob", "0.3",
         "--caption_shuffle_separator", " ", "--caption_tag_dropout", "0.2", "--gradient_accumulation_steps", "2"),
        ("--random_flip", "--flip_sided_captions", "no_flip", "--channels_last"),
        ("--random_flip", "--prediction_type", "flow_matching", "--timestep_sampling", "logit_normal",
         "--timestep_shift", "3", "--noise_offset", "0.05"),
    ],
    ids=["defaults", "flips-augmentation-background-variants-accumulation", "no_flip", "flow_matching"],
)  # fmt: skip
@pytest.mark.slow
def test_on_the_cpu_the_device_path_trains_the_host_paths_batches_bit_for_bit(argv, flags):
    host = set_up(argv(*flags, "--data_on_device", "no", output="host"))
    assert isinstance(host.trainer.batches, HostBatches)
    host_batches, host_weights = batches_and_weights(host, micro_batches=6, steps=3)

    resident = set_up(argv(*flags, "--data_on_device", "yes", output="resident"))
    assert isinstance(resident.trainer.batches, ResidentBatches)
    assert resident.state.data_on_device is True and host.state.data_on_device is False
    resident_batches, resident_weights = batches_and_weights(resident, micro_batches=6, steps=3)

    for (pixels, text, labels), (expected_pixels, expected_text, expected_labels) in zip(
        resident_batches, host_batches, strict=True
    ):
        assert torch.equal(pixels, expected_pixels)
        assert torch.equal(text, expected_text)
        assert (labels is None and expected_labels is None) or torch.equal(labels, expected_labels)
    for name, weight in host_weights.items():
        assert torch.equal(resident_weights[name], weight), name
    moved = host_weights["conv_in.weight"] - set_up(argv(*flags, output="fresh")).trainer.unet.conv_in.weight
    assert moved.abs().max() > 0  # the weights did train


def test_mirrored_sided_captions_swap_their_words_on_the_device(argv):
    run = set_up(argv("--random_flip", "--conditioning_dropout_prob", "0", "--data_on_device", "yes"))
    resident, row_of = run.trainer.batches, run.trainer.conditioner.row_of
    text_at = {row: text for text, row in row_of.items()}
    rows = torch.tensor([0, 1, 2, 3])  # "left" (or no side), "right", and two that say neither
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        seen.update(text_at[row] for row in resident.gathered(rows)[1].tolist())
    assert {"a red square on the right", "a blue circle on the left"} <= seen  # swapped where flipped
    assert {"a red square on the left", "a blue circle on the right"} <= seen  # and kept where not


def test_processes_draw_their_shares_of_the_one_process_batch_on_the_device(argv):
    run = set_up(argv("--random_flip", "--augment_prob", "0.5", "--data_on_device", "yes"))
    whole = run.trainer.batches

    def share(index: int, count: int) -> ResidentBatches:
        batches = IndexedBatches(
            whole.source.table,
            seed=run.state.seed,
            shard=Shard(index, count, 4 // count),
            batches_per_epoch=whole.source.batches_per_epoch,
            num_workers=0,
        )
        return ResidentBatches(
            images=whole.images, captions=whole.captions, source=batches, data=whole.data, dropout_prob=0.1
        )

    torch.manual_seed(7)
    one = whole.micro_batch(3)
    parts = []
    for index in range(2):
        torch.manual_seed(7)  # every process seeds its generator alike and draws the whole global batch
        parts.append(share(index, 2).micro_batch(3))
    for position in range(3):
        assert torch.equal(torch.cat([part[position] for part in parts]), one[position])


def test_device_path_resumes_exactly(argv, tmp_path):
    from conftest import assert_same_tensors, resume_from_the_checkpoint_before, run_ok
    from safetensors.torch import load_file

    def make(*extra, output):
        return argv("--data_on_device", "yes", "--random_flip", "--augment_prob", "0.5", *extra, output=output)

    flags = ("--max_train_steps", "6", "--checkpointing_steps", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(make(*flags, output=straight))
    resume_from_the_checkpoint_before(make, flags, straight, 6, resumed)
    assert json.loads((resumed / "checkpoint-6" / "train_state.json").read_text())["data_on_device"] is True
    assert_same_tensors(
        load_file(straight / "checkpoint-6" / "model.safetensors"),
        load_file(resumed / "checkpoint-6" / "model.safetensors"),
    )


def write_wide_imagefolder(folder, sizes: list[tuple[int, int]]):
    folder.mkdir()
    rows = []
    for index, size in enumerate(sizes):
        colour, shape = SIDED[index % 4].split()[1:3]
        draw_shape(colour, shape, 32).resize(size).save(folder / f"{index:03d}.png")
        rows.append({"file_name": f"{index:03d}.png", "text": f"a {colour} {shape}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_same_size_wide_images_are_cropped_on_the_device_as_on_the_host(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file
):
    wide = write_wide_imagefolder(tmp_path / "wide", [(32, 16)] * 8)
    runs = {}
    for choice in ("no", "yes"):
        flags = train_argv(wide, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / choice)
        runs[choice] = set_up([*flags, "--random_flip", "--data_on_device", choice])
        runs[choice] = [runs[choice].trainer.batches.micro_batch(index)[0] for index in range(4)]  # random crops
    assert runs["yes"][0].shape == (4, 3, 16, 16)
    for host, resident in zip(runs["no"], runs["yes"], strict=True):
        assert torch.equal(resident, host)


def test_data_on_device_yes_says_why_it_cannot(argv, tmp_path, capsys, tiny_text_encoder_dir, tiny_unet_config_file):
    mixed = write_wide_imagefolder(tmp_path / "mixed", [(32, 16), (16, 16)])
    not_square = train_argv(mixed, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "mixed-out")
    not_square[not_square.index("--train_batch_size") + 1] = "2"
    error = run_error([*not_square, "--data_on_device", "yes"], capsys)
    assert (
        "--data_on_device yes, but the images differ in size at --resolution 16 (row 0: 32x16 px, row 1: 16x16 px;"
        " pass --center_crop)" in error
    )
    assert [line for line in error.splitlines() if "data_on_device" in line] == [error.strip().splitlines()[-1]]

    error = run_error(argv("--data_on_device", "yes", "--no_caption_cache", output="live"), capsys)
    assert (
        "--data_on_device yes, but the captions are encoded per batch (--train_text_encoder or --no_caption_cache)"
        in error
    )
    error = run_error(argv("--data_on_device", "yes", "--image_cache_max_gb", "0", output="per-batch"), capsys)
    assert "--data_on_device yes, but the images are decoded per batch" in error


def test_auto_keeps_the_host_path_on_the_cpu_and_a_resumed_runs_path(caplog):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_on_device("auto", None, None, cpu) is False
    assert choose_on_device("auto", None, None, gpu) is True
    assert choose_on_device("auto", None, "the images are decoded per batch (raise it)", gpu) is False
    assert choose_on_device("no", None, None, gpu) is False
    assert choose_on_device("yes", None, None, cpu) is True
    with caplog.at_level("INFO"):
        assert choose_on_device("auto", False, None, gpu) is False  # resumed: drew on the host, keeps doing so
        assert choose_on_device("auto", True, "some reason", gpu) is False
    assert "as the run being resumed drew them" in caplog.text
    assert "the batches from here on differ from the interrupted run's" in caplog.text
    with pytest.raises(UserError, match="--data_on_device yes, but some reason; or pass --data_on_device no"):
        choose_on_device("yes", None, "some reason", gpu)


def test_auto_takes_the_data_to_the_gpu_only_within_a_quarter_of_its_free_memory(monkeypatch):
    from text_to_image.resident import too_big_for

    free = 4 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))  # no GPU here
    gpu = torch.device("cuda")
    assert too_big_for(gpu, free // 4) is None
    assert too_big_for(gpu, free // 4 + 2**20) == (
        "the images and caption embeddings need 1.00 GiB, more than 25% of the GPU's free 4.0 GiB"
    )
    assert too_big_for(torch.device("cpu"), 10 * free) is None
