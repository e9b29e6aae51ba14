"""Dataset layouts other trainers use, read through the real loading path: a folder of images with a
.txt caption beside each (kohya-ss sd-scripts, SimpleTuner, OneTrainer), class folders, WebDataset shards."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from conftest import (
    COLOURS,
    SHAPES,
    assert_same_tensors,
    caption_of_pixels,
    draw_shape,
    resume_from_the_checkpoint_before,
    run_error,
    run_ok,
    train_argv,
)
from safetensors.torch import load_file

from text_to_image.common import UserError
from text_to_image.config import DataConfig
from text_to_image.data import open_stream, read_image_table


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


def write_class_folders(folder: Path, unclassed: int = 0) -> Path:
    """8 shapes, each in a class folder named for it (blue_square/0.png, ...), and `unclassed` more at the root."""
    for index, (shape, colour) in enumerate((shape, colour) for shape in SHAPES for colour in COLOURS):
        image = folder / f"{colour}_{shape}" / f"{index}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        draw_shape(colour, shape, 16).save(image)
    for index in range(unclassed):
        draw_shape("red", "circle", 16).save(folder / f"root{index}.png")
    return folder


def test_class_folders_caption_each_image_with_its_folder_name_through_the_template(tmp_path, caplog):
    data = write_class_folders(tmp_path / "data", unclassed=1)
    with caplog.at_level("INFO"):
        table = table_of(data, caption_template="a pixel-art {}")
    captions = {
        Path(table.decoder.source(row)["path"]).relative_to(data).as_posix(): options[0]
        for row, options in enumerate(table.caption_options)
    }
    assert captions == {
        **{
            f"{colour}_{shape}/{index}.png": f"a pixel-art {colour} {shape}"
            for index, (shape, colour) in enumerate((shape, colour) for shape in SHAPES for colour in COLOURS)
        },
        "root0.png": "",  # outside any class folder: the empty caption
    }
    assert "8 class folders, captioned from the folder name as 'a pixel-art {}': blue circle (1)," in caplog.text
    assert "1 of 9 images sit directly in" in caplog.text and "outside any class folder" in caplog.text


def test_class_folders_list_ten_classes_and_count_the_rest(tmp_path, caplog):
    for index in range(12):
        (tmp_path / "data" / f"class_{index:02d}").mkdir(parents=True)
        draw_shape("red", "circle", 16).save(tmp_path / "data" / f"class_{index:02d}" / "0.png")
    with caplog.at_level("INFO"):
        table_of(tmp_path / "data")
    assert "12 class folders, captioned from the folder name as '{}': class 00 (1)," in caplog.text
    assert "class 09 (1) and 2 more" in caplog.text


def test_class_folders_train_resume_exactly_and_cache_their_captions(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, caplog
):
    data = write_class_folders(tmp_path / "data")

    def argv(*extra, output):
        return train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, output, *extra)

    flags = ("--max_train_steps", "6", "--checkpointing_steps", "3", "--caption_template", "a {} sprite")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with caplog.at_level("INFO"):
        run_ok(argv(*flags, output=straight))
    assert "8 images (0 skipped), 9 captions" in caplog.text  # 8 classes and "" (caption dropout)
    caplog.clear()
    with caplog.at_level("INFO"):
        resume_from_the_checkpoint_before(argv, flags, straight, 6, resumed)
    assert "caption embeddings loaded from" in caplog.text
    assert_same_tensors(
        load_file(straight / "checkpoint-6" / "model.safetensors"),
        load_file(resumed / "checkpoint-6" / "model.safetensors"),
    )
    card = (straight / "README.md").read_text()  # its usage example samples the first prompt, a class caption
    assert re.search(r'pipe\("a (red|green|blue|yellow) (circle|square) sprite"', card)


def test_a_caption_template_without_a_slot_is_refused(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, capsys):
    data = write_class_folders(tmp_path / "data")
    argv = train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out")
    error = run_error([*argv, "--caption_template", "a pixel-art sprite"], capsys)
    assert "error: --caption_template 'a pixel-art sprite' has no {} for the folder name" in error


def test_a_caption_template_is_not_used_when_txt_captions_give_the_captions(tmp_path, caplog):
    data = write_caption_folder(tmp_path / "data")
    with caplog.at_level("INFO"):
        table = table_of(data, caption_template="a pixel-art {}")
    assert table.caption_options[0] == ["a red circle"]
    assert "--caption_template 'a pixel-art {}' is not used: it captions class folders" in caplog.text


@pytest.mark.parametrize("with_images", [True, False])
def test_a_folder_without_metadata_txt_captions_or_class_folders_is_refused(tmp_path, with_images):
    data = tmp_path / "data"
    data.mkdir()
    if with_images:
        draw_shape("red", "circle", 16).save(data / "0.png")
    (data / "empty_class").mkdir()
    with pytest.raises(UserError, match="no metadata.jsonl or metadata.csv, no image with a .txt caption beside it"):
        table_of(data)


def write_shards(folder: Path, caption: str = "txt", image: str = "png") -> Path:
    """The 8 shapes in two WebDataset shards, 4 samples each: KEY.png + KEY.txt, or KEY.webp + KEY.json (lossless, so the pixels read back)."""
    folder.mkdir(parents=True)
    shapes = [(colour, shape) for shape in SHAPES for colour in COLOURS]
    for shard in range(2):
        with tarfile.open(folder / f"train-{shard:03d}.tar", "w") as tar:
            for index in range(shard * 4, shard * 4 + 4):
                colour, shape = shapes[index]
                encoded = io.BytesIO()
                draw_shape(colour, shape, 16).save(encoded, format=image.upper(), lossless=True)
                text = f"a {colour} {shape}"
                files = {image: encoded.getvalue()}
                if caption == "txt":
                    files["txt"] = text.encode()
                elif caption == "json":
                    files["json"] = json.dumps({"caption": text, "id": index}).encode()
                for extension, payload in files.items():
                    member = tarfile.TarInfo(f"sample{index:04d}.{extension}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    return folder


def shards_argv(dataset_name: str, tmp_path: Path, encoder: Path, unet: Path, output: Path, *extra: str) -> list[str]:
    argv = train_argv(tmp_path, encoder, unet, output, *extra)
    at = argv.index("--train_data_dir")
    return [*argv[:at], "--dataset_name", dataset_name, *argv[at + 2 :]]


def test_shards_with_txt_or_json_captions_are_read_in_a_fixed_order(tmp_path, caplog):
    expected = [f"a {colour} {shape}" for shape in SHAPES for colour in COLOURS]
    for caption, image in (("txt", "png"), ("json", "webp")):
        shards = write_shards(tmp_path / caption, caption, image)
        for name in (str(shards / "train-*.tar"), str(shards)):
            with caplog.at_level("INFO"):
                table = read_image_table(DataConfig(dataset_name=name, resolution=16), None, show_progress=False)
            assert [options[0] for options in table.caption_options] == expected
            assert [caption_of_pixels(image) for image in table.cache] == expected  # each image with its caption
            assert f"--dataset_name {name}: 2 WebDataset shards" in caplog.text
    one = read_image_table(
        DataConfig(train_data_dir=str(tmp_path / "txt"), resolution=16), None, show_progress=False
    )  # a folder of shards given as --train_data_dir
    assert [options[0] for options in one.caption_options] == expected


def test_shards_train_resume_exactly_and_cache_their_captions(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, caplog
):
    shards = write_shards(tmp_path / "shards")

    def argv(*extra, output):
        name = str(shards / "train-*.tar")
        return shards_argv(name, tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, output, *extra)

    flags = ("--max_train_steps", "6", "--checkpointing_steps", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with caplog.at_level("INFO"):
        run_ok(argv(*flags, output=straight))
    assert "8 images (0 skipped), 9 captions" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        resume_from_the_checkpoint_before(argv, flags, straight, 6, resumed)
    assert "caption embeddings loaded from" in caplog.text
    assert_same_tensors(
        load_file(straight / "checkpoint-6" / "model.safetensors"),
        load_file(resumed / "checkpoint-6" / "model.safetensors"),
    )


@pytest.mark.parametrize("caption", ["txt", "json"])
def test_shards_stream(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, caption):
    shards = write_shards(tmp_path / "shards", caption)
    argv = shards_argv(
        str(shards / "train-*.tar"), tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out"
    )
    run_ok([*argv, "--streaming", "--shuffle_buffer_size", "8", "--max_train_steps", "2"])
    card = (tmp_path / "out" / "README.md").read_text()  # the first prompt is a streamed caption
    assert re.search(r'pipe\("a (red|green|blue|yellow) (circle|square)"', card)


@pytest.mark.parametrize(
    "broken, error",
    [
        ("no_caption", "the shards' samples hold no caption (.png); give each a .txt, or a .json"),
        ("no_image", "the shards' samples hold no image (.txt); each needs a .png, .jpg or .webp"),
        ("not_a_tar", "train-001.tar is not a readable .tar file (invalid header); rewrite or remove it"),
        ("no_match", "no .tar shard there; give a shard, a glob in quotes"),
        ("json_without_caption_key", "the shards' samples hold no caption (.png, .json; .json keys: id)"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_broken_shards_are_named_in_one_line(tmp_path, broken, error, streaming):
    caption = {"no_caption": "none", "json_without_caption_key": "json"}.get(broken, "txt")
    shards = write_shards(tmp_path / "shards", caption)
    name = str(shards / "train-*.tar")
    if broken == "no_image":
        for shard in shards.glob("*.tar"):
            with tarfile.open(shard) as tar:
                texts = [(member, tar.extractfile(member).read()) for member in tar if member.name.endswith(".txt")]
            with tarfile.open(shard, "w") as tar:
                for member, payload in texts:
                    tar.addfile(member, io.BytesIO(payload))
    elif broken == "not_a_tar":
        (shards / "train-001.tar").write_bytes(b"not a tar" * 100)
    elif broken == "no_match":
        name = str(shards / "valid-*.tar")
    elif broken == "json_without_caption_key":
        for shard in shards.glob("*.tar"):
            with tarfile.open(shard) as tar:
                members = [(member, tar.extractfile(member).read()) for member in tar]
            with tarfile.open(shard, "w") as tar:
                for member, payload in members:
                    payload = json.dumps({"id": 1}).encode() if member.name.endswith(".json") else payload
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(UserError, match=re.escape(error)):
        if streaming:  # the stream reads its shards later, but it is opened here
            open_stream(DataConfig(dataset_name=name, resolution=16, streaming=True), 0, 1, seed=0, start_micro_index=0)
        else:
            read_image_table(DataConfig(dataset_name=name, resolution=16), None, show_progress=False)
