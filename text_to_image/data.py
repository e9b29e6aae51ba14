"""Training data: the image table of an indexed dataset, decoding, the policy for unreadable images, and the
two batch sources (IndexedBatches for a dataset on disk, StreamedBatches for --streaming).

Both sources give a micro-batch as `Examples` (decoded images and their caption options) for a `Shard` of
the global batch. Their resume contract: a source built with the same seed and started at micro-batch k
yields exactly what an uninterrupted one yields from k on."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch

from text_to_image.common import UserError, exists
from text_to_image.config import ALPHA_BACKGROUNDS, DataConfig, Decoding
from text_to_image.layouts import load_raw_dataset

T = TypeVar("T")
logger = logging.getLogger(__name__)

MAX_BAD_IMAGE_SHARE = 0.5  # more unreadable images than this refuses the run
MAX_NAMED_BAD_IMAGES = 20  # unreadable images named one per line; the rest are counted
MIN_EXAMPLES_TO_JUDGE_A_STREAM = 100  # a stream is refused as mostly unreadable only after this many examples
STREAM_CAPTION_SAMPLE = 256  # streamed examples whose captions stand in for the dataset's (validation prompts)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises for corrupt/truncated files
NEAREST_SCALE_PROBES = 64  # images whose size is checked against --resize_filter nearest's whole-number scales


def caption_cell_to_list(cell, row: int, column: str) -> list[str]:
    """A caption cell (text, list of texts or empty) as the captions its image may be shown with."""
    if cell is None:
        return [""]
    if isinstance(cell, str):
        return [clean_caption(cell)]
    if isinstance(cell, (list, tuple)):
        texts = [clean_caption(str(text)) for text in cell if text is not None]
        return texts or [""]
    raise UserError(
        f"--caption_column {column!r} row {row} holds {type(cell).__name__}; captions must be strings or lists of strings"
    )


def clean_caption(text: str) -> str:
    """A caption without a Windows editor's byte-order mark, its line ends as \\n, no spaces around it."""
    return text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n").strip()


def undecoded_images(dataset, config: DataConfig):
    """The image and caption columns only; images kept as files/bytes so each is decoded once, by us."""
    from datasets import Image as ImageFeature

    columns = dataset.column_names or list(next(iter(dataset), {}))  # a stream may know its columns only from a row
    if not columns:
        raise UserError(f"the dataset {config.name} has no rows")
    for flag, column in (("--image_column", config.image_column), ("--caption_column", config.caption_column)):
        if column not in columns:
            raise UserError(f"{flag} {column!r} not in dataset columns {columns}; pass {flag} with one of them")
    if dataset.features and isinstance(dataset.features[config.image_column], ImageFeature):
        dataset = dataset.cast_column(config.image_column, ImageFeature(decode=False))
    return dataset.select_columns([config.image_column, config.caption_column])


def resolve_image_source(source, base: Path):
    """A string cell is a file path, relative to the data folder when not absolute."""
    if isinstance(source, str):
        path = Path(source)
        return {"path": str(path if path.is_absolute() or path.exists() else base / path), "bytes": None}
    return source


def describe_source(source) -> str:
    if isinstance(source, dict):
        return source.get("path") or "<image bytes>"
    return type(source).__name__


def open_image(source):
    """A PIL image from a dataset cell ({path, bytes}, a PIL image or a path)."""
    import io

    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        if source.get("bytes"):
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path"):
            try:
                return Image.open(source["path"])
            except OSError:
                if Path(source["path"]).parent.is_file():  # SHARD.tar/KEY: layouts.SampleReader's imageless sample
                    raise ValueError("the WebDataset sample has no image (.png, .jpg, .webp, ...)") from None
                raise
    raise ValueError(f"unreadable image cell {describe_source(source)}")


def to_rgb(image, background: str = "white"):
    """Any PIL mode (L, P, RGBA, CMYK, 16-bit, float) as RGB, transparency composited on the --alpha_background
    colour; as RGBA for "random" (the colour is drawn per batch, so the alpha is kept)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if background == "random":
        return image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUNDS[background], 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def decode_image(
    source, resolution: int, center_crop: bool, resize_filter: str = "bicubic", alpha_background: str = "white"
) -> torch.Tensor:
    """uint8 [C, H, W] with the shorter side == resolution (square when center_crop); C = 4 (RGBA) only for a
    random background."""
    from PIL import Image

    with open_image(source) as opened:
        opened.load()
        image = to_rgb(opened, alpha_background)
    size = resized_size(*image.size, resolution)
    if size != image.size:
        resample = Image.Resampling[resize_filter.upper()]
        # reducing_gap shrinks by box-averaging first: right for smooth filters, but it would blur pixel art
        reducing_gap = None if resize_filter == "nearest" else 3.0
        image = image.resize(size, resample, reducing_gap=reducing_gap)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_or_describe(source, decoding: Decoding) -> torch.Tensor | str:
    """The decoded image, or 'source: error' when it cannot be read (the caller decides what to skip)."""
    try:
        return decode_image(
            source, decoding.resolution, decoding.center_crop, decoding.resize_filter, decoding.alpha_background
        )
    except IMAGE_ERRORS as error:
        return f"{describe_source(source)}: {error}"


def is_whole_scale(width: int, height: int, resolution: int) -> bool:
    """Whether resizing to `resolution` multiplies or divides the side by a whole number."""
    short = min(width, height)
    return short % resolution == 0 or resolution % short == 0


def warn_fractional_nearest(sources, decoding: Decoding) -> None:
    """--resize_filter nearest at a non-integer scale drops or doubles pixel rows unevenly: say so, once."""
    if decoding.resize_filter != "nearest":
        return
    sizes = []
    for source in sources:
        with contextlib.suppress(*IMAGE_ERRORS), open_image(source) as image:  # header only: no pixels read
            sizes.append(image.size)
    uneven = [size for size in sizes if not is_whole_scale(*size, decoding.resolution)]
    if uneven:
        width, height = uneven[0]
        logger.warning(
            "--resize_filter nearest: %d of the first %d images scale by a non-integer factor (e.g. %dx%d px to"
            " %d px: %.3gx), so some pixel rows are doubled and others not; pick a --resolution that divides or is a"
            " multiple of the images' size, or --resize_filter box/bicubic",
            len(uneven),
            len(sizes),
            width,
            height,
            decoding.resolution,
            decoding.resolution / min(width, height),
        )


def name_unreadable(failures: list[str], already_named: int = 0) -> None:
    """One warning line per unreadable image, the first 20 of a run; after that, one line saying how many more."""
    for failure in failures[: max(0, MAX_NAMED_BAD_IMAGES - already_named)]:
        logger.warning("skipping unreadable image %s", failure)
    unnamed = len(failures) - max(0, MAX_NAMED_BAD_IMAGES - already_named)
    if unnamed > 0:
        logger.warning("... and %d more unreadable images", unnamed)


def refuse_mostly_unreadable(failures: int, total: int, example: str) -> None:
    if failures > MAX_BAD_IMAGE_SHARE * total:
        raise UserError(f"{failures} of {total} images could not be read (e.g. {example}); check the dataset files")


def stand_in_for_unreadable(images: list[torch.Tensor | str], captions: list[T]) -> tuple[list[torch.Tensor], list[T]]:
    """Each unreadable image (its error text) replaced by the first readable one of its batch, and its caption by
    that image's: the batch keeps its size (the resume contract), and every image trains with its own caption."""
    readable = [index for index, image in enumerate(images) if isinstance(image, torch.Tensor)]
    if not readable:
        raise UserError(f"no image of a whole batch could be read (e.g. {images[0]}); check the dataset files")
    sources = [index if isinstance(image, torch.Tensor) else readable[0] for index, image in enumerate(images)]
    return [images[source] for source in sources], [captions[source] for source in sources]


def collate_as_list(items):
    return items


def decoding_loader(dataset, batch_sampler, num_workers: int) -> torch.utils.data.DataLoader:
    """The one DataLoader of the trainer: workers decode the batches `batch_sampler` names, in its order.

    The sampler runs in this process, so which examples form a batch never depends on the workers; its
    own generator keeps opening a loader from drawing on the global RNG the noise comes from.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_as_list,
        generator=torch.Generator(),
    )


class RowDecoder(torch.utils.data.Dataset):
    """Row -> (row, uint8 image or error text), reading the row's cell from the Arrow table on demand."""

    def __init__(self, table, column: str, base: Path, decoding: Decoding):
        self.table, self.column, self.base, self.decoding = table, column, base, decoding

    def __len__(self) -> int:
        return len(self.table)

    def source(self, row: int):
        return resolve_image_source(self.table[int(row)][self.column], self.base)

    def __getitem__(self, row: int):
        return row, decode_or_describe(self.source(row), self.decoding)


@dataclass(frozen=True, kw_only=True)
class ImageTable:
    """A map-style dataset ready to index: captions per row, the rows that decode, and the decoded images
    when they fit in --image_cache_max_gb (else the rows are decoded again per batch)."""

    decoder: RowDecoder
    caption_options: list[list[str]]  # per row: the captions its image may be shown with
    captions: list[str]  # distinct captions, "" first (classifier-free guidance)
    usable_rows: torch.Tensor
    unreadable_rows: list[int]
    cache: list[torch.Tensor | None] | None


def read_captions(table, column: str) -> tuple[list[list[str]], list[str]]:
    options = [caption_cell_to_list(cell, row, column) for row, cell in enumerate(table[column])]
    distinct = {"": None} | {text: None for texts in options for text in texts}
    return options, list(distinct)


def check_images(decoder: RowDecoder, num_workers: int, keep: bool, show_progress: bool):
    """Decode every row once: (the images when `keep`, else None; the error texts; the unreadable rows)."""
    from tqdm.auto import tqdm

    rows = range(len(decoder))
    batches = [rows[start : start + 16] for start in range(0, len(rows), 16)]
    images = [None] * len(decoder) if keep else None
    failures, unreadable = [], []
    desc = "decoding images" if keep else "checking images"
    for batch in tqdm(decoding_loader(decoder, batches, num_workers), desc=desc, disable=not show_progress):
        for row, image in batch:
            if not isinstance(image, torch.Tensor):
                failures.append(image)
                unreadable.append(row)
            elif keep:
                images[row] = image
    return images, failures, unreadable


def read_image_table(config: DataConfig, known_unreadable: list[int] | None, show_progress: bool) -> ImageTable:
    """Captions now; images decoded once into the cache when it fits, else only checked.

    Either way every row is tried before training, so decoding once or per batch trains on the same
    rows; a resumed per-batch run takes the unreadable rows from its checkpoint instead of checking again.
    """
    table = undecoded_images(load_raw_dataset(config), config)
    if len(table) == 0:
        raise UserError(f"the dataset {config.name} has no rows")
    options, captions = read_captions(table, config.caption_column)
    decoder = RowDecoder(table, config.image_column, config.base, config.decoding)
    warn_fractional_nearest(map(decoder.source, range(min(len(table), NEAREST_SCALE_PROBES))), config.decoding)
    pixels = config.decoding.channels * config.resolution**2
    estimated_gb = len(table) * pixels * (1 if config.center_crop else 1.5) / 2**30
    keep = estimated_gb <= config.image_cache_max_gb
    if not keep:
        logger.info(
            "images need ~%.1f GiB at %d px: decoding per batch (--image_cache_max_gb %.1f) with %d worker processes (--dataloader_num_workers)",
            estimated_gb,
            config.resolution,
            config.image_cache_max_gb,
            config.dataloader_num_workers,
        )
    if keep or not exists(known_unreadable):
        cache, failures, unreadable = check_images(decoder, config.dataloader_num_workers, keep, show_progress)
        name_unreadable(failures)
        refuse_mostly_unreadable(len(failures), len(table), failures[0] if failures else "")
    else:
        cache, unreadable = None, known_unreadable
    skipped = set(unreadable)
    return ImageTable(
        decoder=decoder,
        caption_options=options,
        captions=captions,
        usable_rows=torch.tensor([row for row in range(len(table)) if row not in skipped], dtype=torch.long),
        unreadable_rows=sorted(skipped),
        cache=cache,
    )


@dataclass(frozen=True)
class Shard:
    """This process's slice of the global batch.

    Every process draws the random numbers of the whole global batch (same seed everywhere) and
    keeps its slice, so a run does not depend on how the global batch is split across processes.
    """

    index: int = 0
    count: int = 1
    size: int = 1

    @property
    def total(self) -> int:
        return self.size * self.count

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.index * self.size : (self.index + 1) * self.size]


def epoch_order(usable_rows: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch: a pure function of (seed, epoch), so resume needs no sampler state."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return usable_rows[torch.randperm(len(usable_rows), generator=generator)]


@dataclass(frozen=True, kw_only=True)
class Examples:
    """This process's share of one micro-batch, before augmentation and captioning."""

    images: list[torch.Tensor]  # uint8 [3, H, W], the short side at the resolution
    caption_options: list[list[str]]


class BatchSource(Protocol):
    """Where a run's micro-batches come from (IndexedBatches, StreamedBatches; setup.prepare_indexed_data or
    prepare_streamed_data builds one).

    The resume contract: `examples(k)` is a pure function of (seed, k) and the process's Shard, so a
    run resumed at micro-batch k, or split over another number of processes, reads the same examples
    as the straight run, without decoding the k batches before it. It draws nothing from the global
    RNG (a loader owns its generators): the global RNG is for the step's draws (CONTRIBUTING.md).
    Every micro-batch is full: an unreadable image is stood in for (stand_in_for_unreadable) and
    counted in `skipped`."""

    def examples(self, micro_index: int) -> Examples: ...

    @property
    def skipped(self) -> int: ...

    def describe(self) -> str: ...


class IndexedBatches:
    """Micro-batches of an ImageTable: the rows of micro-batch i are a pure function of (seed, i), so a
    resumed or re-split run reads the same rows; without the cache, workers decode the coming batches."""

    def __init__(self, table: ImageTable, *, seed: int, shard: Shard, batches_per_epoch: int, num_workers: int):
        self.table, self.seed, self.shard = table, seed, shard
        self.batches_per_epoch, self.num_workers = batches_per_epoch, num_workers
        self.ahead: Iterator | None = None  # worker-decoded micro-batches
        self.ahead_index = -1  # the micro-batch index `ahead` yields next
        self.stood_in = 0  # images that became unreadable after the start-up check, each time one came up
        # epoch -> its row order: one shuffle per epoch, not per micro-batch; two kept, as the decoding
        # workers' sampler runs into the next epoch while the step still reads the current one
        self.orders: dict[int, torch.Tensor] = {}

    def epoch_rows(self, epoch: int) -> torch.Tensor:
        if epoch not in self.orders:
            self.orders = {key: value for key, value in self.orders.items() if key == epoch - 1}
            self.orders[epoch] = epoch_order(self.table.usable_rows, self.seed, epoch)
        return self.orders[epoch]

    def rows(self, micro_index: int) -> list[int]:
        epoch, position = divmod(micro_index, self.batches_per_epoch)
        total = self.shard.total
        return self.shard.of(self.epoch_rows(epoch)[position * total : (position + 1) * total]).tolist()

    def examples(self, micro_index: int) -> Examples:
        rows = self.rows(micro_index)
        options = [self.table.caption_options[row] for row in rows]
        if exists(self.table.cache):
            return Examples(images=[self.table.cache[row] for row in rows], caption_options=options)
        if self.num_workers == 0:
            decoded = [self.table.decoder[row] for row in rows]
        else:
            if micro_index != self.ahead_index:  # the first batch, or a jump: (re)start the workers there
                batch_rows = map(self.rows, itertools.count(micro_index))
                self.ahead = iter(decoding_loader(self.table.decoder, batch_rows, self.num_workers))
            decoded = next(self.ahead)
            self.ahead_index = micro_index + 1
        if [row for row, _ in decoded] != rows:
            raise RuntimeError(
                f"decoded rows {[row for row, _ in decoded]} are not the micro-batch's {rows}: a bug, please report it"
            )
        images = [image for _, image in decoded]
        failures = [image for image in images if not isinstance(image, torch.Tensor)]  # changed since checked
        name_unreadable(failures)
        self.stood_in += len(failures)
        images, options = stand_in_for_unreadable(images, options)
        return Examples(images=images, caption_options=options)

    @property
    def skipped(self) -> int:
        return len(self.table.unreadable_rows) + self.stood_in

    def describe(self) -> str:
        usable = self.table.usable_rows.tolist()
        uncaptioned = sum(self.table.caption_options[row] == [""] for row in usable)
        without = f", {uncaptioned} without a caption" if uncaptioned else ""
        return f"{len(usable)} images ({self.skipped} skipped{without}), {len(self.table.captions)} captions"


class ExampleDecoder(torch.utils.data.Dataset):
    """A streamed example -> (uint8 image or error text, caption cell); runs in DataLoader workers."""

    def __init__(self, config: DataConfig):
        self.image_column, self.caption_column, self.base = config.image_column, config.caption_column, config.base
        self.decoding = config.decoding

    def __getitem__(self, example: dict):
        source = resolve_image_source(example[self.image_column], self.base)
        return decode_or_describe(source, self.decoding), example[self.caption_column]


class StreamedBatches:
    """--streaming: this process's share of an IterableDataset, reshuffled every pass, decoded per batch.

    The position is derived from the step, not saved: every micro-batch takes exactly batch_size
    examples (an unreadable image is stood in for by another of its batch, named and counted), so
    after N micro-batches the stream is N x batch examples in, and a resume skips that many without
    decoding them. The shuffle is a function of (seed, pass), so the skip lands exactly where the
    interrupted run was. IterableDataset.state_dict() would not: datasets drops the shuffle buffer's
    contents on resume and refills it from further on, so a resumed run would see other examples.
    """

    def __init__(self, dataset, config: DataConfig, start_micro_index: int):
        self.dataset, self.config, self.passes = dataset, config, 0
        self.examples_seen, self.unreadable = 0, 0
        self.stream = self.new_pass()
        self.taken = 0  # examples taken from the stream, across passes: an example's row number
        self.skip(start_micro_index * config.train_batch_size)
        self.decoded = None  # the DataLoader's iterator, opened by the first batch (after a resume's skip)

    def new_pass(self) -> Iterator[dict]:
        self.dataset.set_epoch(self.passes)
        self.taken_this_pass = 0
        return iter(self.dataset)

    def take(self, count: int) -> list[dict]:
        taken = []
        while len(taken) < count:
            example = next(self.stream, None)
            if example is not None:
                taken.append(example)
                self.taken_this_pass += 1
                continue
            if self.taken_this_pass == 0:
                raise UserError(
                    f"the dataset {self.config.name} streams no rows for this process; check the data or shards"
                )
            self.passes += 1
            self.stream = self.new_pass()
        return taken

    def skip(self, count: int) -> None:
        for start in range(0, count, 4096):
            self.take(min(4096, count - start))
        self.taken = count

    def raw_batches(self) -> Iterator[list[dict]]:
        """batch_size undecoded examples at a time, forever (the DataLoader's batch sampler)."""
        while True:
            yield self.take(self.config.train_batch_size)

    def examples(self, micro_index: int) -> Examples:
        if not exists(self.decoded):
            self.decoded = iter(
                decoding_loader(ExampleDecoder(self.config), self.raw_batches(), self.config.dataloader_num_workers)
            )
        images, cells = zip(*next(self.decoded), strict=True)
        first_row, self.taken = self.taken, self.taken + len(images)
        column = self.config.caption_column
        options = [caption_cell_to_list(cell, first_row + index, column) for index, cell in enumerate(cells)]
        failures = [image for image in images if not isinstance(image, torch.Tensor)]
        name_unreadable(failures, already_named=self.unreadable)
        self.examples_seen, self.unreadable = self.examples_seen + len(images), self.unreadable + len(failures)
        if self.examples_seen >= MIN_EXAMPLES_TO_JUDGE_A_STREAM and failures:
            refuse_mostly_unreadable(self.unreadable, self.examples_seen, failures[0])
        images, options = stand_in_for_unreadable(list(images), options)
        return Examples(images=images, caption_options=options)

    def first_sources(self, count: int) -> Iterator:
        """The image cells of the first examples of one pass, as decode_image takes them."""
        for example in itertools.islice(iter(self.dataset), count):
            yield resolve_image_source(example[self.config.image_column], self.config.base)

    def sample_captions(self, count: int) -> list[str]:
        """Captions of the first examples of one pass (fewer when the data is smaller): a stand-in for the dataset's."""
        cells = [example[self.config.caption_column] for example in itertools.islice(iter(self.dataset), count)]
        texts = {
            text
            for row, cell in enumerate(cells)
            for text in caption_cell_to_list(cell, row, self.config.caption_column)
        }
        return [""] + sorted(text for text in texts if text)

    @property
    def skipped(self) -> int:
        return self.unreadable

    def describe(self) -> str:
        return f"streaming {self.config.name} (shuffle buffer {self.config.shuffle_buffer_size})"


def open_stream(
    config: DataConfig, process_index: int, num_processes: int, seed: int, start_micro_index: int
) -> StreamedBatches:
    from datasets.distributed import split_dataset_by_node

    dataset = undecoded_images(load_raw_dataset(config), config)
    if num_processes > 1:
        dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    return StreamedBatches(
        dataset.shuffle(seed=seed, buffer_size=config.shuffle_buffer_size), config, start_micro_index
    )
