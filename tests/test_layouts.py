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
from text_to_image.data import IndexedBatches, Shard, open_stream, read_image_table


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


# ---------------------------------------------------------------------------------------------
# Shards as people have them: each form the README promises through either flag, damaged shards, samples
# missing a file, dotted names, Windows captions

SHAPE_CAPTIONS = [f"a {colour} {shape}" for shape in SHAPES for colour in COLOURS]


def sample_files(index: int, key: str | None = None) -> list[tuple[str, bytes]]:
    """Sample `index` of the 8 shapes as a WebDataset sample: KEY.png and KEY.txt."""
    encoded = io.BytesIO()
    colour, shape = SHAPE_CAPTIONS[index].split()[1:]
    draw_shape(colour, shape, 16).save(encoded, format="PNG")
    key = key or f"sample{index:04d}"
    return [(f"{key}.png", encoded.getvalue()), (f"{key}.txt", SHAPE_CAPTIONS[index].encode())]


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in files:
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return path


def write_two_shards(folder: Path, edit=lambda files: files) -> Path:
    """The 8 shapes in train-000.tar and train-001.tar, 4 samples each; `edit` changes a shard's file list."""
    for shard in range(2):
        files = [file for index in range(shard * 4, shard * 4 + 4) for file in sample_files(index)]
        write_tar(folder / f"train-{shard:03d}.tar", edit(files))
    return folder


def read_pairs(config: DataConfig) -> list[tuple[str, str]]:
    """(caption, the caption its pixels were drawn for) of each sample: in the order read, sorted for a stream
    (one pass of it: the config's batch is the dataset's size)."""
    if config.streaming:
        examples = open_stream(config, 0, 1, seed=0, start_micro_index=0).examples(0)
        pairs = zip(examples.caption_options, examples.images, strict=True)
        return sorted((options[0], caption_of_pixels(image)) for options, image in pairs)
    table = read_image_table(config, None, show_progress=False)
    return [(table.caption_options[row][0], caption_of_pixels(table.cache[row])) for row in table.usable_rows.tolist()]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("flag", ["dataset_name", "train_data_dir"])
@pytest.mark.parametrize("form", ["one shard", "a quoted glob", "a folder"])
def test_each_shard_form_the_readme_promises_is_read_through_either_flag(tmp_path, form, flag, streaming):
    shards = write_two_shards(tmp_path / "shards")
    name, count = {
        "one shard": (shards / "train-000.tar", 4),
        "a quoted glob": (shards / "train-*.tar", 8),
        "a folder": (shards, 8),
    }[form]
    config = DataConfig(**{flag: str(name)}, resolution=16, streaming=streaming, train_batch_size=count)
    expected = [(caption, caption) for caption in SHAPE_CAPTIONS[:count]]
    assert read_pairs(config) == (sorted(expected) if streaming else expected)


def test_one_shard_given_as_train_data_dir_trains(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, caplog):
    shards = write_two_shards(tmp_path / "shards")
    argv = train_argv(shards / "train-000.tar", tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out")
    with caplog.at_level("INFO"):
        run_ok([*argv, "--max_train_steps", "2"])
    assert "4 images (0 skipped), 5 captions" in caplog.text
    assert (tmp_path / "out" / "model_index.json").is_file()


def cut_at(shard: Path, offset) -> None:
    """`shard` cut short at `offset(members)`, members being its tar members in order."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    shard.write_bytes(shard.read_bytes()[: offset(members)])


@pytest.mark.parametrize(
    "offset, words",
    [
        (lambda members: members[2].offset_data + 10, "is cut short inside sample0005.png"),
        (lambda members: members[4].offset + 100, "is cut short inside the tar header after sample0005.txt"),
        (lambda members: members[4].offset, "ends after sample0005.txt without the end-of-archive marker"),
        (lambda members: 0, "is not a readable .tar file (empty file)"),
    ],
    ids=["inside a member", "inside a header", "between samples", "to nothing"],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_a_shard_cut_short_anywhere_is_named_in_one_line(tmp_path, offset, words, streaming):
    shards = write_two_shards(tmp_path / "shards")
    cut_at(shards / "train-001.tar", offset)
    config = DataConfig(dataset_name=str(shards), resolution=16, streaming=streaming, train_batch_size=8)
    with pytest.raises(UserError) as error:
        read_pairs(config)
    assert str(error.value).startswith(f"--dataset_name {shards}: {shards / 'train-001.tar'} {words}")
    assert str(error.value).endswith("download or write it again, or remove it") or "empty" in words


@pytest.mark.parametrize("streaming", [False, True])
def test_samples_missing_their_caption_or_image_are_counted_and_named(tmp_path, streaming, caplog):
    def drop(files):
        return [(name, payload) for name, payload in files if name not in ("sample0001.txt", "sample0006.png")]

    shards = write_two_shards(tmp_path / "shards", drop)
    config = DataConfig(dataset_name=str(shards), resolution=16, streaming=streaming, train_batch_size=8)
    with caplog.at_level("INFO"):
        pairs = read_pairs(config)
    assert ("", SHAPE_CAPTIONS[1]) in pairs  # its image trains with the empty caption
    assert (SHAPE_CAPTIONS[6], SHAPE_CAPTIONS[6]) not in pairs  # it has no image: skipped, or stood in for
    missing = f"skipping unreadable image {shards / 'train-001.tar'}/sample0006: the WebDataset sample has no image"
    assert missing in caplog.text
    if not streaming:
        table = read_image_table(config, None, show_progress=False)
        batches = IndexedBatches(table, seed=0, shard=Shard(size=4), batches_per_epoch=1, num_workers=0)
        assert batches.describe() == "7 images (1 skipped, 1 without a caption), 8 captions"


@pytest.mark.parametrize("streaming", [False, True])
def test_dotted_names_keep_a_sample_together_by_the_webdataset_key_rule(tmp_path, streaming):
    """WebDataset's key ends at a name's first dot: shape0.v2.png + shape0.v2.txt are sample shape0's v2.png and
    v2.txt, its image and its caption (as datasets' webdataset builder and the webdataset library read them)."""

    def dotted(files):
        return [(name.replace("sample", "shape").replace(".", ".v2.", 1), payload) for name, payload in files]

    shards = write_two_shards(tmp_path / "shards", dotted)
    config = DataConfig(dataset_name=str(shards), resolution=16, streaming=streaming, train_batch_size=8)
    expected = [(caption, caption) for caption in SHAPE_CAPTIONS]
    assert read_pairs(config) == (sorted(expected) if streaming else expected)


@pytest.mark.parametrize("streaming", [False, True])
def test_dotted_names_that_share_a_key_are_refused_with_the_fix(tmp_path, streaming):
    def shared_key(files):  # img.0000.png, img.0000.txt, img.0001.png, ...: all of key "img"
        return [(f"img.{name.removeprefix('sample')}", payload) for name, payload in files]

    shards = write_two_shards(tmp_path / "shards", shared_key)
    config = DataConfig(dataset_name=str(shards), resolution=16, streaming=streaming, train_batch_size=8)
    with pytest.raises(UserError) as error:
        read_pairs(config)
    assert str(error.value) == (
        f"--dataset_name {shards}: {shards / 'train-000.tar'}: sample img holds 4 images (img.0000.png,"
        " img.0001.png, ...): a WebDataset key ends at the first dot of a file name; rename the files so that"
        " each sample's key differs before its first dot (img_0000.png + img_0000.txt), or pass --image_column"
        " with the one image to train on (--image_column 0000.png)"
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_a_shard_whose_samples_are_not_kept_together_is_refused_with_the_fix(tmp_path, streaming):
    def images_then_captions(files):  # tar cf train.tar *.png *.txt
        return sorted(files, key=lambda file: file[0].endswith(".txt"))

    shards = write_two_shards(tmp_path / "shards", images_then_captions)
    config = DataConfig(dataset_name=str(shards), resolution=16, streaming=streaming, train_batch_size=8)
    with pytest.raises(UserError) as error:
        read_pairs(config)
    assert str(error.value) == (
        f"--dataset_name {shards}: {shards / 'train-000.tar'}: the files of sample sample0000 are not next to each"
        " other (sample0000.txt comes after other samples' files); a WebDataset shard keeps each sample's files"
        " together: write it again with its files sorted by name (tar --sort=name)"
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_shard_captions_saved_by_a_windows_editor_are_read_clean(tmp_path, streaming):
    def windows(files):
        return [
            (name, b"\xef\xbb\xbf" + payload + b"\r\n" if name.endswith(".txt") else payload) for name, payload in files
        ]

    shards = write_two_shards(tmp_path / "shards", windows)
    config = DataConfig(dataset_name=str(shards), resolution=16, streaming=streaming, train_batch_size=8)
    expected = [(caption, caption) for caption in SHAPE_CAPTIONS]
    assert read_pairs(config) == (sorted(expected) if streaming else expected)


def test_a_shard_caption_that_is_not_utf8_is_named(tmp_path):
    def latin1(files):
        return [(name, "a café".encode("latin-1") if name == "sample0002.txt" else payload) for name, payload in files]

    shards = write_two_shards(tmp_path / "shards", latin1)
    with pytest.raises(UserError) as error:
        read_pairs(DataConfig(dataset_name=str(shards), resolution=16))
    assert str(error.value) == (
        f"--dataset_name {shards}: {shards / 'train-000.tar'}: sample0002.txt is not UTF-8 text (unexpected"
        " end of data at byte 5); save it as UTF-8"
    )
