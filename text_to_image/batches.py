"""One micro-batch's random draws and what they do: which caption each image trains with (variants,
sides), the crop and flip, and --augment_prob's transforms. The order of the draws is draw_batch's contract.

The trainer takes its micro-batches from a MicroBatches: HostBatches here, which applies the draws on the host,
or resident.ResidentBatches (--data_on_device), which applies the same draws on the device."""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from text_to_image.common import CPU, exists, to_device
from text_to_image.config import CaptionVariants, DataConfig
from text_to_image.data import BatchSource, Shard

SIDE_WORDS = re.compile(r"\b(left|right)(?=\b|ward|most|side|hand)", re.IGNORECASE)
AUGMENT_TRANSFORM_PROB = 0.5  # an augmented image gets each of the five transforms with this probability
AUGMENT_MAX_ROTATION = math.pi / 12  # radians
AUGMENT_MAX_SHIFT = 0.125  # of the side, rounded to whole pixels


# --augment_prob: the conditioning vector's entries, zero for an untouched image, and the transforms' ranges
AUGMENT_LABELS = (
    "x_flip",
    "quarter_turn_sin",
    "quarter_turn_cos_minus_1",
    "rotation",
    "log2_scale",
    "shift_x",
    "shift_y",
)


AUGMENT_LOG2_SCALE_STD = 0.2


@dataclass(frozen=True, kw_only=True)
class AugmentDraws:
    """--augment_prob: each example's transform; all zero / False for an untouched one."""

    x_flip: torch.Tensor  # bool
    quarter_turns: torch.Tensor  # long, 0-3 (clockwise as displayed: y points down)
    rotation: torch.Tensor  # radians (clockwise as displayed)
    log2_scale: torch.Tensor
    shift: torch.Tensor  # [N, 2] (x, y) as fractions of the side, rounded to whole pixels when applied


def draw_augmentation(shard: Shard, augment_prob: float, device: torch.device = CPU) -> AugmentDraws:
    """Which examples are augmented and their transforms (for draw_batch: a fixed count of draws)."""
    total = shard.total
    augmented = torch.rand(total, device=device) < augment_prob
    applied = (torch.rand(total, 5, device=device) < AUGMENT_TRANSFORM_PROB) & augmented[:, None]
    quarter_turns = 1 + (torch.rand(total, device=device) * 3).long().clamp(max=2)
    rotation = (torch.rand(total, device=device) * 2 - 1) * AUGMENT_MAX_ROTATION
    log2_scale = torch.randn(total, device=device) * AUGMENT_LOG2_SCALE_STD
    shift = (torch.rand(total, 2, device=device) * 2 - 1) * AUGMENT_MAX_SHIFT
    return AugmentDraws(
        x_flip=shard.of(applied[:, 0]),
        quarter_turns=shard.of(torch.where(applied[:, 1], quarter_turns, 0)),
        rotation=shard.of(torch.where(applied[:, 2], rotation, 0.0)),
        log2_scale=shard.of(torch.where(applied[:, 3], log2_scale, 0.0)),
        shift=shard.of(torch.where(applied[:, 4:5], shift, 0.0)),
    )


@dataclass(frozen=True, kw_only=True)
class BatchDraws:
    """Every random number one micro-batch needs before the loss draws its noise and timesteps."""

    caption_choice: torch.Tensor  # [0, 1) per example: which of its captions
    dropped: torch.Tensor  # bool per example: shown with the empty caption
    crop_at: torch.Tensor  # (top, left) as fractions of the spare pixels
    flip: torch.Tensor | None
    variant_choice: torch.Tensor | None = None  # [0, 1) per example: which variant of its caption
    augment: AugmentDraws | None = None
    background: torch.Tensor | None = None  # [N, 3] in [0, 1]: the flat colour behind transparent pixels


def draw_batch(
    shard: Shard,
    *,
    dropout_prob: float,
    center_crop: bool,
    random_flip: bool,
    caption_variants: bool = False,
    augment_prob: float = 0.0,
    random_background: bool = False,
    device: torch.device = CPU,
) -> BatchDraws:
    """The micro-batch's random numbers, from the global RNG of `device` (the CPU's, or the GPU's for
    --data_on_device), in a fixed order.

    The ordering contract that exact resume and "N processes = 1 process" rest on: per micro-batch,
    this function draws first (caption choice, dropout, crop, flip, then when turned on caption variant,
    augmentation, background; each for the whole global batch, then sliced to this process's shard), then
    `loss.diffusion_losses` draws noise, noise offset, timesteps and input perturbation, and nothing else in the
    step draws from the global RNG (data loaders own their generators). A draw added anywhere else, or
    moved, changes every later batch of a run and breaks both guarantees without failing; add new draws
    here, at the end, and only when their flag is on, so that runs without it keep their batches.
    """
    total = shard.total
    caption_choice = shard.of(torch.rand(total, device=device))
    dropped = shard.of(torch.rand(total, device=device)) < dropout_prob
    crop_at = shard.of(
        torch.full((total, 2), 0.5, device=device) if center_crop else torch.rand(total, 2, device=device)
    )
    flip = shard.of(torch.rand(total, device=device) < 0.5) if random_flip else None
    variant_choice = shard.of(torch.rand(total, device=device)) if caption_variants else None
    augment = draw_augmentation(shard, augment_prob, device) if augment_prob > 0 else None
    background = shard.of(torch.rand(total, 3, device=device)) if random_background else None
    return BatchDraws(
        caption_choice=caption_choice,
        dropped=dropped,
        crop_at=crop_at,
        flip=flip,
        variant_choice=variant_choice,
        augment=augment,
        background=background,
    )


def draws_for(shard: Shard, data: DataConfig, dropout_prob: float, device: torch.device = CPU) -> BatchDraws:
    """draw_batch with the draws `data`'s flags turn on: one call for the host path and --data_on_device alike,
    so that a draw added for a flag reaches both."""
    return draw_batch(
        shard,
        dropout_prob=dropout_prob,
        center_crop=data.center_crop,
        random_flip=data.random_flip,
        caption_variants=exists(data.tag_variants),
        augment_prob=data.augment_prob,
        random_background=data.alpha_background == "random",
        device=device,
    )


def crop_offset(share, spare: int):
    """The top (or left) edge at `share` in [0, 1) of spare + 1 positions, before truncating to an integer (a share
    rounding up to 1 still lands on the last); a Python float or a float64 tensor alike, so both paths agree."""
    return share * (spare + 1 - 1e-6)


def share_index(share: float, count: int) -> int:
    """The index at `share` in [0, 1) of `count` options (a share rounding up to 1 still gives the last)."""
    return min(int(share * count), count - 1)


def pick(options: list, share: float):
    """The option at `share` in [0, 1) of the list."""
    return options[share_index(share, len(options))]


def caption_variant(caption: str, index: int, variants: CaptionVariants) -> str:
    """Variant `index` of a caption: its tags after the kept ones shuffled and/or dropped, by a generator
    seeded with (index, caption), so every process, run and resume makes the same K variants."""

    tags = [tag.strip() for tag in caption.split(variants.separator)]
    tags = [tag for tag in tags if tag]
    kept, rest = tags[: variants.keep_tokens], tags[variants.keep_tokens :]
    if not rest:
        return caption
    generator = random.Random(f"{index}\0{caption}")  # str seeds hash with sha512: stable across processes
    if variants.shuffle:
        generator.shuffle(rest)
    survivors = [tag for tag in rest if generator.random() >= variants.tag_dropout]
    if not survivors and not kept:  # one tag always stays: an empty caption is the unconditional one
        survivors = [rest[0]]
    joiner = variants.separator if variants.separator.isspace() else variants.separator.strip() + " "
    return joiner.join(kept + survivors)


def caption_variants_of(caption: str, variants: CaptionVariants | None) -> list[str]:
    """The texts a caption is shown as in training (itself when there are no variants)."""
    if not exists(variants) or not caption:
        return [caption]
    return [caption_variant(caption, index, variants) for index in range(variants.count)]


def pick_variant(caption: str, share: float, variants: CaptionVariants | None) -> str:
    """The variant at `share` in [0, 1) of caption_variants_of(caption), made alone (not all K per showing)."""
    if not exists(variants) or not caption:
        return caption
    return caption_variant(caption, share_index(share, variants.count), variants)


def says_side(caption: str) -> bool:
    return bool(SIDE_WORDS.search(caption))


def swap_sides(caption: str) -> str:
    """'left' <-> 'right' (also in leftward, rightmost, ...), keeping each word's case."""

    def swapped(match: re.Match) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return SIDE_WORDS.sub(swapped, caption)


def training_texts(captions: list[str], data: DataConfig) -> list[str]:
    """Every text a caption can be shown as (its variants, mirrored ones with sides swapped), for the cache."""
    texts = {}
    for caption in captions:
        for variant in caption_variants_of(caption, data.tag_variants):
            texts[variant] = None
            if data.mirrors and data.flip_sided_captions == "swap" and says_side(variant):
                texts[swap_sides(variant)] = None
    return list(texts)


def mirrored(draws: BatchDraws) -> torch.Tensor | None:
    """Per example, whether it is shown mirrored: flipped once, by --random_flip or the augmentation's x-flip."""
    flips = [flip for flip in (draws.flip, draws.augment.x_flip if exists(draws.augment) else None) if exists(flip)]
    return functools.reduce(torch.logical_xor, flips) if flips else None


def without_mirroring(draws: BatchDraws, keep: torch.Tensor) -> BatchDraws:
    """The draws with no flip where `keep` is False (--flip_sided_captions no_flip)."""
    flip = draws.flip & keep if exists(draws.flip) else None
    augment = draws.augment
    if exists(augment):
        augment = dataclasses.replace(augment, x_flip=augment.x_flip & keep)
    return dataclasses.replace(draws, flip=flip, augment=augment)


def choose_captions(
    caption_options: list[list[str]], draws: BatchDraws, variants: CaptionVariants | None = None
) -> list[str]:
    """One caption per example, picked among its list, then among its variants; the empty one where dropped
    (classifier-free guidance)."""
    captions = [
        "" if drop else pick(options, share)
        for options, share, drop in zip(
            caption_options, draws.caption_choice.tolist(), draws.dropped.tolist(), strict=True
        )
    ]
    if not exists(draws.variant_choice):
        return captions
    return [
        pick_variant(caption, share, variants)
        for caption, share in zip(captions, draws.variant_choice.tolist(), strict=True)
    ]


def mind_the_sides(captions: list[str], draws: BatchDraws, policy: str) -> tuple[list[str], BatchDraws]:
    """Mirrored images whose caption says left or right: the words swapped (policy "swap") or the image left
    unmirrored ("no_flip"), so flips do not teach that left looks like right. (captions, draws as applied)"""
    flips = mirrored(draws)
    if not exists(flips):
        return captions, draws
    sided = torch.tensor([says_side(caption) for caption in captions], dtype=torch.bool)
    if policy == "no_flip":
        return captions, without_mirroring(draws, ~sided)
    return [swap_sides(text) if flip else text for text, flip in zip(captions, flips.tolist(), strict=True)], draws


def crop_and_flip(
    images: list[torch.Tensor],
    resolution: int,
    crop_at: torch.Tensor,
    flip: torch.Tensor | None,
    device: torch.device = CPU,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """A float batch [N, 3, R, R] in [-1, 1] on `device`; crop_at holds (top, left) as fractions of the spare
    pixels; RGBA images are composited on `background` ([N, 3] in [0, 1]). The batch crosses to the device as
    uint8 (a quarter of the float bytes) and is scaled there."""
    crops = []
    for image, (top_share, left_share) in zip(images, crop_at.tolist(), strict=True):
        spare_h, spare_w = image.shape[1] - resolution, image.shape[2] - resolution
        top, left = int(crop_offset(top_share, spare_h)), int(crop_offset(left_share, spare_w))
        crops.append(image[:, top : top + resolution, left : left + resolution])
    return flipped_in_unit_range(to_device(torch.stack(crops), device), flip, background)


def flipped_in_unit_range(
    batch: torch.Tensor, flip: torch.Tensor | None, background: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [N, C, R, R] as float [N, 3, R, R] in [-1, 1]: mirrored where `flip`, RGBA composited on `background`
    ([N, 3] in [0, 1]; white when None). The host path and --data_on_device both end here."""
    if exists(flip):
        batch = torch.where(to_device(flip, batch.device)[:, None, None, None], batch.flip(-1), batch)
    batch = batch.float()
    if batch.shape[1] == 4:
        alpha = batch[:, 3:] / 255.0
        colour = background if exists(background) else torch.ones(len(batch), 3, device=batch.device)
        colour = to_device(colour, batch.device) * 255.0
        batch = batch[:, :3] * alpha + colour[:, :, None, None] * (1 - alpha)
    return batch.div_(127.5).sub_(1.0)


def quarter_turn_sin_cos(turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sine and cosine of 0-3 quarter turns, exact (entries 0 and +-1: no rounding of pi / 2), made where `turns`
    is without a constant copied from the host (which a CUDA graph cannot hold)."""
    sin = (turns == 1).float() - (turns == 3).float()
    cos = (turns == 0).float() - (turns == 2).float()
    return sin, cos


def augmentation_labels(augment: AugmentDraws, resolution: int) -> torch.Tensor:
    """The conditioning vector [N, len(AUGMENT_LABELS)] of each example's transform: exactly zero when untouched."""
    sin, cos = quarter_turn_sin_cos(augment.quarter_turns)
    shift_pixels = torch.round(augment.shift * resolution)
    return torch.stack(
        [
            augment.x_flip.float(),
            sin,
            cos - 1,
            augment.rotation,
            augment.log2_scale,
            shift_pixels[:, 0] / resolution,
            shift_pixels[:, 1] / resolution,
        ],
        dim=1,
    )


def sampling_grids(augment: AugmentDraws, resolution: int) -> torch.Tensor:
    """affine_grid's [N, 2, 3]: for each output pixel, where in the input it comes from. The image is
    mirrored, turned, rotated, scaled and shifted, in that order; the grid is that map's inverse."""
    count = len(augment.x_flip)
    sin, cos = quarter_turn_sin_cos(augment.quarter_turns)
    turn = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    angle = augment.rotation
    rotate = torch.stack([torch.stack([angle.cos(), -angle.sin()], 1), torch.stack([angle.sin(), angle.cos()], 1)], 1)
    mirror = torch.stack([torch.where(augment.x_flip, -1.0, 1.0), torch.ones(count, device=angle.device)], dim=1)
    # inverse of shift . scale . rotate . turn . mirror: mirror^-1 = mirror, R^-1 = R^T
    inverse = torch.diag_embed(mirror) @ turn.transpose(1, 2) @ rotate.transpose(1, 2)
    inverse = inverse / (2.0**augment.log2_scale)[:, None, None]
    shift = torch.round(augment.shift * resolution) * 2 / resolution  # pixels in [-1, 1] coordinates
    return torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)


def augment_pixels(pixels: torch.Tensor, augment: AugmentDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """--augment_prob: (the batch transformed where drawn, its conditioning labels). Untouched images are kept
    bit for bit; the others are resampled bilinearly, reflecting at the borders (EDM's choice)."""
    resolution = pixels.shape[-1]
    labels = augmentation_labels(augment, resolution)
    changed = labels.ne(0).any(dim=1)
    # asking whether any changed waits for a GPU that drew them (--data_on_device), and breaks a traced or captured
    # step: there the batch is always resampled (the where keeps untouched images all the same)
    if changed.device.type == "cpu" and not torch.compiler.is_compiling() and not changed.any():
        return pixels, labels
    grids = F.affine_grid(
        sampling_grids(augment, resolution).to(pixels.device), list(pixels.shape), align_corners=False
    )
    moved = F.grid_sample(pixels, grids, mode="bilinear", padding_mode="reflection", align_corners=False)
    pixels = torch.where(to_device(changed, pixels.device)[:, None, None, None], moved, pixels)
    return pixels, to_device(labels, pixels.device)


# ---- the trainer's micro-batches


class MicroBatches(Protocol):
    """Where the trainer takes its micro-batches: drawn on the host (HostBatches) or on the device
    (resident.ResidentBatches), by draw_batch's draws in its order."""

    source: BatchSource  # the examples: their rows, what was skipped, their description
    shard: Shard

    def micro_batch(self, micro_index: int) -> tuple[torch.Tensor, list[str] | torch.Tensor, torch.Tensor | None]:
        """Pixels in [-1, 1] on the device, one caption each and the augmentation labels (None without
        --augment_prob), for this process's share of one global micro-batch. The captions are texts, or with
        --data_on_device rows of the caption-embedding table: the conditioner embeds either."""
        ...


class HostBatches:
    """Micro-batches drawn on the host: a batch source's examples, each captioned, cropped, flipped and
    augmented by its draws, then sent to the device."""

    def __init__(
        self,
        *,
        source: BatchSource,
        shard: Shard,
        data: DataConfig,
        dropout_prob: float,
        device: torch.device,
        channels_last: bool = False,
    ):
        self.source, self.shard, self.data, self.dropout_prob = source, shard, data, dropout_prob
        self.device, self.channels_last = device, channels_last

    def micro_batch(self, micro_index: int) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        data = self.data
        examples = self.source.examples(micro_index)
        draws = draws_for(self.shard, data, self.dropout_prob)
        captions = choose_captions(examples.caption_options, draws, data.tag_variants)
        captions, draws = mind_the_sides(captions, draws, data.flip_sided_captions)
        device = self.device
        pixels = crop_and_flip(examples.images, data.resolution, draws.crop_at, draws.flip, device, draws.background)
        labels = None
        if exists(draws.augment):
            pixels, labels = augment_pixels(pixels, draws.augment)
        return laid_out(pixels, self.channels_last), captions, labels


def laid_out(pixels: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The batch in the UNet's memory format (--channels_last)."""
    return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels
