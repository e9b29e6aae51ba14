"""TextToImagePipeline: a pixel-space text-to-image diffusion pipeline (UNet + text encoder, no VAE), and its CLI.

Load what `train_text_to_image.py` wrote and generate:

    pipe = TextToImagePipeline.from_pretrained("OUTPUT_DIR")
    images = pipe(["a red circle", "a blue square"], num_images_per_prompt=4, generator=torch.manual_seed(0)).images

or, in a fresh process without this repo (the output folder carries this file as `pipeline.py`):

    pipe = DiffusionPipeline.from_pretrained("OUTPUT_DIR", custom_pipeline="OUTPUT_DIR", trust_remote_code=True)

From the shell:

    python pipeline_text_to_image.py --model OUTPUT_DIR --prompt "a red circle" --prompt "a blue square" \
        --num_images_per_prompt 4 --scheduler dpm --seed 0 --output grid.png --progression strip.png

This file is copied into every trained output folder, so it imports only torch, numpy, PIL, diffusers,
transformers and the standard library.
"""

import argparse
import inspect
import math
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import ImageDraw, ImageFont
from transformers import PreTrainedModel, PreTrainedTokenizerBase

SCHEDULER_NAMES = ("ddpm", "ddim", "dpm", "euler", "unipc")
SCHEDULER_CLASSES = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
}
FLOW_MATCHING = "flow_matching"  # the trainer's --prediction_type for rectified flow: velocity, t in [0, 1]
FLOW_SAMPLER = "euler"  # the one sampler of a flow-matching model: FlowMatchEulerDiscreteScheduler
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0  # since 2026-12-07 (3.0 before): names followed more often on real sets (CHANGELOG)
# DPM-Solver's own advice for cosine betas: lambda(t) below this is where alpha_bar ~ 0 makes its x0 blow up.
DPM_LAMBDA_MIN_CLIPPED = -5.1
MIN_CELL_PIXELS = 128
CAPTION_LINES = 2
PIPELINE_FILE_NAME = "pipeline.py"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning (shared with the trainer, so training and sampling condition identically)


def encode_text(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: PreTrainedModel,
    prompts: Sequence[str],
    max_length: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`last_hidden_state` [N, max_length, hidden] of the prompts padded to exactly max_length tokens."""
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    device = device if device is not None else text_encoder.device
    extra = {"attention_mask": tokens["attention_mask"].to(device)} if "attention_mask" in tokens else {}
    return text_encoder(tokens["input_ids"].to(device), **extra).last_hidden_state


def unaugmented_labels(unet, batch_size: int, device, dtype) -> dict:
    """UNet kwargs for images as they are: zero `class_labels` when the UNet was trained with augmentation
    conditioning (the trainer's --augment_prob feeds each transform's parameters through the projection class
    embedding, zero for an untouched image); nothing for any other UNet."""
    config = unet.config
    if config.class_embed_type != "projection":
        return {}
    width = config.projection_class_embeddings_input_dim
    return {"class_labels": torch.zeros(batch_size, width, device=device, dtype=dtype)}


# ----------------------------------------------------------------------------------------------------------------
# Schedulers


class IncompatibleSampler(ValueError):
    """A sampler asked for that cannot sample this model (a DDPM sampler for a flow-matching model)."""


def is_flow_matching(config) -> bool:
    """Whether a scheduler config is a flow-matching model's (FlowMatchEulerDiscreteScheduler: a shift, no betas)."""
    return "shift" in config and "prediction_type" not in config


def prediction_type_of(config) -> str:
    """What the UNet predicts, from its scheduler config: epsilon, sample, v_prediction or flow_matching."""
    return FLOW_MATCHING if is_flow_matching(config) else config["prediction_type"]


def default_sampler(config) -> str:
    """The sampler a trained folder is saved with: DPM-Solver++ for a DDPM-trained model, Euler for flow matching."""
    return FLOW_SAMPLER if is_flow_matching(config) else "dpm"


def make_sampling_scheduler(name: str, config) -> SchedulerMixin:
    """The named sampler, keeping the training betas and prediction type, configured safely for pixel space;
    a flow-matching model's is FlowMatchEulerDiscreteScheduler with its training shift, asked for as euler."""
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if is_flow_matching(config):
        if name != FLOW_SAMPLER:
            raise IncompatibleSampler(
                f"scheduler {name!r} samples DDPM-trained models, but this model was trained with flow matching;"
                f" use {FLOW_SAMPLER!r} (FlowMatchEulerDiscreteScheduler)"
            )
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    # "trailing" starts sampling at t = T-1, the pure noise the model was trained on; "leading" would start
    # from e.g. t = 750 of 1000 with 4 steps and feed the model noise levels it never saw with that input.
    safe = {"timestep_spacing": "trailing"}
    if name in ("ddpm", "ddim"):
        safe.update(clip_sample=True, clip_sample_range=1.0)
    elif name == "dpm":
        # Pixels live in [-1, 1]: threshold x0 there, and skip lambda(t) so low that 1/alpha overflows (cosine).
        safe.update(
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=True,
            sample_max_value=1.0,
            lambda_min_clipped=DPM_LAMBDA_MIN_CLIPPED,
            final_sigmas_type="zero",
        )
    elif name == "unipc":
        safe.update(predict_x0=True, thresholding=True, sample_max_value=1.0)
    scheduler_class = SCHEDULER_CLASSES[name]
    accepted = set(inspect.signature(scheduler_class.__init__).parameters)
    kept = {key: value for key, value in dict(config).items() if key in accepted or key.startswith("_")}
    return scheduler_class.from_config(kept, **safe)


def noise_to_signal(scheduler: SchedulerMixin, timestep) -> float:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) at this step, as the scheduler itself sees it."""
    sigmas = getattr(scheduler, "sigmas", None)
    index = getattr(scheduler, "step_index", None)
    if sigmas is not None and index is not None:
        return float(sigmas[index])
    alphas_cumprod = scheduler.alphas_cumprod.double().cpu().numpy()
    table = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    return float(np.interp(float(timestep), np.arange(len(table)), table))


def clip_denoised_prediction(
    model_output: torch.Tensor, sample: torch.Tensor, sigma: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(model output whose implied x0 is clamped to [-1, 1], that x0); an x0 already in range is left as it is.

    `sample` is the variance-preserving x_t the UNet saw (after `scale_model_input`). This makes samplers with no
    x0 clipping of their own (Euler) safe where alpha_bar(T) ~ 0 (cosine betas): there x0 = (x - s eps) / a is huge.
    """
    alpha = max((1.0 + sigma**2) ** -0.5, 1e-12)
    noise = max(sigma * (1.0 + sigma**2) ** -0.5, 1e-12)
    output, x = model_output.float(), sample.float()
    if prediction_type == "epsilon":
        x0 = (x - noise * output) / alpha
    elif prediction_type == "sample":
        x0 = output
    elif prediction_type == "v_prediction":
        x0 = alpha * x - noise * output
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, sample, v_prediction")
    x0 = x0.clamp(-1.0, 1.0)
    epsilon = (x - alpha * x0) / noise
    clipped = {"epsilon": epsilon, "sample": x0, "v_prediction": alpha * epsilon - noise * x0}[prediction_type]
    return clipped.to(model_output.dtype), x0.to(model_output.dtype)


def clip_flow_prediction(velocity: torch.Tensor, sample: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow matching's clip_denoised_prediction: (velocity whose x0 = x_t - t v is clamped to [-1, 1], that x0).
    x_t = (1 - t) x0 + t noise and v = noise - x0, so the velocity that implies a given x0 is (x_t - x0) / t."""
    v, x = velocity.float(), sample.float()
    x0 = (x - t * v).clamp(-1.0, 1.0)
    clipped = (x - x0) / max(t, 1e-12)
    return clipped.to(velocity.dtype), x0.to(velocity.dtype)


def step_accepts(scheduler: SchedulerMixin, name: str) -> bool:
    return name in inspect.signature(scheduler.step).parameters


# ----------------------------------------------------------------------------------------------------------------
# Images


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """UNet pixels in [-1, 1] -> [0, 1]. Pixel space: no VAE, so no latent scaling factor."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def tensor_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[N, 3, H, W] in [0, 1] -> PIL RGB images."""
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(array) for array in arrays]


def caption_lines(text: str, width_pixels: int, font, draw: ImageDraw.ImageDraw) -> list[str]:
    """The caption wrapped to the cell width, at most CAPTION_LINES lines, the last one cut with '...'."""
    characters = max(4, int(width_pixels // max(1.0, draw.textlength("n", font=font))))
    lines = textwrap.wrap(text, width=characters) or [""]
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][: characters - 3].rstrip() + "..."
    return lines


def make_captioned_grid(images: Sequence[PIL.Image.Image], captions: Sequence[str], columns: int) -> PIL.Image.Image:
    """A grid of images, each with its caption under it; small images are upscaled (NEAREST) to stay legible."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    columns = max(1, min(columns, len(images)))
    width, height = images[0].size
    scale = max(1, math.ceil(MIN_CELL_PIXELS / max(width, 1)))
    cell_width, cell_height = width * scale, height * scale
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    line_height = probe.textbbox((0, 0), "Ag", font=font)[3] + 2
    band = CAPTION_LINES * line_height + 4
    rows = math.ceil(len(images) / columns)
    grid = PIL.Image.new("RGB", (columns * cell_width, rows * (cell_height + band)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        left, top = (index % columns) * cell_width, (index // columns) * (cell_height + band)
        cell = image.convert("RGB").resize((cell_width, cell_height), PIL.Image.NEAREST)
        grid.paste(cell, (left, top))
        for line_number, line in enumerate(caption_lines(caption, cell_width - 4, font, draw)):
            draw.text((left + 2, top + cell_height + 2 + line_number * line_height), line, fill="black", font=font)
    return grid


def progression_steps(num_inference_steps: int, count: int = 6) -> list[int]:
    """`count` step indices spread evenly from the first step to the last (which is the final image)."""
    count = max(1, min(count, num_inference_steps))
    if count == 1:
        return [num_inference_steps - 1]
    return sorted({round(i * (num_inference_steps - 1) / (count - 1)) for i in range(count)})


class ProgressionRecorder:
    """A `callback_on_step_end` that keeps the predicted image at chosen steps, to draw the denoising strip.

    pipe(prompts, callback_on_step_end=recorder); recorder.strip(prompts) -> one row per image, steps left to right.
    The predicted x0 shows what the model sees at each step; the last step records the final image itself.
    """

    tensor_inputs = ["latents", "denoised"]

    def __init__(self, steps: Sequence[int]):
        self.steps = sorted(set(steps))
        self.frames: list[torch.Tensor] = []
        self.recorded_steps: list[int] = []
        self.num_steps = 0

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        self.num_steps = getattr(pipe, "num_timesteps", self.num_steps)
        if step_index in self.steps:
            is_last = step_index == self.num_steps - 1
            image = callback_kwargs["latents"] if is_last else callback_kwargs["denoised"]
            self.frames.append(to_unit_range(image).cpu())
            self.recorded_steps.append(step_index)
        return {}

    def strip(self, prompts: Sequence[str] | None = None) -> PIL.Image.Image:
        """The recorded images as a captioned grid: a row per generated image, a column per recorded step."""
        if not self.frames:
            raise ValueError("nothing recorded: pass the recorder as callback_on_step_end before calling strip()")
        rows = self.frames[0].shape[0]
        per_row = [prompts[row * len(prompts) // rows] if prompts else "" for row in range(rows)]
        images, captions = [], []
        for row in range(rows):
            for column, step in enumerate(self.recorded_steps):
                images.append(tensor_to_pil(self.frames[column][row : row + 1])[0])
                label = f"step {step + 1}/{self.num_steps}"
                captions.append(f"{label} {per_row[row]}" if column == 0 else label)
        return make_captioned_grid(images, captions, columns=len(self.recorded_steps))


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


class TextToImagePipeline(DiffusionPipeline):
    """Text-to-image in pixel space: a UNet2DConditionModel denoises [-1, 1] RGB images, cross-attending to text."""

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        text_max_length: int | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(text_max_length=text_max_length)

    @property
    def text_max_length(self) -> int:
        """Token length the model was trained with (the trainer pads to its longest caption, not always 77)."""
        return self.config.text_max_length or self.tokenizer.model_max_length

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds or None), repeated per image; one text-encoder call for both."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompts) if prompt_embeds is None else prompt_embeds.shape[0]
        negatives = None
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            # "" is the unconditional prompt: the trainer's caption dropout trains it with encode_text([""]).
            negatives = (
                [negative_prompt or ""] * batch_size if not isinstance(negative_prompt, list) else negative_prompt
            )
            if len(negatives) != batch_size:
                raise ValueError(f"{len(negatives)} negative prompts for {batch_size} prompts; pass one per prompt")
        texts = (prompts if prompt_embeds is None else []) + (negatives or [])
        if texts:
            encoded = encode_text(self.tokenizer, self.text_encoder, texts, self.text_max_length, device=device)
            if prompt_embeds is None:
                prompt_embeds, encoded = encoded[:batch_size], encoded[batch_size:]
            if negatives is not None:
                negative_prompt_embeds = encoded
        dtype = self.unet.dtype
        prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds if do_classifier_free_guidance else None

    def prepare_latents(self, shape, dtype, device, generator, latents: torch.Tensor | None) -> torch.Tensor:
        """Initial noise (or the given latents) scaled by the scheduler's init_noise_sigma (1 for flow matching)."""
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} images; pass one per image or a single one")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
        # FlowMatchEulerDiscreteScheduler has no init_noise_sigma: its x_1 is the unit noise itself
        return latents.to(device, dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        size = self.unet.config.sample_size
        default_height, default_width = (size, size) if isinstance(size, int) else tuple(size)
        return height or default_height, width or default_width

    def predict(self, latents, timestep, embeddings, clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided model output, its x0) at one step: both guidance branches in one batched UNet call."""
        guided = self.do_classifier_free_guidance
        flow = is_flow_matching(self.scheduler.config)
        model_input = torch.cat([latents] * 2) if guided else latents
        if not flow:  # flow matching's x_t goes in as it is (its scheduler has no scale_model_input)
            model_input = self.scheduler.scale_model_input(model_input, timestep)
        # in the latents' precision from here on: under autocast (the trainer's grids, torch.compile) the UNet
        # returns bf16/fp16, and guidance and the sampler's update would otherwise run at that precision
        labels = unaugmented_labels(self.unet, model_input.shape[0], model_input.device, self.unet.dtype)
        output = self.unet(model_input, timestep, encoder_hidden_states=embeddings, **labels).sample.to(latents.dtype)
        if guided:
            unconditional, conditional = output.chunk(2)
            output = unconditional + self.guidance_scale * (conditional - unconditional)
        if flow:  # the UNet's timestep is t * num_train_timesteps, as the trainer passes it
            t = float(timestep) / self.scheduler.config.num_train_timesteps
            clipped, denoised = clip_flow_prediction(output, latents, t)
        else:
            vp_sample = model_input[: latents.shape[0]]
            sigma = noise_to_signal(self.scheduler, timestep)
            clipped, denoised = clip_denoised_prediction(
                output, vp_sample, sigma, self.scheduler.config.prediction_type
            )
        return (clipped if clip_denoised else output), denoised

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_denoised: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for a prompt or a batch of prompts.

        Returns ImagePipelineOutput(images=...): PIL images, a float numpy array [N, H, W, 3] in [0, 1] ("np"), or a
        tensor [N, 3, H, W] in [0, 1] ("pt"); N = len(prompts) * num_images_per_prompt, images of a prompt adjacent.
        `clip_denoised` clamps each step's predicted x0 to [-1, 1], which keeps every sampler sane where
        alpha_bar(T) ~ 0. `generator` may be a list with one generator per image.
        """
        tensor_inputs = self.check_inputs(
            prompt, prompt_embeds, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        self._guidance_scale = guidance_scale
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
        )
        embeddings = prompt_embeds
        if self.do_classifier_free_guidance:
            embeddings = torch.cat([negative_prompt_embeds, prompt_embeds])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        height, width = self.image_size(height, width)
        shape = (prompt_embeds.shape[0], self.unet.config.in_channels, height, width)
        latents = self.prepare_latents(shape, prompt_embeds.dtype, device, generator, latents)
        step_kwargs = {"generator": generator} if step_accepts(self.scheduler, "generator") else {}
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step_index, timestep in enumerate(timesteps):
                output, denoised = self.predict(latents, timestep, embeddings, clip_denoised)
                latents = self.scheduler.step(output, timestep, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "denoised": denoised,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    kwargs = {name: available[name] for name in tensor_inputs}
                    latents = (callback_on_step_end(self, step_index, timestep, kwargs) or {}).get("latents", latents)
                progress_bar.update()
        self.maybe_free_model_hooks()
        images = self.postprocess(latents, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def check_inputs(self, prompt, prompt_embeds, output_type, callback, tensor_inputs) -> list[str]:
        """The callback's tensor inputs, after one-line checks of the arguments."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt or prompt_embeds")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type {output_type!r} is not one of 'pil', 'np', 'pt'")
        tensor_inputs = list(tensor_inputs or getattr(callback, "tensor_inputs", None) or ["latents"])
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback tensor inputs {unknown} are not among {self._callback_tensor_inputs}")
        return tensor_inputs

    @staticmethod
    def postprocess(latents: torch.Tensor, output_type: str):
        images = to_unit_range(latents)
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        return tensor_to_pil(images)


# ----------------------------------------------------------------------------------------------------------------
# Sharing


def copy_pipeline_code(output_dir: str | Path) -> Path:
    """Write this file as output_dir/pipeline.py, so `custom_pipeline=output_dir` loads without this repo."""
    target = Path(output_dir) / PIPELINE_FILE_NAME
    shutil.copyfile(Path(__file__).resolve(), target)
    return target


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate a captioned image grid from a trained TextToImagePipeline.")
    # Model
    parser.add_argument("--model", type=Path, required=True, help="The --output_dir of a finished training run.")
    parser.add_argument("--device", default=None, help="Torch device; default cuda if available, else cpu.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Weights dtype; default as saved.")
    # Prompts
    parser.add_argument(
        "--prompt",
        action="extend",
        nargs="+",
        required=True,
        help="Prompts, a row each: --prompt 'a red circle' 'a blue square', or the flag once per prompt.",
    )
    parser.add_argument("--negative_prompt", default=None, help="Steer away from this text (replaces the '' prompt).")
    parser.add_argument("--num_images_per_prompt", type=int, default=4, help="Images generated for each prompt.")
    # Sampling
    parser.add_argument("--num_inference_steps", type=int, default=DEFAULT_STEPS, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="<= 1 turns guidance off.")
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULER_NAMES,
        default=None,
        help="Sampler; default: the saved one. A flow-matching model samples with euler only (its flow Euler).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial noise; same seed, same images.")
    # Output
    parser.add_argument("--output", type=Path, default=Path("grid.png"), help="Where to write the captioned grid.")
    parser.add_argument("--progression", type=Path, default=None, help="Also write the denoising strip here.")
    parser.add_argument("--progression_frames", type=int, default=6, help="Columns of the denoising strip.")
    args = parser.parse_args(argv)
    if not (args.model / "model_index.json").is_file():
        parser.error(f"--model {args.model} has no model_index.json; pass the --output_dir of a finished training run")
    if args.num_images_per_prompt < 1 or args.num_inference_steps < 1:
        parser.error("--num_images_per_prompt and --num_inference_steps must be at least 1")
    return args


def load_pipeline(model: Path, scheduler: str | None, device: str, dtype: torch.dtype | None) -> TextToImagePipeline:
    """The saved pipeline on `device`, optionally cast and with another sampler swapped in."""
    # loaded in the dtype, not cast after: transformers keeps the layers a model needs in fp32 (T5's) only then;
    # torch_dtype is what every diffusers version reads (0.42 also accepts `dtype`)
    pipe = TextToImagePipeline.from_pretrained(model, **({"torch_dtype": dtype} if dtype is not None else {}))
    if scheduler is not None:
        pipe.scheduler = make_sampling_scheduler(scheduler, pipe.scheduler.config)
    return pipe.to(device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = load_pipeline(args.model, args.scheduler, device, DTYPES.get(args.dtype))
    except IncompatibleSampler as error:
        sys.exit(f"error: --scheduler: {error}")
    recorder = ProgressionRecorder(progression_steps(args.num_inference_steps, args.progression_frames))
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images_per_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        callback_on_step_end=recorder if args.progression else None,
    ).images
    captions = [prompt for prompt in args.prompt for _ in range(args.num_images_per_prompt)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    make_captioned_grid(images, captions, columns=args.num_images_per_prompt).save(args.output)
    print(f"wrote {len(images)} images to {args.output}")
    if args.progression:
        args.progression.parent.mkdir(parents=True, exist_ok=True)
        recorder.strip(args.prompt).save(args.progression)
        print(f"wrote the denoising strip to {args.progression}")


if __name__ == "__main__":
    sys.exit(main())
