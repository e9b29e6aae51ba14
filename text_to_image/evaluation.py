"""Checks of a run: the held-out loss, copies of training images, and FD/KID/CLIP sample-quality metrics."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline_text_to_image import FLOW_MATCHING, make_captioned_grid, prediction_type_of, unaugmented_labels
from text_to_image.common import UserError, exists, to_device
from text_to_image.config import COPY_PERCENTILE, VALIDATION_BUCKETS, EvalConfig
from text_to_image.data import ImageTable, stand_in_for_unreadable
from text_to_image.loss import LossWeighting, bucket_names, weighted_losses
from text_to_image.metrics import CLIP_SCORE, COPY_RATE, COPY_THRESHOLD, FD, KID, NEAREST_DISTANCE, VAL_LOSS

VALIDATION_SPLIT_SEED = 20261126  # held-out rows depend on the data only, not on --seed: runs compare
COPY_PROBES = 2000  # training images whose nearest neighbour calibrates the copy threshold
EVALUATION_LOG = "evaluation.jsonl"  # one line per evaluation, in --output_dir
BEST_DIR = "best"  # --keep_best's pipeline, in --output_dir
VALIDATION_CHUNK = 32  # held-out images per validation forward pass (fixes the noise draws too)
NEAREST_CHUNK = 256  # samples compared with the training images at once
FEATURE_CHUNK = 32  # images per feature-model forward pass
RANK_TIE_TOLERANCE = 1e-9  # summed squared distances closer than this are equal (float64 rounding is ~1e-13)


def centre_crop(image: torch.Tensor, resolution: int) -> torch.Tensor:
    top, left = (image.shape[1] - resolution) // 2, (image.shape[2] - resolution) // 2
    return image[:, top : top + resolution, left : left + resolution]


def on_white(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB of a uint8 image, RGBA (--alpha_background random) composited on white as evaluation shows it."""
    if image.shape[0] == 3:
        return image
    alpha = image[3:].float() / 255
    return (image[:3].float() * alpha + 255 * (1 - alpha)).round().to(torch.uint8)


def centre_crops(table: ImageTable, rows: list[int], resolution: int) -> tuple[torch.Tensor, list[int]]:
    """uint8 [N, 3, R, R]: the rows' images cropped at the centre, decoded again where they are not cached;
    and the row each image is of, to caption it by (an image unreadable since the start is stood in for)."""
    if not rows:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8), []
    images = [table.cache[row] if exists(table.cache) else table.decoder[row][1] for row in rows]
    images, rows = stand_in_for_unreadable(images, rows)
    return torch.stack([on_white(centre_crop(image, resolution)) for image in images]), rows


@dataclass(frozen=True, kw_only=True)
class ValidationSet:
    """Held-out images at the training resolution (centre crops) and one caption each (their first)."""

    pixels: torch.Tensor  # uint8 [N, 3, R, R], on the CPU
    captions: list[str]

    @classmethod
    def from_table(cls, table: ImageTable, rows: list[int], resolution: int) -> ValidationSet:
        pixels, rows = centre_crops(table, rows, resolution)
        return cls(pixels=pixels, captions=[table.caption_options[row][0] for row in rows])


def fixed_noise(chunk: int, bucket: int, shape: tuple[int, ...], num_train_timesteps: int, flow: bool = False):
    """The validation noise and timesteps of one chunk of held-out images in one bucket: the same every call.
    `flow`: flow matching's float timesteps t * num_train_timesteps, t anywhere in the bucket's tenth of [0, 1)."""
    generator = torch.Generator().manual_seed(VALIDATION_SPLIT_SEED + 1_000_003 * bucket + chunk)
    low = bucket * num_train_timesteps // VALIDATION_BUCKETS
    high = (bucket + 1) * num_train_timesteps // VALIDATION_BUCKETS
    noise = torch.randn(shape, generator=generator)
    if flow:
        t = (bucket + torch.rand(shape[0], generator=generator)) / VALIDATION_BUCKETS
        return noise, t * num_train_timesteps
    return noise, torch.randint(low, high, (shape[0],), generator=generator)


@torch.no_grad()
def validation_losses(
    unet, noise_scheduler, validation: ValidationSet, embed, weighting: LossWeighting, device
) -> list[float]:
    """The training loss (same weighting) on the held-out images, one mean per timestep bucket.

    Noise and timesteps are fixed (fixed_noise), so the same weights give the same numbers on every call
    and after a resume; the plain mean over buckets estimates the loss at uniform timesteps, as trained.
    """
    num_timesteps = noise_scheduler.config.num_train_timesteps
    flow = prediction_type_of(noise_scheduler.config) == FLOW_MATCHING
    totals = [0.0] * VALIDATION_BUCKETS
    for chunk, start in enumerate(range(0, len(validation.captions), VALIDATION_CHUNK)):
        pixels = validation.pixels[start : start + VALIDATION_CHUNK]
        clean = to_device(pixels, device).float().div_(127.5).sub_(1.0)
        text = embed(validation.captions[start : start + VALIDATION_CHUNK])  # once per chunk, for every bucket
        labels = unaugmented_labels(unet, len(pixels), device, torch.float32).get("class_labels")
        for bucket in range(VALIDATION_BUCKETS):
            noise, timesteps = fixed_noise(chunk, bucket, tuple(pixels.shape), num_timesteps, flow)
            losses = weighted_losses(
                unet, noise_scheduler, clean, noise.to(device), timesteps.to(device), text, weighting, labels
            )
            totals[bucket] += losses.double().sum().item()
    return [total / len(validation.captions) for total in totals]


def pixel_rows(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, R, R] -> [N, 3 R R] in [0, 1]."""
    return images.reshape(len(images), -1).to(dtype).div_(255)


def squared_distance_chunks(
    queries: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, summed squared pixel distances [chunk, N]) of uint8 queries to uint8 reference images, NEAREST_CHUNK
    queries at a time (a 2,000-image reference at 64 px would otherwise need GBs at once)."""
    queries, reference = pixel_rows(queries, dtype), pixel_rows(reference, dtype)
    reference_norms = reference.pow(2).sum(1)
    for start in range(0, len(queries), NEAREST_CHUNK):
        chunk = queries[start : start + NEAREST_CHUNK]
        yield start, chunk.pow(2).sum(1, keepdim=True) + reference_norms - 2 * chunk @ reference.T


def nearest_neighbours(
    queries: torch.Tensor, reference: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS pixel distance in [0, 1], index) of each query's nearest reference image; `exclude[i]` is a
    reference index query i may not match (itself, for leave-one-out)."""
    distances, indices = [], []
    for start, squared in squared_distance_chunks(queries, reference):
        if exists(exclude):
            squared[torch.arange(len(squared)), exclude[start : start + NEAREST_CHUNK]] = float("inf")
        best = squared.min(dim=1)
        distances.append(best.values.clamp_(min=0).div_(reference[0].numel()).sqrt_())
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)


def retrieval_ranks(samples: torch.Tensor, reference: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Caption retrieval: the rank (1 = nearest) of each sample's own training image `own[i]` among all the
    reference images, by pixel distance; ties (a training image twice, under two names) count in the sample's favour.

    In float64: two images one uint8 level apart in one pixel differ by 1.5e-5 in the sum, which float32's rounding
    of |a|^2 + |b|^2 - 2ab over thousands of pixels would hide."""
    ranks = []
    for start, squared in squared_distance_chunks(samples, reference, torch.float64):
        rows = torch.arange(len(squared))
        own_distance = squared[rows, own[start : start + NEAREST_CHUNK]]
        ranks.append((squared < own_distance[:, None] - RANK_TIE_TOLERANCE).sum(1) + 1)
    return torch.cat(ranks)


def caption_effect(samples: torch.Tensor) -> float:
    """How far a caption moves a sample, against how far the noise does: uint8 samples [captions, noises, 3, R, R],
    each noise shared by every caption. The mean RMS distance between captions drawn from one noise over that
    between noises drawn for one caption: near 0 when the UNet ignores its text, about 1 when it matters as much
    as the noise."""
    pixels = samples.flatten(2).float().div_(255)  # [captions, noises, D]
    between_captions = mean_pairwise_distance(pixels.transpose(0, 1))
    between_noises = mean_pairwise_distance(pixels)
    return between_captions / max(between_noises, 1e-12)


def mean_pairwise_distance(groups: torch.Tensor) -> float:
    """The mean RMS distance between the members of each group [groups, members, D], over every pair of every group."""
    distances = torch.cdist(groups.double(), groups.double()) / groups.shape[-1] ** 0.5
    pairs = torch.triu_indices(groups.shape[1], groups.shape[1], offset=1)
    return distances[:, pairs[0], pairs[1]].mean().item()


def copy_threshold(images: torch.Tensor) -> float:
    """COPY_PERCENTILE of the training images' distances to their nearest other training image (up to
    COPY_PROBES fixed probes): a sample nearer than that to a training image is counted as a copy."""
    if len(images) < 2:
        return 0.0
    probes = torch.randperm(len(images), generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED))
    probes = probes[:COPY_PROBES]
    distances, _ = nearest_neighbours(images[probes], images, exclude=probes)
    return float(np.percentile(distances.numpy(), COPY_PERCENTILE))


@dataclass(frozen=True, kw_only=True)
class TrainingReference:
    """The training images at the training resolution, for nearest-neighbour checks and FD/KID."""

    images: torch.Tensor  # uint8 [N, 3, R, R] centre crops
    captions: list[str]  # first caption of each
    copy_threshold: float

    @classmethod
    def from_table(cls, table: ImageTable, resolution: int) -> TrainingReference:
        images, rows = centre_crops(table, table.usable_rows.tolist(), resolution)
        return cls(
            images=images,
            captions=[table.caption_options[row][0] for row in rows],
            copy_threshold=copy_threshold(images),
        )

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def memorization(self, samples: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Copy rate and nearest distances of uint8 samples [M, 3, R, R]: (metrics, distances, indices)."""
        distances, indices = nearest_neighbours(samples, self.images)
        metrics = {
            COPY_RATE.logged: (distances <= self.copy_threshold).float().mean().item(),
            NEAREST_DISTANCE.logged: distances.median().item(),
            COPY_THRESHOLD.logged: self.copy_threshold,
        }
        return metrics, distances, indices


def to_uint8_batch(images, resolution: int) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, R, R] (resized when the pipeline was asked for another size)."""
    arrays = [np.asarray(image.convert("RGB").resize((resolution, resolution))) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]


def write_nearest_strip(samples, prompts, reference: TrainingReference, distances, indices, path: Path) -> Path:
    """samples/nearest-STEP.png: each sample (its prompt) beside its nearest training image (distance, caption)."""
    cells, captions = [], []
    for sample, prompt, distance, index in zip(samples, prompts, distances.tolist(), indices.tolist(), strict=True):
        copied = " COPY," if distance <= reference.copy_threshold else ""
        cells += [sample, to_pil(reference.images[index : index + 1])[0]]
        captions += [prompt, f"d={distance:.3f}{copied} {reference.captions[index]}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_captioned_grid(cells, captions, columns=8).save(path)
    return path


def load_eval_model(flag: str, name_or_path: str, processor_class, model_class, device, cache_dir: str | None):
    """(processor, model in eval mode on `device`) of a --eval_* flag; one line naming the flag if it fails."""
    try:
        processor = processor_class.from_pretrained(name_or_path, cache_dir=cache_dir)
        model = model_class.from_pretrained(name_or_path, cache_dir=cache_dir).eval().to(device)
    except OSError as error:
        raise UserError(f"--{flag} {name_or_path}: could not be loaded ({error})") from error
    return processor, model


class ImageFeatures:
    """Image features from a transformers model (DINOv2 recommended): pooled output, or mean over tokens."""

    def __init__(self, name_or_path: str, device: torch.device, cache_dir: str | None = None):
        from transformers import AutoImageProcessor, AutoModel

        self.processor, self.model = load_eval_model(
            "eval_feature_model", name_or_path, AutoImageProcessor, AutoModel, device, cache_dir
        )
        self.device = device

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        features = []
        for start in range(0, len(images), FEATURE_CHUNK):
            inputs = self.processor(images=images[start : start + FEATURE_CHUNK], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device)
            if hasattr(self.model, "get_image_features"):  # a CLIP-like model given as the feature model
                output = self.model.get_image_features(pixel_values=pixels)
                output = output if isinstance(output, torch.Tensor) else output.pooler_output
            else:
                output = self.model(pixel_values=pixels)
                pooled = getattr(output, "pooler_output", None)
                output = pooled if exists(pooled) else output.last_hidden_state.mean(dim=1)
            features.append(output.double().cpu())
        return torch.cat(features)


class ClipScore:
    """Prompt alignment: 100 x the cosine of CLIP's image and text embeddings, floored at 0, averaged."""

    def __init__(self, name_or_path: str, device: torch.device, cache_dir: str | None = None):
        from transformers import AutoProcessor, CLIPModel

        self.processor, self.model = load_eval_model(
            "eval_clip_model", name_or_path, AutoProcessor, CLIPModel, device, cache_dir
        )
        self.device = device

    @torch.no_grad()
    def __call__(self, images, texts: list[str]) -> float:
        scores = []
        for start in range(0, len(images), FEATURE_CHUNK):
            inputs = self.processor(
                text=texts[start : start + FEATURE_CHUNK],
                images=images[start : start + FEATURE_CHUNK],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            output = self.model(**inputs)
            scores.append((100 * (output.image_embeds * output.text_embeds).sum(-1)).clamp(min=0).double().cpu())
        return torch.cat(scores).mean().item()


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 (symmetric form: no complex sqrtm)."""
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def kernel_inception_distance(
    features_a: torch.Tensor, features_b: torch.Tensor, subset_size: int = 1000, subsets: int = 100
) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (Binkowski et al. 2018), averaged over
    random subsets of `subset_size`; sets no larger than that are compared whole, once."""
    a, b = features_a.double(), features_b.double()
    size = min(len(a), len(b), subset_size)
    whole = len(a) == len(b) == size
    generator = torch.Generator().manual_seed(VALIDATION_SPLIT_SEED)
    estimates = []
    for _ in range(1 if whole else subsets):
        x = a if whole else a[torch.randperm(len(a), generator=generator)[:size]]
        y = b if whole else b[torch.randperm(len(b), generator=generator)[:size]]
        dimension = x.shape[1]
        k_xx, k_yy, k_xy = ((p @ q.T / dimension + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off_diagonal = size * (size - 1)
        estimates.append(
            (k_xx.sum() - k_xx.diagonal().sum()) / off_diagonal
            + (k_yy.sum() - k_yy.diagonal().sum()) / off_diagonal
            - 2 * k_xy.mean()
        )
    return torch.stack(estimates).mean().item()


class SampleQuality:
    """FD and KID against training images and the CLIP score, on images generated for the captions of
    fixed training rows (the same rows, prompts and seeds at every evaluation)."""

    def __init__(self, *, table: ImageTable, config: EvalConfig, resolution: int, device, cache_dir: str | None):
        generator = torch.Generator().manual_seed(VALIDATION_SPLIT_SEED)
        usable = table.usable_rows
        if len(usable) >= config.eval_num_images:
            chosen = usable[torch.randperm(len(usable), generator=generator)[: config.eval_num_images]]
        else:
            chosen = usable[torch.randint(len(usable), (config.eval_num_images,), generator=generator)]
        self.rows = chosen.tolist()
        self.prompts = [table.caption_options[row][0] for row in self.rows]
        self.features = (
            ImageFeatures(config.eval_feature_model, device, cache_dir) if config.eval_feature_model else None
        )
        self.clip = ClipScore(config.eval_clip_model, device, cache_dir) if config.eval_clip_model else None
        self.real_features = None
        if exists(self.features):
            self.real_features = self.features(to_pil(centre_crops(table, self.rows, resolution)[0]))

    def measure(self, images) -> dict:
        metrics = {}
        if exists(self.features):
            generated = self.features(images)
            metrics[FD.logged] = frechet_distance(generated, self.real_features)
            metrics[KID.logged] = kernel_inception_distance(generated, self.real_features)
        if exists(self.clip):
            metrics[CLIP_SCORE.logged] = self.clip(images, self.prompts)
        return metrics


@dataclass(frozen=True)
class Due:
    """What an evaluation at this step includes."""

    grid: bool = False
    validation: bool = False
    quality: bool = False

    def __bool__(self) -> bool:
        return self.grid or self.validation or self.quality


class EvaluationLog:
    """OUTPUT_DIR/evaluation.jsonl: one line of metrics per evaluation, kept in step with the checkpoints."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / EVALUATION_LOG

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_until(self, step: int) -> None:
        """Drop the lines of steps after `step`: a resumed run evaluates them again."""
        kept = [record for record in self.records() if record["step"] <= step]
        if kept or self.path.exists():
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def newest_values(records: list[dict]) -> dict[str, tuple[int, float]]:
    """Each metric's newest value and its step: a grid's record has no val/loss, a validation's no copy rate."""
    return {name: (record["step"], value) for record in records for name, value in record.items() if "/" in name}


def metrics_table(values: dict[str, tuple[int, float]]) -> str:
    """The model card's evaluation section: each metric's value and the step it was measured at."""
    if not values:
        return ""
    rows = "".join(f"| {name} | {value:.6g} | {step} |\n" for name, (step, value) in values.items())
    return f"\n## Evaluation\n\n| metric | value | at step |\n|---|---|---|\n{rows}"


@dataclass(frozen=True, kw_only=True)
class Checks:
    """The run's evaluation material, on the main process (None elsewhere, and when turned off)."""

    validation: ValidationSet | None
    reference: TrainingReference | None  # for --memorization_check
    quality: SampleQuality | None  # for --eval_feature_model / --eval_clip_model
    embed: Callable[[list[str]], torch.Tensor]  # captions -> text embeddings, as in training
    weighting: LossWeighting  # the training loss's, so that val/loss measures what training optimizes
    keep_best: str | None

    def validate(self, unet, noise_scheduler) -> dict:
        """val/loss (the mean over timestep buckets) and val/loss_tSTART per bucket."""
        if not exists(self.validation):
            return {}
        device = next(unet.parameters()).device
        per_bucket = validation_losses(unet, noise_scheduler, self.validation, self.embed, self.weighting, device)
        names = bucket_names("val", noise_scheduler.config.num_train_timesteps)
        return {VAL_LOSS.logged: sum(per_bucket) / len(per_bucket)} | dict(zip(names, per_bucket, strict=True))


@contextlib.contextmanager
def eval_mode(unet, text_encoder) -> Iterator[None]:
    """No dropout (a trained T5/BERT has some) and no autograd while evaluating; training modes restored."""
    text_was_training = exists(text_encoder) and text_encoder.training
    unet.eval()
    if exists(text_encoder):
        text_encoder.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        unet.train()
        if text_was_training:
            text_encoder.train()
