"""What a run writes for people: sample grids and their GIF, the pipeline folder with its model card, the Hub upload."""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline_text_to_image import (
    FLOW_MATCHING,
    TextToImagePipeline,
    default_sampler,
    make_captioned_grid,
    make_sampling_scheduler,
)
from text_to_image.checkpoints import TrainState, save_pipeline
from text_to_image.common import exists, unwrap
from text_to_image.config import OutputConfig
from text_to_image.evaluation import (
    BEST_DIR,
    Checks,
    Due,
    EvaluationLog,
    caption_effect,
    eval_mode,
    metrics_table,
    newest_values,
    to_uint8_batch,
    write_nearest_strip,
)
from text_to_image.metrics import CAPTION_EFFECT, COPY_RATE, EVAL_COPY_RATE, KEEP_BEST
from text_to_image.models import build_text_encoder
from text_to_image.optimization import main_process_with_ema, unet_as_fp32

logger = logging.getLogger(__name__)

GIF_TRAILER = b";"
CAPTION_EFFECT_SHAPE = (4, 4)  # grid prompts x shared noises drawn for text/caption_effect at each validation


def build_pipeline(unet, text_encoder, tokenizer, noise_scheduler, text_max_length: int):
    scheduler = make_sampling_scheduler(default_sampler(noise_scheduler.config), noise_scheduler.config)
    pipeline = TextToImagePipeline(
        unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, text_max_length=text_max_length
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def choose_validation_prompts(requested: list[str] | None, captions: list[str], count: int, seed: int) -> list[str]:
    """The prompts for every grid of the run: the user's, or captions drawn once from the dataset."""
    if requested and len(requested) == 1 and Path(requested[0]).is_file():
        requested = [line.strip() for line in Path(requested[0]).read_text("utf-8-sig").splitlines() if line.strip()]
    if requested:
        return requested
    pool = [caption for caption in captions if caption] or [""]
    return random.Random(seed).sample(pool, min(count, len(pool)))


def shared_noise(prompts: int, per_prompt: int, resolution: int, seed: int) -> torch.Tensor:
    """Starting noise [prompts x per_prompt, 3, R, R] in the pipeline's order (prompt-major): the i-th image of
    every prompt starts from the same noise, so a column of a grid shows what the caption alone changes."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noises = torch.randn(per_prompt, 3, resolution, resolution, generator=generator)
    return noises.repeat(prompts, 1, 1, 1)


def sample_images(
    pipeline,
    prompts: list[str],
    num_images: int,
    steps: int,
    guidance: float,
    seed: int,
    embeddings=None,
    shared: bool = False,
):
    """PIL images, prompts repeated to fill num_images; a fixed seed so grids compare across epochs.

    `embeddings` (prompts', empty caption's) stand in for a text encoder that was freed after caching.
    `shared`: every prompt's images start from the same noises (shared_noise).
    """
    per_prompt = max(1, math.ceil(num_images / len(prompts)))
    generator = torch.Generator("cpu").manual_seed(seed)
    text = {"prompt": prompts}
    if exists(embeddings):
        prompt_embeds, empty = embeddings
        text = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": empty.expand(len(prompts), -1, -1)}
    resolution = pipeline.unet.config.sample_size
    latents = shared_noise(len(prompts), per_prompt, resolution, seed) if shared else None
    images = pipeline(
        **text,
        num_images_per_prompt=per_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        latents=latents,
    ).images
    captions = [prompt for prompt in prompts for _ in range(per_prompt)]
    return images[: max(num_images, len(prompts))], captions[: max(num_images, len(prompts))]


def write_grid(images, captions, samples_dir: Path, step: int, epoch: int) -> Path:
    """A captioned PNG grid, also appended to the run's animated GIF."""
    samples_dir.mkdir(parents=True, exist_ok=True)
    grid = make_captioned_grid(images, captions, columns=min(len(images), 8))
    path = samples_dir / f"epoch-{epoch:05d}-step-{step:07d}.png"
    grid.save(path)
    append_to_gif(samples_dir / "progress.gif", grid)
    return path


def gif_frame_bytes(image, delay_ms: int) -> bytes:
    """`image` as one GIF frame to append: its delay, then the image with its palette as a local colour table."""
    import io
    import struct

    encoded = io.BytesIO()
    image.save(encoded, format="GIF")
    single = encoded.getvalue()
    screen_flags = single[10]
    palette_bytes = 3 * 2 ** ((screen_flags & 0x07) + 1) if screen_flags & 0x80 else 0
    palette, position = single[13 : 13 + palette_bytes], 13 + palette_bytes
    while single[position] == 0x21:  # extension blocks: label, then data sub-blocks up to an empty one
        position += 2
        while single[position]:
            position += single[position] + 1
        position += 1
    descriptor = bytearray(single[position : position + 10])  # 0x2C, left, top, width, height, flags
    if not descriptor[9] & 0x80:  # no local table yet: the global one becomes it
        descriptor[9] |= 0x80 | (screen_flags & 0x07)
    else:
        palette = b""
    delay = b"\x21\xf9\x04\x00" + struct.pack("<H", delay_ms // 10) + b"\x00\x00"
    return delay + bytes(descriptor) + palette + single[position + 10 : -1]


def append_to_gif(path: Path, image, delay_ms: int = 500) -> None:
    """Append a frame in place: O(frame), not a re-encode of every earlier grid. A missing GIF, one of
    another frame size (another --eval_batch_size) or one cut short by a crash starts again from this frame."""
    import struct

    if path.is_file():
        with open(path, "r+b") as gif:
            header = gif.read(10)
            gif.seek(-1, os.SEEK_END)
            if header[:3] == b"GIF" and struct.unpack("<HH", header[6:10]) == image.size and gif.read(1) == GIF_TRAILER:
                gif.seek(-1, os.SEEK_END)
                gif.write(gif_frame_bytes(image, delay_ms) + GIF_TRAILER)
                return
    image.save(path, format="GIF", save_all=True, duration=delay_ms, loop=0)


def log_image(accelerator, tag: str, path: Path, step: int) -> None:
    from PIL import Image

    for tracker in accelerator.trackers:
        image = np.asarray(Image.open(path).convert("RGB"))
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, image[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=path.name)]}, step=step)


def tracker_config(flags: dict) -> dict:
    """The public flags trackers accept as hyperparameters (scalars only)."""
    return {key: value for key, value in flags.items() if isinstance(value, (int, float, str, bool))}


def objective_words(flags: dict) -> str:
    """What the UNet was trained to predict, as the model card names it."""
    if flags["prediction_type"] == FLOW_MATCHING:
        return f"flow matching: rectified flow, velocity target, timestep shift {flags.get('timestep_shift', 1.0):g}"
    return f"{flags['prediction_type']} prediction, {flags['ddpm_beta_schedule']} betas"


def training_images_line(flags: dict) -> str:
    """How the training images were shown: what a user must match to sample or fine-tune alike."""
    background = flags.get("alpha_background", "white")
    transparency = "a random flat colour per showing" if background == "random" else background
    line = f"Images resized with the {flags.get('resize_filter', 'bicubic')} filter, transparency on {transparency}"
    augment = flags.get("augment_prob", 0.0)
    if augment:
        line += (
            f"; {augment:g} of them augmented (flip, quarter turn, rotation, scale, shift) with the transform fed to"
            " the UNet's class embedding, zeros at sampling (the pipeline passes them)"
        )
    return line + "."


def model_card(
    flags: dict,
    prompts: list[str],
    state: TrainState,
    grid: Path | None,
    output_dir: Path,
    evaluation: dict[str, tuple[int, float]] | None = None,
) -> str:
    data = flags["dataset_name"] or flags["train_data_dir"]
    grid_line = (
        f"![samples]({grid.relative_to(output_dir).as_posix()})\n"
        if exists(grid) and grid.is_relative_to(output_dir)
        else ""
    )
    repo = flags["hub_model_id"] or output_dir
    return f"""---
library_name: diffusers
tags: [text-to-image, diffusion, pixel-space, train_text_to_image]
---
# {output_dir.name}

A pixel-space text-to-image diffusion model ({flags["resolution"]} px) trained from scratch with
`train_text_to_image.py` on `{data}` for {state.step} optimizer steps
({objective_words(flags)}, text encoder
`{flags["text_encoder_name_or_path"]}`{", trained jointly" if flags["train_text_encoder"] else ", frozen"}).
{training_images_line(flags)}

{grid_line}{metrics_table(evaluation or {})}
## Use

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{repo}", custom_pipeline="{repo}", trust_remote_code=True)
image = pipe("{prompts[0] if prompts and prompts[0] else "a prompt"}", guidance_scale={flags["guidance_scale"]}).images[0]
```

## Training flags

```json
{json.dumps(flags, indent=2, default=str)}
```
"""


def push_to_hub(output: OutputConfig, step: int) -> str:
    from huggingface_hub import create_repo, upload_folder

    repo_id = output.hub_model_id or output.output_dir.name
    repo_id = create_repo(repo_id, private=output.hub_private_repo, token=output.hub_token, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output.output_dir),
        token=output.hub_token,
        commit_message=f"train_text_to_image.py: step {step}",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", ".pipeline.*", "caption_cache/*", f"{output.logging_dir}/*"],
    )
    return repo_id


@dataclass(frozen=True, kw_only=True)
class GridConfig:
    prompts: list[str]
    prompt_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # (prompts, "") when the encoder was freed
    count: int
    num_inference_steps: int
    guidance_scale: float
    seed: int


class Outputs:
    """What a run writes besides checkpoints: sample grids, evaluations and the pipeline, with the EMA weights."""

    def __init__(
        self,
        *,
        accelerator,
        unet,
        ema,
        text_encoder,
        text_encoder_source: tuple[str, str | None],
        tokenizer,
        noise_scheduler,
        text_max_length: int,
        grids: GridConfig,
        output_dir: Path,
        public_flags: dict,
        checks: Checks,
    ):
        self.accelerator, self.unet, self.ema = accelerator, unet, ema
        self.text_encoder, self.text_encoder_source, self.tokenizer = text_encoder, text_encoder_source, tokenizer
        self.noise_scheduler, self.text_max_length = noise_scheduler, text_max_length
        self.grids, self.output_dir, self.public_flags = grids, output_dir, public_flags
        self.checks = checks
        self.log = EvaluationLog(output_dir)
        self.latest: dict[str, tuple[int, float]] = {}  # each metric's newest (step, value), main process

    def resume_log(self, step: int) -> None:
        """evaluation.jsonl as it was at `step` (a resumed run evaluates the later steps again)."""
        self.log.keep_until(step)
        self.latest = newest_values(self.log.records())

    def pipeline(self, unet, text_encoder):
        return build_pipeline(unet, text_encoder, self.tokenizer, self.noise_scheduler, self.text_max_length)

    def live_text_encoder(self):
        """The text encoder in use, or None when it was freed after caching the captions."""
        return unwrap(self.accelerator, self.text_encoder) if exists(self.text_encoder) else None

    def evaluate(self, state: TrainState, epoch: int, due: Due) -> Path | None:
        """What is due at this step (grid, validation loss, FD/KID), with the EMA weights, on the main process:
        written, logged, recorded in evaluation.jsonl and, with --keep_best, kept when best. The grid's path."""
        grid = None
        with main_process_with_ema(self.accelerator, self.unet, self.ema) as unet:
            if exists(unet):
                text_encoder = self.live_text_encoder()
                with eval_mode(unet, text_encoder), self.accelerator.autocast():
                    metrics = {}
                    if due.validation:
                        metrics |= self.checks.validate(unet, self.noise_scheduler)
                        metrics |= self.caption_effect(unet, text_encoder)
                    if due.grid:
                        grid, grid_metrics = self.grid(unet, text_encoder, state, epoch)
                        metrics |= grid_metrics
                    if due.quality:
                        metrics |= self.sample_quality(unet, text_encoder)
                if metrics:
                    self.record(unet, state, epoch, metrics, grid)
        return grid

    def sample(self, unet, text_encoder, prompts: list[str], count: int, seed: int, shared: bool = False):
        embeddings = None
        if not exists(text_encoder):  # freed after caching: the prompts' cached embeddings stand in
            embeddings = self.grids.prompt_embeddings
            if prompts is not self.grids.prompts:
                embeddings = (self.checks.embed(prompts), embeddings[1])
        return sample_images(
            self.pipeline(unet, text_encoder),
            prompts,
            count,
            self.grids.num_inference_steps,
            self.grids.guidance_scale,
            seed,
            embeddings,
            shared,
        )

    def caption_effect(self, unet, text_encoder) -> dict:
        """text/caption_effect of the first distinct grid prompts, each drawn from the same fixed noises."""
        captions, noises = CAPTION_EFFECT_SHAPE
        prompts = list(dict.fromkeys(self.grids.prompts))[:captions]
        if len(prompts) < 2:  # one caption: nothing to tell apart
            return {}
        images, _ = self.sample(unet, text_encoder, prompts, len(prompts) * noises, self.grids.seed, shared=True)
        samples = to_uint8_batch(images, unet.config.sample_size)
        return {CAPTION_EFFECT.logged: caption_effect(samples.reshape(len(prompts), noises, *samples.shape[1:]))}

    def grid(self, unet, text_encoder, state: TrainState, epoch: int) -> tuple[Path, dict]:
        """The fixed prompts' grid, written and logged; with a training reference, each sample's nearest image."""
        images, captions = self.sample(unet, text_encoder, self.grids.prompts, self.grids.count, self.grids.seed)
        grid = write_grid(images, captions, self.output_dir / "samples", state.step, epoch)
        log_image(self.accelerator, "samples", grid, state.step)
        reference, metrics = self.checks.reference, {}
        if exists(reference):
            metrics, distances, indices = reference.memorization(to_uint8_batch(images, reference.resolution))
            strip = self.output_dir / "samples" / f"nearest-{state.step:07d}.png"
            write_nearest_strip(images, captions, reference, distances, indices, strip)
            log_image(self.accelerator, "nearest", strip, state.step)
        return grid, metrics

    def sample_quality(self, unet, text_encoder) -> dict:
        """--eval_num_images generated in grid-sized chunks (fixed seeds): FD, KID, CLIP score, copy rate."""
        quality, images = self.checks.quality, []
        chunk = self.grids.count
        for index, start in enumerate(range(0, len(quality.prompts), chunk)):
            prompts = quality.prompts[start : start + chunk]
            images += self.sample(unet, text_encoder, prompts, len(prompts), self.grids.seed + 1 + index)[0]
        metrics = quality.measure(images)
        if exists(self.checks.reference):
            reference = self.checks.reference
            copies, _, _ = reference.memorization(to_uint8_batch(images, reference.resolution))
            metrics[EVAL_COPY_RATE.logged] = copies[COPY_RATE.logged]
        return metrics

    def record(self, unet, state: TrainState, epoch: int, metrics: dict, grid: Path | None) -> None:
        record = {"step": state.step, "epoch": epoch, **metrics}
        self.log.append(record)
        self.accelerator.log(metrics, step=state.step)
        self.latest |= newest_values([record])
        metric = self.checks.keep_best
        name = KEEP_BEST[metric].logged if exists(metric) else None
        if exists(name) and name in metrics and (not exists(state.best) or metrics[name] < state.best["value"]):
            state.best = {"metric": metric, "value": metrics[name], "step": state.step}
            best = self.output_dir / BEST_DIR
            self.save(unet_as_fp32(unet, self.ema), state, grid, best, newest_values([record]))
            logger.info(
                "step %d has the best %s so far (%.6g): saved the pipeline to %s",
                state.step,
                metric,
                metrics[name],
                best,
            )

    def save(self, unet, state: TrainState, grid: Path | None, folder: Path, metrics: dict) -> None:
        text_encoder = self.live_text_encoder()
        if not exists(text_encoder):  # frozen and freed after caching: its weights are still the ones on disk
            text_encoder = build_text_encoder(*self.text_encoder_source)[1]
        card = model_card(self.public_flags, self.grids.prompts, state, grid, folder, metrics)
        folder.mkdir(parents=True, exist_ok=True)
        save_pipeline(self.pipeline(unet, text_encoder), folder, card, state.step)

    def export(self, state: TrainState, grid: Path | None) -> None:
        with main_process_with_ema(self.accelerator, self.unet, self.ema, fp32=True) as unet:
            if exists(unet):
                self.save(unet, state, grid, self.output_dir, self.latest)
                logger.info("saved the pipeline to %s", self.output_dir)
