"""Where the captioned images come from: the dataset layouts people already have, each read into one
table of images and captions (or a stream of them) for data.py.

- an imagefolder: images + metadata.jsonl or metadata.csv;
- a .txt caption beside each image (kohya-ss sd-scripts, SimpleTuner, OneTrainer);
- class folders: an image's caption is the name of its folder, through --caption_template;
- Hub datasets and local folders load_dataset understands, save_to_disk folders;
- WebDataset .tar shards: a file, a glob or a folder of them, each sample an image with a .txt or a .json."""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import itertools
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from text_to_image.common import UserError, exists
from text_to_image.config import DEFAULT_CAPTION_TEMPLATE, DataConfig

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # as image files
CLASSES_LISTED = 10  # class folders named in the log line; the rest are counted
JSON_CAPTION_KEYS = ("caption", "text")  # a shard's .json caption, when --caption_column is not one of its keys
TAR_BLOCK = 512  # a tar is headers and data in blocks of this many bytes, ended by two zero blocks
SHARD_SAMPLES_CHECKED = 5  # a first shard's samples read at start to see that they hold images and captions
SHARD_TABLE_VERSION = 1  # part of a shard table's cache key: raise it when shard_rows reads shards otherwise


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
        if not folder.is_dir():  # a shard or a glob of them (DataConfig checked that it is one or the other)
            return load_shards(shard_files(config.train_data_dir), config, f"--train_data_dir {folder}")
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
    """WebDataset shards as a table (a stream with --streaming) of the columns the trainer reads: each sample's
    image and its captions, read by shard_rows. Every shard is checked whole first, so a stream does not meet a
    damaged one mid-run; the first samples show whether the shards hold images and captions at all."""
    import datasets

    if not shards:
        raise UserError(
            f'{where}: no .tar shard there; give a shard, a glob in quotes ("data/train-*.tar") or a folder'
        )
    for shard in shards:
        if exists(damage := shard_damage(shard)):
            raise UserError(f"{where}: {damage}")
    reader = SampleReader(image_column=config.image_column, caption_column=config.caption_column, where=where)
    reader.check_first_samples(shards[0])
    features = datasets.Features(
        {config.image_column: datasets.Image(), config.caption_column: datasets.Sequence(datasets.Value("string"))}
    )
    gen_kwargs = {"shards": [str(shard) for shard in shards], "reader": reader}
    logger.info("%s: %d WebDataset shard%s", where, len(shards), "" if len(shards) == 1 else "s")
    if config.streaming:
        return datasets.IterableDataset.from_generator(shard_rows, features=features, gen_kwargs=gen_kwargs)
    try:
        return datasets.Dataset.from_generator(
            shard_rows,
            features=features,
            gen_kwargs=gen_kwargs,
            cache_dir=config.cache_dir,
            fingerprint=shards_fingerprint(shards, reader),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, UserError):  # shard_rows' words, not datasets' wrapper
            raise error.__cause__ from None
        raise


def shards_fingerprint(shards: list[Path], reader: SampleReader) -> str:
    """The table's cache key: the shards as they are on disk (a rewritten shard is read again) and the columns."""
    stamps = [(str(shard.resolve()), shard.stat().st_size, shard.stat().st_mtime_ns) for shard in shards]
    text = json.dumps([SHARD_TABLE_VERSION, stamps, reader.image_column, reader.caption_column])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shard_damage(shard: Path) -> str | None:
    """Why `shard` cannot be read whole, or None. A whole tar ends in zero blocks (its end-of-archive marker), so
    a shard ending in them is taken as whole without reading on; one that does not is walked header by header
    (no member is read) to say where it was cut."""
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as file:
            file.seek(max(0, size - 2 * TAR_BLOCK))
            ends_in_marker = size % TAR_BLOCK == 0 and size >= 2 * TAR_BLOCK and not any(file.read())
        with tarfile.open(shard, "r:") as tar:  # uncompressed, as WebDataset shards are; reads the first header
            return None if ends_in_marker else where_cut(tar, shard, size)
    except (tarfile.TarError, OSError) as error:
        return f"{shard} is not a readable .tar file ({error}); rewrite or remove it"


def where_cut(tar: tarfile.TarFile, shard: Path, size: int) -> str | None:
    """Where a tar without its end-of-archive marker stops: inside a member, inside a header, or right after a
    member (cut there, or never closed); None when only the padding after its marker is missing."""
    last = tar.firstmember
    with contextlib.suppress(tarfile.ReadError):  # "unexpected end of data": the last member runs past the end
        while exists(member := tar.next()):
            last, tar.members = member, []
    fix = "download or write it again, or remove it"
    if not exists(last):
        return None
    if last.offset_data + last.size > size:
        return f"{shard} is cut short inside {last.name} (its {size} bytes end before that file does); {fix}"
    left = size - tar.offset  # bytes from where the next header starts
    if left <= 0:
        return f"{shard} ends after {last.name} without the end-of-archive marker a whole tar ends in; {fix}"
    if left < TAR_BLOCK:
        return f"{shard} is cut short inside the tar header after {last.name}; {fix}"
    tar.fileobj.seek(tar.offset)
    if any(tar.fileobj.read(TAR_BLOCK)):
        return f"{shard} has a damaged tar header after {last.name}; {fix}"
    return None


def shard_rows(shards: list[str], reader: SampleReader) -> Iterator[dict]:
    """The rows of `shards`, in order: one per sample (datasets splits the list across processes and workers)."""
    for shard in map(Path, shards):
        for key, files in reader.samples(shard):
            yield reader.row(shard, key, files)


def webdataset_key(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, field) of a member by WebDataset's rule, as its library and datasets' builder read it: the key is the
    path up to the first dot of the file name, the field the rest (a.b.txt: key a, field b.txt); None for a
    folder, a hidden file or a name without a dot, which are no sample's."""
    folder, _, name = member.name.rpartition("/")
    if not member.isreg() or name.startswith((".", "__")) or "." not in name:
        return None
    stem, _, field = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def extension(field: str) -> str:
    return "." + field.rsplit(".", 1)[-1].lower()


@dataclass(frozen=True, kw_only=True)
class SampleReader:
    """How a shard's samples become rows: the image is the --image_column field, else the one image field; the
    caption the --caption_column field, else the .txt, else the --caption_column, "caption" or "text" key of
    the .json. A sample without either keeps its row (None), so the run plan counts it."""

    image_column: str
    caption_column: str
    where: str  # the flag and value that named the shards, for errors

    def samples(self, shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {field: bytes}) of each sample, in tar order; a sample's files lie next to each other."""
        key, files, finished = None, {}, set()
        try:
            with tarfile.open(shard, "r|") as tar:  # read straight through, as a stream is
                for member in tar:
                    tar.members = []  # a long shard's headers are not kept
                    if not exists(named := webdataset_key(member)):
                        continue
                    if named[0] != key:
                        if files:
                            yield key, files
                        finished.add(key)
                        key, files = named[0], {}
                        self.check_together(shard, key, member, finished)
                    if named[1] in files:
                        raise UserError(f"{self.where}: {shard} holds {member.name} twice; write it again")
                    files[named[1]] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as error:  # cut short with zeros before the cut: shard_damage missed it
            damage = shard_damage(shard) or f"{shard} could not be read ({error}); download or write it again"
            raise UserError(f"{self.where}: {damage}") from None
        if files:
            yield key, files

    def check_together(self, shard: Path, key: str, member: tarfile.TarInfo, finished: set) -> None:
        if key in finished:
            raise UserError(
                f"{self.where}: {shard}: the files of sample {key} are not next to each other ({member.name} comes"
                " after other samples' files); a WebDataset shard keeps each sample's files together: write it"
                " again with its files sorted by name (tar --sort=name)"
            )

    def row(self, shard: Path, key: str, files: dict[str, bytes]) -> dict:
        """The sample's image cell ({bytes, path}; no bytes when it has no image) and its captions (or None)."""
        image = self.image_field(shard, key, files)
        if exists(image):
            cell = {"bytes": files[image], "path": f"{shard}/{key}.{image}"}
        else:  # data.open_image knows SHARD.tar/KEY for what it is, and the skipped sample is named so
            cell = {"bytes": None, "path": f"{shard}/{key}"}
        return {self.image_column: cell, self.caption_column: self.captions(shard, key, files)}

    def image_field(self, shard: Path, key: str, files: dict[str, bytes]) -> str | None:
        if self.image_column in files:
            return self.image_column
        images = [field for field in files if extension(field) in IMAGE_SUFFIXES]
        if len(images) > 1:
            shown = ", ".join(f"{key}.{field}" for field in images[:2]) + (", ..." if len(images) > 2 else "")
            stem = images[0].rsplit(".", 1)[0]
            raise UserError(
                f"{self.where}: {shard}: sample {key} holds {len(images)} images ({shown}): a WebDataset key ends at"
                " the first dot of a file name; rename the files so that each sample's key differs before its first"
                f" dot ({key}_{images[0]} + {key}_{stem}.txt), or pass --image_column with the one image to train on"
                f" (--image_column {images[0]})"
            )
        return images[0] if images else None

    def captions(self, shard: Path, key: str, files: dict[str, bytes]) -> list[str] | None:
        texts = [field for field in files if extension(field) == ".txt"]
        if self.caption_column in files or texts:
            field = self.caption_column if self.caption_column in files else ("txt" if "txt" in texts else texts[0])
            return [self.text(shard, f"{key}.{field}", files[field])]
        record = next((self.record(shard, key, field, files) for field in files if extension(field) == ".json"), {})
        value = next((record[name] for name in (self.caption_column, *JSON_CAPTION_KEYS) if name in record), None)
        if value is None:
            return None
        return [str(text) for text in value if text is not None] if isinstance(value, list) else [str(value)]

    def text(self, shard: Path, name: str, payload: bytes) -> str:
        try:
            return payload.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise UserError(
                f"{self.where}: {shard}: {name} is not UTF-8 text ({error.reason} at byte {error.start}); save it as"
                " UTF-8"
            ) from None

    def record(self, shard: Path, key: str, field: str, files: dict[str, bytes]) -> dict:
        try:
            record = json.loads(files[field])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{self.where}: {shard}: {key}.{field} is not valid JSON ({error}); correct it") from None
        return record if isinstance(record, dict) else {}

    def check_first_samples(self, shard: Path) -> None:
        """Refuse shards whose first samples hold no image, or no caption: a layout the reader does not know."""
        samples = list(itertools.islice(self.samples(shard), SHARD_SAMPLES_CHECKED))
        rows = [self.row(shard, key, files) for key, files in samples]
        fields = list(dict.fromkeys(field for _, files in samples for field in files))
        found = ", ".join(f".{field}" for field in fields)
        if rows and not any(row[self.image_column]["bytes"] for row in rows):
            raise UserError(
                f"{self.where}: the shards' samples hold no image ({found}); each needs a .png, .jpg or .webp"
            )
        if rows and not any(exists(row[self.caption_column]) for row in rows):
            records = ((key, field, files) for key, files in samples for field in files if extension(field) == ".json")
            first_record = next(records, None)
            keys = f"; .json keys: {', '.join(self.record(shard, *first_record))}" if exists(first_record) else ""
            raise UserError(
                f"{self.where}: the shards' samples hold no caption ({found}{keys}); give each a .txt, or a .json"
                ' with a "caption" key, or name its key with --caption_column'
            )
