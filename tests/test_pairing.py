"""Every image reaches the loss with its own caption, also when an image cannot be read.

The images are unique (colour, shape) pairs drawn on white, captioned "a {colour} {shape}", so the
pixels that reach the loss say which caption they must come with. One image is corrupted: before
the start (the check skips it), or after the start-up check (as a file replaced mid-run), where a
readable image of its batch stands in for it, and the stand-in must bring its own caption.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import caption_of_pixels, run_ok, train_argv, write_imagefolder
from PIL import Image

import text_to_image.data as data_module
from text_to_image.batches import HostBatches
from text_to_image.config import DataConfig
from text_to_image.data import IndexedBatches, Shard, read_image_table
from text_to_image.evaluation import TrainingReference, ValidationSet

CORRUPTED = "000.png"  # "a red square"
CORRUPTED_CAPTION = "a red square"


@pytest.fixture
def shapes(tmp_path) -> Path:
    return write_imagefolder(tmp_path / "data", count=8)  # 4 colours x 2 shapes, each once


def record_pairs(monkeypatch) -> list[tuple[str, str]]:
    """(the caption the pixels were drawn for, the caption trained with) of every image that reaches the loss."""
    pairs, micro_batch = [], HostBatches.micro_batch

    def recording(self, micro_index):
        pixels, captions, labels = micro_batch(self, micro_index)
        pairs.extend((caption_of_pixels(image), caption) for image, caption in zip(pixels, captions, strict=True))
        return pixels, captions, labels

    monkeypatch.setattr(HostBatches, "micro_batch", recording)
    return pairs


def corrupt_after_the_check(monkeypatch, path: Path) -> None:
    check_images = data_module.check_images

    def check_then_corrupt(*args, **kwargs):
        result = check_images(*args, **kwargs)
        path.write_bytes(b"not a png any more")
        return result

    monkeypatch.setattr(data_module, "check_images", check_then_corrupt)


def test_drawn_images_are_read_back_as_their_captions(shapes):
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    pixels = [torch.from_numpy(np.array(Image.open(shapes / row["file_name"]))).permute(2, 0, 1) for row in rows]
    assert [caption_of_pixels(image) for image in pixels] == [row["text"] for row in rows]
    assert len({row["text"] for row in rows}) == 8


PATHS = {  # flags, corrupted after the start-up check (else before the start), the corrupted image never trains
    "cached, corrupted before the start": ((), False, True),
    "cached, corrupted after the check": ((), True, False),  # the cache kept the image as it was checked
    "per batch": (("--image_cache_max_gb", "0"), True, True),
    "per batch with 2 workers": (("--image_cache_max_gb", "0", "--dataloader_num_workers", "2"), True, True),
    "streamed": (("--streaming", "--shuffle_buffer_size", "8"), False, True),
}


@pytest.mark.parametrize("path", PATHS)
def test_every_trained_image_comes_with_its_own_caption(
    path, shapes, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path, monkeypatch
):
    flags, after_the_check, lost = PATHS[path]
    if after_the_check:
        corrupt_after_the_check(monkeypatch, shapes / CORRUPTED)
    else:
        (shapes / CORRUPTED).write_bytes(b"not a png")
    pairs = record_pairs(monkeypatch)
    argv = train_argv(shapes, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out", *flags)
    run_ok([*argv, "--conditioning_dropout_prob", "0", "--center_crop", "--max_train_steps", "4"])
    assert len(pairs) == 16
    assert [drawn for drawn, trained in pairs if drawn != trained] == []
    # an image that could not be read never trains, nor does its caption (the stand-in brings its own)
    assert (CORRUPTED_CAPTION not in {trained for _, trained in pairs}) == lost


def test_each_of_two_processes_pairs_its_shard_of_a_batch_with_an_unreadable_image(shapes):
    config = DataConfig(train_data_dir=str(shapes), resolution=16, image_cache_max_gb=0)
    table = read_image_table(config, None, show_progress=False)
    (shapes / CORRUPTED).write_bytes(b"not a png any more")
    stood_in = 0
    for index in range(2):
        batches = IndexedBatches(
            table, seed=0, shard=Shard(index=index, count=2, size=2), batches_per_epoch=2, num_workers=0
        )
        for micro_index in range(4):
            examples = batches.examples(micro_index)
            for image, options in zip(examples.images, examples.caption_options, strict=True):
                assert caption_of_pixels(image) == options[0]
                assert options[0] != CORRUPTED_CAPTION
        stood_in += batches.skipped
    assert stood_in == 2  # two epochs: the corrupted row came up once in each, on one of the processes


def test_held_out_and_reference_images_keep_their_captions_when_one_turns_unreadable(shapes):
    config = DataConfig(train_data_dir=str(shapes), resolution=16, image_cache_max_gb=0)
    table = read_image_table(config, None, show_progress=False)
    (shapes / CORRUPTED).write_bytes(b"not a png any more")
    validation = ValidationSet.from_table(table, [0, 1, 2, 3], resolution=16)
    reference = TrainingReference.from_table(table, resolution=16)
    for pixels, captions in ((validation.pixels, validation.captions), (reference.images, reference.captions)):
        assert len(captions) == len(pixels)
        assert [caption_of_pixels(image) for image in pixels] == captions
        assert CORRUPTED_CAPTION not in captions
