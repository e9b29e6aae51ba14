"""The optimizer, the learning rate chosen for the UNet being trained and its schedule, and the EMA (and its weights
swapped in for sampling)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from text_to_image.common import exists, unwrap
from text_to_image.config import (
    LEARNING_RATE_REFERENCE_BATCH,
    MODEL_SIZES,
    PRESET_LEARNING_RATES,
    TEXT_ENCODER_RATE_SHARE,
    WARMUP_STABLE_DECAY,
    ModelConfig,
    OptimConfig,
)
from text_to_image.models import default_unet_config


def unet_as_fp32(unet, ema):
    """A UNet that already holds its EMA weights, in fp32 to save: itself, or an fp32 copy with the EMA's fp32
    weights put in unrounded (no EMA store/restore here: the caller's ema_weights holds the training weights)."""
    return unet if next(unet.parameters()).dtype == torch.float32 else fp32_copy_with_ema(unet, ema)


@contextlib.contextmanager
def ema_weights(ema, model) -> Iterator[None]:
    """Temporarily load the EMA weights into `model` (no-op without EMA)."""
    if not exists(ema):
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


@contextlib.contextmanager
def unet_with_ema(unet, ema, fp32: bool) -> Iterator[torch.nn.Module]:
    """The UNet holding its EMA weights. With `fp32` (to save), a UNet held in bf16/fp16 (DeepSpeed holds it
    so) gives an fp32 copy that the EMA's fp32 weights go into unrounded; otherwise it lends its parameters."""
    if not fp32 or next(unet.parameters()).dtype == torch.float32:
        with ema_weights(ema, unet):
            yield unet
        return
    yield fp32_copy_with_ema(unet, ema)


def fp32_copy_with_ema(unet, ema):
    """An fp32 copy of a UNet held in bf16/fp16, with the EMA's fp32 weights put in unrounded."""
    copy = type(unet).from_config(unet.config)
    copy.load_state_dict({name: tensor.float() for name, tensor in unet.state_dict().items()})
    if exists(ema):
        ema.copy_to(copy.parameters())
    return copy


@contextlib.contextmanager
def main_process_with_ema(accelerator, unet, ema, fp32: bool = False) -> Iterator[torch.nn.Module | None]:
    """The bare UNet holding its EMA weights (`fp32`: see unet_with_ema), on the main process (None on the
    others, which wait)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with unet_with_ema(unwrap(accelerator, unet), ema, fp32) as held:
            yield held
    else:
        yield None
    accelerator.wait_for_everyone()


@dataclass(frozen=True, kw_only=True)
class LearningRates:
    """The peak rates AdamW trains at, and where the UNet's came from (for the run plan)."""

    unet: float
    text_encoder: float | None  # None: a trained encoder shares the UNet's parameter group
    why: str


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@functools.cache  # building the four presets, even on the meta device, costs a short run a third of its setup
def preset_parameter_counts(resolution: int, cross_attention_dim: int) -> dict[str, int]:
    """Each --model_size UNet's parameters at this resolution and encoder width (built on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    counts = {}
    for size in MODEL_SIZES:
        config = default_unet_config(resolution, size) | {"cross_attention_dim": cross_attention_dim}
        with torch.device("meta"):
            counts[size] = count_parameters(UNet2DConditionModel.from_config(config))
    return counts


def interpolated_learning_rate(parameters: int, preset_counts: dict[str, int]) -> float:
    """log(rate) straight in log(parameters) between the two presets around the UNet; the nearest end's rate outside."""
    points = sorted((count, PRESET_LEARNING_RATES[size]) for size, count in preset_counts.items())
    if parameters <= points[0][0]:
        return points[0][1]
    for (low_count, low_rate), (high_count, high_rate) in itertools.pairwise(points):
        if parameters <= high_count:
            share = math.log(parameters / low_count) / math.log(high_count / low_count)
            return low_rate * (high_rate / low_rate) ** share
    return points[-1][1]


def choose_learning_rates(optim: OptimConfig, model: ModelConfig, unet, images_per_step: int) -> LearningRates:
    """A given --learning_rate / --text_encoder_learning_rate as given; otherwise the rule of --learning_rate's help.

    Adam's update is normalised, so its rate scales with the square root of the batch, not linearly (Malladi et al.
    2022); measured at 32 and 128 images a step (docs/results/learning-rates.md).
    """
    # a frozen encoder has no rate, whatever --text_encoder_learning_rate says (the run warns)
    given_encoder_rate = optim.text_encoder_learning_rate if model.train_text_encoder else None
    if exists(optim.learning_rate):
        return LearningRates(unet=optim.learning_rate, text_encoder=given_encoder_rate, why="given")
    if exists(model.model_config_name_or_path):
        parameters = count_parameters(unet)
        counts = preset_parameter_counts(unet.config.sample_size, unet.config.cross_attention_dim)
        base, source = interpolated_learning_rate(parameters, counts), f"{parameters / 1e6:.1f}M parameters"
    else:
        base, source = PRESET_LEARNING_RATES[model.model_size], f"--model_size {model.model_size}"
    scale = math.sqrt(images_per_step / LEARNING_RATE_REFERENCE_BATCH)
    rate = base * scale
    text_encoder = given_encoder_rate
    if model.train_text_encoder and not exists(text_encoder):
        text_encoder = rate * TEXT_ENCODER_RATE_SHARE
    why = f"chosen: {base:.2g} for {source} x sqrt({images_per_step} images a step / {LEARNING_RATE_REFERENCE_BATCH})"
    return LearningRates(unet=rate, text_encoder=text_encoder, why=why)


def trained_parameters(unet, text_encoder, model: ModelConfig, rates: LearningRates) -> list:
    """What AdamW trains: one group, or the encoder in a second at its own learning rate.

    Only an encoder rate of its own makes a second group, so checkpoints of runs that gave --learning_rate and no
    --text_encoder_learning_rate keep the optimizer layout they were saved with.
    """
    trained = list(unet.parameters())
    if not model.train_text_encoder:
        return trained
    if not exists(rates.text_encoder):
        return trained + list(text_encoder.parameters())
    return [{"params": trained}, {"params": list(text_encoder.parameters()), "lr": rates.text_encoder}]


def build_optimizer(parameters, optim: OptimConfig, learning_rate: float, device: torch.device):
    kwargs = dict(
        lr=learning_rate,
        betas=optim.adam_betas,
        weight_decay=optim.adam_weight_decay,
        eps=optim.adam_epsilon,
    )
    # fused: one kernel for all parameters instead of one per tensor; on CPU (torch >= 2.4) 5x faster than
    # foreach for the seed UNet (0.39 -> 0.075 s a step, 144M parameters, 2 cores: foreach sqrt is a loop there)
    if device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= (2, 4)):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(parameters, **kwargs)


@dataclass(kw_only=True)
class WarmupStableDecay:
    """--lr_scheduler warmup_stable_decay's factor of the peak rate at a step: linear warm-up over `warmup_steps`
    (diffusers' own ramp), constant, then linear to 0 from `decay_start` to `total_steps`.

    Mutable: a length planned from --max_train_time is fixed after training began (training.TimePlanner), always
    before `decay_start`, so the steps already taken had the rate the fixed plan gives them too.
    """

    warmup_steps: int
    total_steps: int
    decay_start: int

    def __call__(self, step: int) -> float:
        warm = step / max(1, self.warmup_steps) if step < self.warmup_steps else 1.0
        if step < self.decay_start:
            return warm
        return min(warm, max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.decay_start)))


def decay_start(total_steps: int, share: float, earliest: int = 0) -> int:
    """The step a warmup_stable_decay schedule over `total_steps` starts decaying at: the last `share` of them,
    and not before `earliest` (the step a late plan was fixed at: the rate never jumps down)."""
    return max(total_steps - round(share * total_steps), earliest)


def build_lr_scheduler(optimizer, optim: OptimConfig, total_steps: int, decay_from: int | None):
    """The LR schedule over `total_steps`, and for warmup_stable_decay the factor a time plan sets (else None).

    The factor goes in as a lambda, so the scheduler's state (accelerate saves it) holds its step alone; the
    plan it follows lives in TrainState.plan, the one place a resumed run reads it from.
    """
    from diffusers.optimization import get_scheduler
    from torch.optim.lr_scheduler import LambdaLR

    if optim.lr_scheduler != WARMUP_STABLE_DECAY:
        schedule = get_scheduler(
            optim.lr_scheduler, optimizer, num_warmup_steps=optim.lr_warmup_steps, num_training_steps=total_steps
        )
        return schedule, None
    factor = WarmupStableDecay(warmup_steps=optim.lr_warmup_steps, total_steps=total_steps, decay_start=decay_from)
    return LambdaLR(optimizer, lambda step: factor(step)), factor


def build_ema(unet, optim: OptimConfig):
    if not optim.use_ema:
        return None
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    return EMAModel(
        unet.parameters(),
        decay=optim.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=optim.ema_inv_gamma,
        power=optim.ema_power,
        foreach=True,
        model_cls=UNet2DConditionModel,
        model_config=unet.config,
    )


def rates_used(rates: LearningRates) -> dict:
    """The rates the run trained at, given or chosen, as the model card and the trackers show the flags."""
    return {"learning_rate": rates.unet, "text_encoder_learning_rate": rates.text_encoder}


def describe_rates(rates: LearningRates) -> str:
    encoder = f", text encoder {rates.text_encoder:.2g}" if exists(rates.text_encoder) else ""
    return f"learning rate {rates.unet:.2g} ({rates.why}){encoder}"
