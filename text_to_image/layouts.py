"""Where the captioned images come from: the dataset layouts people already have, each read into one
table of images and captions (or a stream of them) for data.py.

- an imagefolder: images + metadata.jsonl or metadata.csv;
- a .txt caption beside each image (kohya-ss sd-scripts, SimpleTuner, OneTrainer);
- class folders: an image's caption is the name of its folder, through --caption_template;
- Hub datasets and local folders load_dataset understands, save_to_disk folders;
- WebDataset .tar shards: a file, a glob or a folder of them, each sample an image with a .txt or a .json."""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from text_to_image.common import UserError, exists
from text_to_image.config import DEFAULT_CAPTION_TEMPLATE, DataConfig

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # as image files
CLASSES_LISTED = 10  # class folders named in the log line; the rest are counted
JSON_CAPTION_KEYS = ("caption", "text")  # a shard's .json caption, when --caption_column is not one of its keys


def resolve_split(dataset, name: str):
    from datasets import DatasetDict, IterableDatasetDict

    if not isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        return dataset
    if "train" in dataset:
        return dataset["train"]
    split = next(iter(dataset))
    logger.info("%s has no 'train' split; using '%s'", name, split)
    return dataset[split]


def metadata_has_rows(path: Path) -> bool:
    """A metadata.jsonl with a line, a metadata.csv with a line after its header (other formats: assumed)."""
    if path.suffix not in (".jsonl", ".csv"):
        return True
    with open(path, encoding="utf-8-sig", errors="replace") as lines:
        filled = (line for line in lines if line.strip())
        return next(filled, None) is not None and (path.suffix == ".jsonl" or next(filled, None) is not None)


def first_bad_caption_row(metadata: list[Path], column: str) -> str | None:
    """Where a metadata.jsonl stops being readable as a caption table: 'FILE line N: ...', or None.
    pyarrow reads a column as one type; a caption written as a number, or a list among strings, breaks it."""
    for path in (path for path in metadata if path.suffix == ".jsonl"):
        kinds = set()
        with open(path, encoding="utf-8-sig", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line).get(column)
                except (json.JSONDecodeError, AttributeError):
                    return f"{path} line {number} is not a JSON object; write one object per line"
                if value is None:
                    continue
                if not isinstance(value, (str, list)):
                    return (
                        f'{path} line {number}: the caption column "{column}" holds {json.dumps(value)}, not a'
                        f" string; write it in quotes: {json.dumps(str(value))}"
                    )
                kinds.add(type(value))
                if len(kinds) > 1:
                    held, earlier = ("a list", "a string") if isinstance(value, list) else ("a string", "a list")
                    return (
                        f'{path} line {number}: the caption column "{column}" holds {held} where earlier rows hold'
                        f" {earlier}; write every caption as a string, or every one as a list of strings"
                    )
    return None


def image_files(folder: Path) -> list[Path]:
    """The folder's images, nested folders included (hidden ones not), in a fixed order."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def caption_files(folder: Path) -> Iterator[Path]:
    """.txt files with an image of the same name beside them."""
    return (path.with_suffix(".txt") for path in image_files(folder) if path.with_suffix(".txt").is_file())


def folder_table(folder: Path, config: DataConfig):
    """A folder of images without a metadata file, as a table of image paths and captions: from a .txt of the
    same name beside each image (kohya-ss, SimpleTuner, OneTrainer), or else from the class folder each image
    sits in (`cat/0001.png`: "cat", through --caption_template)."""
    from datasets import Dataset

    images = image_files(folder)
    captions = [read_caption_file(image.with_suffix(".txt")) for image in images]
    if any(exists(caption) for caption in captions):
        warn_unused_caption_template(config, "its images have .txt captions")
        captions = txt_captions(folder, captions)
    elif any(image.parent != folder for image in images):
        captions = class_folder_captions(folder, images, config.caption_template)
    else:
        raise UserError(
            f"--train_data_dir {folder} has no metadata.jsonl or metadata.csv, no image with a .txt caption beside"
            f" it and no class folders; add a metadata.jsonl with columns file_name and {config.caption_column},"
            " a .txt per image, or sort the images into folders named for what they show"
        )
    return Dataset.from_dict({config.image_column: [str(image) for image in images], config.caption_column: captions})


def txt_captions(folder: Path, captions: list[str | None]) -> list[str]:
    """The .txt captions, the empty caption for an image without one (counted in a warning)."""
    uncaptioned = captions.count(None)
    if uncaptioned:
        logger.warning(
            "%d of %d images in %s have no .txt caption beside them: they train with the empty caption",
            uncaptioned,
            len(captions),
            folder,
        )
    return [caption or "" for caption in captions]


def class_folder_captions(folder: Path, images: list[Path], template: str) -> list[str]:
    """Each image captioned with the name of the folder it sits in (underscores as spaces) through `template`;
    an image directly in `folder` has no class and gets the empty caption (counted in a warning)."""
    classes = [image.parent.name.replace("_", " ") if image.parent != folder else None for image in images]
    counts = collections.Counter(name for name in classes if exists(name))
    shown = ", ".join(f"{name} ({count})" for name, count in sorted(counts.items())[:CLASSES_LISTED])
    more = f" and {len(counts) - CLASSES_LISTED} more" if len(counts) > CLASSES_LISTED else ""
    logger.info(
        "%s: %d class folders, captioned from the folder name as %r: %s%s",
        folder,
        len(counts),
        template,
        shown,
        more,
    )
    unclassed = classes.count(None)
    if unclassed:
        logger.warning(
            "%d of %d images sit directly in %s, outside any class folder: they train with the empty caption",
            unclassed,
            len(images),
            folder,
        )
    return ["" if name is None else template.replace("{}", name) for name in classes]


def warn_unused_caption_template(config: DataConfig, why: str) -> None:
    if config.caption_template != DEFAULT_CAPTION_TEMPLATE:
        logger.warning(
            "--caption_template %r is not used: it captions class folders, and %s", config.caption_template, why
        )


def read_caption_file(path: Path) -> str | None:
    """The caption in `path`, or None when there is no such file."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()  # a byte-order mark is no part of the caption
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from error


def load_raw_dataset(config: DataConfig):
    """A datasets Dataset (IterableDataset with --streaming) with the image and caption columns, from any layout:
    a Hub id, a local folder load_dataset understands, a save_to_disk folder, an imagefolder, a folder of .txt
    captions or class folders, WebDataset shards."""
    import datasets
    import pyarrow

    if exists(config.train_data_dir):
        folder = Path(config.train_data_dir)
        metadata = [*folder.glob("metadata.*"), *folder.glob("*/metadata.*")]
        if not metadata and not image_files(folder) and shard_files(str(folder)):
            return load_shards(shard_files(str(folder)), config, f"--train_data_dir {folder}")
        if not metadata:
            dataset = folder_table(folder, config)
            return dataset.to_iterable_dataset() if config.streaming else dataset
        warn_unused_caption_template(config, f"{metadata[0].name} gives the captions")
        if next(caption_files(folder), None) is not None:
            logger.info("%s gives the captions; the .txt files beside the images are not read", metadata[0].name)
        if not any(map(metadata_has_rows, metadata)):
            raise UserError(f"--train_data_dir {folder}: {metadata[0].name} has no rows; add one row per image")
        try:
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=str(folder), cache_dir=config.cache_dir, streaming=config.streaming
            )
        # the metadata file itself is malformed: datasets wraps some of pyarrow's errors and not others
        except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
            bad_row = first_bad_caption_row(metadata, config.caption_column)
            raise UserError(
                f"--train_data_dir {folder}: {bad_row}"
                if exists(bad_row)
                else f"--train_data_dir {folder}: the dataset could not be read ({error.__cause__ or error}); check that"
                " metadata.jsonl/csv has rows and that every caption is a string, or every caption a list of strings"
            ) from error
        return resolve_split(dataset, str(folder))
    name = config.dataset_name
    warn_unused_caption_template(config, "--dataset_name gives the captions")
    local = Path(name)
    if name.endswith(".tar") or glob.has_magic(name) or (local.is_dir() and shard_files(name)):
        return load_shards(shard_files(name), config, f"--dataset_name {name}")
    try:
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            dataset = resolve_split(datasets.load_from_disk(str(local)), name)
            return dataset.to_iterable_dataset() if config.streaming else dataset
        if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise UserError(f"--dataset_name {name} does not exist on disk")
        dataset = datasets.load_dataset(
            name, config.dataset_config_name, cache_dir=config.cache_dir, streaming=config.streaming
        )
        return resolve_split(dataset, name)
    except StopIteration as error:  # the json/csv builders find no first row to infer columns from
        raise UserError(f"the dataset {name} has no rows") from error
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = "the Hub is unreachable (offline)" if offline else f"it could not be loaded ({error})"
        raise UserError(
            f"--dataset_name {name}: not a local folder and {hint}; download it or pass a local path"
        ) from error


def shard_files(name: str) -> list[Path]:
    """The WebDataset shards `name` gives, in a fixed order: one .tar, a glob, or a folder's .tar files."""
    path = Path(name).expanduser()
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if glob.has_magic(name):
        return sorted(Path(match) for match in glob.glob(str(path)) if match.endswith(".tar"))
    return [path] if path.is_file() else []


def load_shards(shards: list[Path], config: DataConfig, where: str):
    """WebDataset shards through datasets' webdataset builder, with the columns the trainer reads."""
    import datasets

    if not shards:
        raise UserError(
            f'{where}: no .tar shard there; give a shard, a glob in quotes ("data/train-*.tar") or a folder'
        )
    unreadable = first_unreadable_shard(shards, whole=False)  # a stream would meet it mid-run
    if exists(unreadable):
        raise UserError(f"{where}: {unreadable}")
    try:
        dataset = datasets.load_dataset(
            "webdataset",
            data_files={"train": [str(shard) for shard in shards]},
            split="train",
            cache_dir=config.cache_dir,
            streaming=config.streaming,
        )
    except (tarfile.TarError, datasets.exceptions.DatasetGenerationError) as error:
        raise UserError(f"{where}: {first_unreadable_shard(shards) or error}") from error
    logger.info("%s: %d WebDataset shard%s", where, len(shards), "" if len(shards) == 1 else "s")
    return shard_columns(dataset, config, where)


def first_unreadable_shard(shards: list[Path], whole: bool = True) -> str | None:
    """The first shard that is not a tar file, read whole or only up to its first member's header."""
    for shard in shards:
        try:
            with tarfile.open(shard, "r:") as tar:  # uncompressed, as datasets reads them
                tar.getmembers() if whole else tar.next()
        except (tarfile.TarError, OSError) as error:
            return f"{shard} is not a readable .tar file ({error}); rewrite or remove it"
    return None


def shard_columns(dataset, config: DataConfig, where: str):
    """A shard's columns are its samples' file extensions (png, txt, json): the image becomes --image_column;
    the caption is --caption_column when a sample has that extension, else its .txt, else a key of its .json
    (--caption_column, "caption" or "text")."""
    columns = dataset.column_names
    found = ", ".join(f".{column}" for column in columns if not column.startswith("__"))
    image = next((column for column in columns if f".{column.split('.')[-1]}" in IMAGE_SUFFIXES), None)
    if config.image_column not in columns and not exists(image):
        raise UserError(f"{where}: the shards' samples hold no image ({found}); each needs a .png, .jpg or .webp")
    if config.image_column not in columns:
        dataset = dataset.rename_column(image, config.image_column)
    if config.caption_column in columns:
        return dataset
    if "txt" in columns:
        return dataset.rename_column("txt", config.caption_column)
    keys = list(dataset.features["json"]) if "json" in columns else []
    key = next((key for key in (config.caption_column, *JSON_CAPTION_KEYS) if key in keys), None)
    if not exists(key):
        raise UserError(
            f"{where}: the shards' samples hold no caption ({found}{'; .json keys: ' + ', '.join(keys) if keys else ''});"
            f' give each a .txt, or a .json with a "caption" key, or name its key with --caption_column'
        )
    return dataset.map(
        lambda record: {config.caption_column: (record or {}).get(key)}, input_columns="json", remove_columns="json"
    )
