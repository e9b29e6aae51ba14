"""--data_on_device: the decoded images and the caption-embedding table kept on the device, and each micro-batch
drawn and gathered there: no Python loop over images, no pinned copies, no caption look-up on the host; the
host sends only the rows' numbers. A step on the device then needs nothing else from the host, which is what
lets --cuda_graphs capture the batch's draws with the rest of the step.

The batches follow the host path's rules exactly: the rows of micro-batch k are IndexedBatches.rows(k), the draws
are batches.draw_batch's, in its order, then the loss's, and captions and pixels are chosen from them as
batches.choose_captions, mind_the_sides and crop_and_flip do. The one difference is the generator: every draw of
a step comes from the device's. On the CPU that is the host's, so this path trains the host path's batches bit
for bit (tests/test_resident.py); on a GPU the batches differ from the host path's, which draws them on the CPU,
and exact resume and "N processes = 1 process" hold as they do for the noise (accelerate saves the CUDA
generator's state; every process seeds it alike and draws the whole global batch)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from text_to_image.batches import (
    augment_pixels,
    caption_variant,
    crop_offset,
    draws_for,
    flipped_in_unit_range,
    laid_out,
    mirrored,
    says_side,
    swap_sides,
    without_mirroring,
)
from text_to_image.common import UserError, exists, to_device
from text_to_image.config import DataConfig
from text_to_image.data import ImageTable, IndexedBatches, Shard
from text_to_image.models import CachedEmbeddings

logger = logging.getLogger(__name__)

DEVICE_MEMORY_SHARE = 0.25  # --data_on_device auto: the data may take at most this share of the GPU's free memory
COPY_CHUNK = 4096  # images stacked on the host at a time on their way to the device


@dataclass(frozen=True, kw_only=True)
class CaptionRows:
    """Every caption a micro-batch can show, as its row of the caption-embedding table, so that captions are
    chosen on the device by the host path's rules."""

    options: torch.Tensor  # [images, most options]: each image's caption options (padded with its first)
    counts: torch.Tensor  # [images]: how many options each image has
    variants: torch.Tensor  # [texts, K]: each option's --caption_shuffle_separator/--caption_tag_dropout variants
    swapped: torch.Tensor  # [texts]: the text with left and right swapped (itself when it says neither)
    sided: torch.Tensor  # [texts] bool: the text says left or right
    empty: int  # the empty caption's row (classifier-free guidance)

    def to(self, device: torch.device) -> CaptionRows:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        moved = {name: to_device(value, device) for name, value in fields.items() if isinstance(value, torch.Tensor)}
        return dataclasses.replace(self, **moved)


def caption_rows(caption_options: list[list[str]], row_of: dict[str, int], data: DataConfig) -> CaptionRows:
    """The tables CaptionRows holds, for the embedding table whose rows `row_of` names (setup caches every text
    a caption can be shown as: batches.training_texts)."""
    variants = data.tag_variants
    count = variants.count if exists(variants) else 1
    most = max(len(texts) for texts in caption_options)
    options = [[row_of[text] for text in texts] + [row_of[texts[0]]] * (most - len(texts)) for texts in caption_options]
    variant_rows = [[row] * count for row in range(len(row_of))]  # a text that is no option: never indexed
    shown = {""}
    for text in {text for texts in caption_options for text in texts if text}:
        made = [caption_variant(text, index, variants) for index in range(count)] if exists(variants) else [text]
        variant_rows[row_of[text]] = [row_of[variant] for variant in made]
        shown.update(made)
    swapped, sided = list(range(len(row_of))), [False] * len(row_of)
    for text in filter(says_side, shown):
        sided[row_of[text]] = True
        if data.mirrors and data.flip_sided_captions == "swap":
            swapped[row_of[text]] = row_of[swap_sides(text)]
    return CaptionRows(
        options=torch.tensor(options, dtype=torch.long),
        counts=torch.tensor([len(texts) for texts in caption_options], dtype=torch.long),
        variants=torch.tensor(variant_rows, dtype=torch.long),
        swapped=torch.tensor(swapped, dtype=torch.long),
        sided=torch.tensor(sided, dtype=torch.bool),
        empty=row_of[""],
    )


def share_index(share: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """batches.share_index on tensors, in float64 as the host's Python floats are, so boundaries round alike.
    (No tensor made from a Python number here: that is a copy from the host, which a CUDA graph cannot hold.)"""
    index = (share.double() * count).long()
    return torch.minimum(index, count - 1) if isinstance(count, torch.Tensor) else index.clamp(max=count - 1)


class ResidentBatches:
    """Micro-batches drawn and gathered on the device from the images and caption rows held there: a
    batches.MicroBatches, like batches.HostBatches, and the rows a device step gathers by itself."""

    def __init__(
        self,
        *,
        images: torch.Tensor,
        captions: CaptionRows,
        source: IndexedBatches,
        data: DataConfig,
        dropout_prob: float,
        channels_last: bool = False,
    ):
        self.images, self.captions, self.source = images, captions, source  # images: uint8 [rows, C, H, W]
        self.data, self.dropout_prob, self.channels_last = data, dropout_prob, channels_last
        self.device = images.device

    @property
    def shard(self) -> Shard:
        return self.source.shard

    def rows(self, micro_indices: range) -> torch.Tensor:
        """The rows of these micro-batches ([micro-batches, shard]) on the device: the step's one host copy."""
        rows = [self.source.rows(index) for index in micro_indices]
        return to_device(torch.tensor(rows, dtype=torch.long), self.device)

    def micro_batch(self, micro_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.gathered(self.rows(range(micro_index, micro_index + 1))[0])

    def gathered(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pixels in [-1, 1], caption rows, augmentation labels or None) of these rows, all drawn on the device."""
        draws = draws_for(self.shard, self.data, self.dropout_prob, self.device)
        captions = self.choose_captions(rows, draws)
        captions, draws = self.mind_the_sides(captions, draws)
        pixels = cropped(self.images[rows], draws.crop_at, self.data.resolution)
        pixels = flipped_in_unit_range(pixels, draws.flip, draws.background)
        labels = None
        if exists(draws.augment):
            pixels, labels = augment_pixels(pixels, draws.augment)
        return laid_out(pixels, self.channels_last), captions, labels

    def choose_captions(self, rows: torch.Tensor, draws) -> torch.Tensor:
        """batches.choose_captions as table rows: an option, then its variant; the empty caption where dropped."""
        table = self.captions
        chosen = table.options[rows, share_index(draws.caption_choice, table.counts[rows])]
        if exists(draws.variant_choice):
            chosen = table.variants[chosen, share_index(draws.variant_choice, table.variants.shape[1])]
        return torch.where(draws.dropped, table.empty, chosen)

    def mind_the_sides(self, captions: torch.Tensor, draws):
        """batches.mind_the_sides as table rows."""
        flips = mirrored(draws)
        if not exists(flips):
            return captions, draws
        if self.data.flip_sided_captions == "no_flip":
            return captions, without_mirroring(draws, ~self.captions.sided[captions])
        return torch.where(flips, self.captions.swapped[captions], captions), draws


def cropped(images: torch.Tensor, crop_at: torch.Tensor, resolution: int) -> torch.Tensor:
    """batches.crop_and_flip's crop of same-size images, on their device: crop_at holds (top, left) as fractions
    of the spare pixels, scaled in float64 as the host's Python floats are. Indexed even where nothing is spare:
    a traced step drops random numbers it never reads, and would then draw the next ones in their place."""
    count, _, height, width = images.shape
    top = crop_offset(crop_at[:, :1].double(), height - resolution).long()
    left = crop_offset(crop_at[:, 1:].double(), width - resolution).long()
    side = torch.arange(resolution, device=images.device)
    ys, xs = top + side, left + side  # [N, resolution] each
    crops = images[torch.arange(count, device=images.device)[:, None, None], :, ys[:, :, None], xs[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()  # advanced indices first: [N, R, R, C]


# ---- whether the data goes to the device ----


def why_not_on_device(
    table: ImageTable | None, embeddings: torch.Tensor | None, resolution: int, device: torch.device
) -> str | None:
    """Why this run's data (its decoded images, its captions' cached embeddings) cannot live on the device (None:
    it can), each reason with its fix."""
    if not exists(table):
        return "--streaming decodes images per batch (drop --streaming)"
    if not exists(table.cache):
        return "the images are decoded per batch, as they need more than --image_cache_max_gb (raise it)"
    if not exists(embeddings):
        return "the captions are encoded per batch (--train_text_encoder or --no_caption_cache)"
    rows = table.usable_rows.tolist()
    first = table.cache[rows[0]].shape[1:]
    other_row = next((row for row in rows if table.cache[row].shape[1:] != first), None)
    if exists(other_row):
        other = table.cache[other_row].shape[1:]
        return (
            f"the images differ in size at --resolution {resolution} (row {rows[0]}: {first[1]}x{first[0]} px, row"
            f" {other_row}: {other[1]}x{other[0]} px; pass --center_crop)"
        )
    return too_big_for(device, data_bytes(table, embeddings))


def data_bytes(table: ImageTable, embeddings: torch.Tensor) -> int:
    image = next(image for image in table.cache if exists(image))
    return len(table.cache) * image.numel() + embeddings.numel() * embeddings.element_size()


def too_big_for(device: torch.device, needed: int) -> str | None:
    """Why `needed` bytes would crowd the GPU (None: they fit)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= DEVICE_MEMORY_SHARE * free:
        return None
    return (
        f"the images and caption embeddings need {needed / 2**30:.2f} GiB, more than {DEVICE_MEMORY_SHARE:.0%} of"
        f" the GPU's free {free / 2**30:.1f} GiB"
    )


def choose_on_device(choice: str, recorded: bool | None, why_not: str | None, device: torch.device) -> bool:
    """--data_on_device yes/no/auto, given why it cannot be (None: it can) and what a resumed checkpoint recorded.
    auto: on a GPU where it can, unless the run being resumed drew its batches on the host."""
    if choice == "yes" and exists(why_not):
        raise UserError(f"--data_on_device yes, but {why_not}; or pass --data_on_device no")
    if choice != "auto":
        return choice == "yes"
    wanted = device.type == "cuda" and not exists(why_not)
    if recorded is False and wanted:
        logger.info("--data_on_device auto: batches drawn on the host, as the run being resumed drew them")
        return False
    if recorded and not wanted:
        logger.warning(
            "--data_on_device auto: the run being resumed drew its batches on the device, but now %s; the batches"
            " from here on differ from the interrupted run's",
            why_not or "there is no GPU",
        )
    if exists(why_not) and device.type == "cuda":
        logger.info("data stays on the host: %s", why_not)
    return wanted


def resident_batches(
    table: ImageTable,
    conditioner: CachedEmbeddings,
    source: IndexedBatches,
    data: DataConfig,
    dropout_prob: float,
    channels_last: bool,
) -> ResidentBatches:
    """The source's micro-batches drawn on the device: the decoded images copied to the conditioner's device,
    where its embedding table is, and the caption rows."""
    device = conditioner.device
    shape = next(image for image in table.cache if exists(image)).shape
    images = torch.zeros(len(table.cache), *shape, dtype=torch.uint8, device=device)
    for start in range(0, len(table.cache), COPY_CHUNK):
        chunk = [
            image if exists(image) else torch.zeros(shape, dtype=torch.uint8)
            for image in table.cache[start : start + COPY_CHUNK]
        ]
        images[start : start + len(chunk)] = to_device(torch.stack(chunk), device)
    logger.info(
        "data on the device: %d images (%.1f MiB) and %d caption embeddings (%.1f MiB); batches drawn there",
        len(table.usable_rows),
        images.numel() / 2**20,
        len(conditioner.table),
        conditioner.table.numel() * conditioner.table.element_size() / 2**20,
    )
    return ResidentBatches(
        images=images,
        captions=caption_rows(table.caption_options, conditioner.row_of, data).to(device),
        source=source,
        data=data,
        dropout_prob=dropout_prob,
        channels_last=channels_last,
    )
