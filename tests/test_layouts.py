"""Dataset layouts other trainers use, read through the real loading path: a folder of images with a
.txt caption beside each (kohya-ss sd-scripts, SimpleTuner, OneTrainer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    COLOURS,
    SHAPES,
    assert_same_tensors,
    draw_shape,
    resume_from_the_checkpoint_before,
    run_error,
    run_ok,
    train_argv,
)
from safetensors.torch import load_file

from text_to_image.common import UserError
from text_to_image.config import DataConfig
from text_to_image.data import read_image_table


def write_caption_folder(folder: Path, uncaptioned: int = 0) -> Path:
    """8 shapes in two nested folders, each PNG with its caption in a .txt of the same name; the last
    `uncaptioned` have none."""
    captions = [f"a {colour} {shape}" for shape in SHAPES for colour in COLOURS]
    for index, caption in enumerate(captions):
        image = folder / ("squares" if "square" in caption else "circles") / f"{index:03d}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        draw_shape(caption.split()[1], caption.split()[2], 16).save(image)
        if index < len(captions) - uncaptioned:
            image.with_suffix(".txt").write_text(f"{caption}\n", encoding="utf-8")
    return folder


def table_of(folder: Path, **flags):
    return read_image_table(DataConfig(train_data_dir=str(folder), resolution=16, **flags), None, show_progress=False)


def test_txt_captions_beside_nested_images_are_read_in_a_fixed_order(tmp_path):
    table = table_of(write_caption_folder(tmp_path / "data", uncaptioned=1))
    sources = [Path(table.decoder.source(row)["path"]) for row in range(8)]
    assert [path.relative_to(tmp_path / "data").as_posix() for path in sources] == [
        *(f"circles/{index:03d}.png" for index in range(4, 8)),
        *(f"squares/{index:03d}.png" for index in range(4)),
    ]
    assert [options[0] for options in table.caption_options] == [
        "a red circle", "a green circle", "a blue circle", "",  # the last image has no .txt: the empty caption
        "a red square", "a green square", "a blue square", "a yellow square",
    ]  # fmt: skip
    assert len(table.usable_rows) == 8


def test_a_txt_captioned_folder_trains_resumes_exactly_and_caches_its_captions(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, caplog
):
    data = write_caption_folder(tmp_path / "data", uncaptioned=1)

    def argv(*extra, output):
        return train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, output, *extra)

    flags = ("--max_train_steps", "6", "--checkpointing_steps", "3", "--random_flip")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with caplog.at_level("INFO"):
        run_ok(argv(*flags, output=straight))
    assert "8 images (0 skipped, 1 without a caption), 8 captions" in caplog.text  # 7 written and ""
    assert "1 of 8 images in" in caplog.text and "have no .txt caption beside them" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        resume_from_the_checkpoint_before(argv, flags, straight, 6, resumed)
    assert "caption embeddings loaded from" in caplog.text
    assert_same_tensors(
        load_file(straight / "checkpoint-6" / "model.safetensors"),
        load_file(resumed / "checkpoint-6" / "model.safetensors"),
    )


def test_a_txt_captioned_folder_streams(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file):
    data = write_caption_folder(tmp_path / "data")
    argv = train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out", "--streaming")
    run_ok([*argv, "--shuffle_buffer_size", "8", "--max_train_steps", "2"])
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_a_caption_file_that_is_not_utf8_is_named(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, capsys):
    data = write_caption_folder(tmp_path / "data")
    (data / "squares" / "002.txt").write_bytes("a blue square, caf\xe9".encode("latin-1"))
    error = run_error(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out"), capsys)
    assert f"error: {data / 'squares' / '002.txt'} is not UTF-8 text" in error and "save it as UTF-8" in error


def test_metadata_wins_over_txt_captions_and_says_so(tmp_path, caplog):
    data = write_caption_folder(tmp_path / "data")
    rows = [{"file_name": f"squares/{index:03d}.png", "text": f"square number {index}"} for index in range(4)]
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level("INFO"):
        table = table_of(data)
    assert [options[0] for options in table.caption_options] == [f"square number {index}" for index in range(4)]
    assert caplog.text.count("metadata.jsonl gives the captions; the .txt files beside the images are not read") == 1


@pytest.mark.parametrize("with_images", [True, False])
def test_a_folder_without_metadata_or_txt_captions_is_refused(tmp_path, with_images):
    data = write_caption_folder(tmp_path / "data", uncaptioned=8)
    if not with_images:
        for image in data.rglob("*.png"):
            image.unlink()
    with pytest.raises(UserError, match="no metadata.jsonl or metadata.csv and no image with a .txt caption"):
        table_of(data)
