"""The diffusion loss: what a step minimizes (weighting and timestep sampling as objects), the target of each
prediction type, and the timestep buckets of the validation loss.

Flow matching (--prediction_type flow_matching, rectified flow) runs through the same functions: its samplings
draw t in [0, 1] and hand on the UNet's timestep t * num_train_timesteps (a float, as diffusers' SD3 and Flux
pipelines pass it), which the loss, the buckets and the pipeline's sampler all read as t.

A new weighting or timestep sampling: a class with the protocol's method, chosen in `objective_for`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pipeline_text_to_image import FLOW_MATCHING, prediction_type_of
from text_to_image.config import VALIDATION_BUCKETS, DiffusionConfig
from text_to_image.data import Shard


class LossWeighting(Protocol):
    """Each sample's weight in the loss, from its SNR and the scheduler's prediction type."""

    def __call__(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor: ...


class TimestepSampling(Protocol):
    """The timesteps of a global batch, drawn from the global RNG (one draw: the RNG-order contract), sliced to the shard."""

    def draw(self, shard: Shard, num_timesteps: int, device) -> torch.Tensor: ...


@dataclass(frozen=True)
class MinSnrWeighting:
    """--snr_gamma: min-SNR-gamma weights, bounded for every prediction type and finite at SNR 0; gamma 0 weighs all 1,
    and so does flow matching (plain MSE on the velocity, as rectified flow and SD3 train it).
    The held-out loss is weighted the same way, so that it measures what training optimizes."""

    gamma: float

    def __call__(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
        return min_snr_weights(snr, self.gamma, prediction_type)


@dataclass(frozen=True)
class MinSnrPlusOneWeighting:
    """--min_snr_variant snr_plus_one: v-prediction's x0 error weighed min(SNR + 1, gamma) instead of min(SNR, gamma),
    i.e. the v loss weighed min(1, gamma / (SNR + 1)): the noisy steps, where the caption decides what is drawn, keep
    plain v-MSE's weight 1 and only the cleaner steps are capped. Epsilon's min-SNR already keeps its noisy steps at
    1 and sample has no such form, so the other prediction types weigh as MinSnrWeighting does."""

    gamma: float

    def __call__(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
        if self.gamma > 0 and prediction_type == "v_prediction":
            return torch.clamp(self.gamma / (snr + 1), max=1.0)
        return min_snr_weights(snr, self.gamma, prediction_type)


@dataclass(frozen=True)
class UniformTimesteps:
    """Every timestep equally likely. The held-out loss averages fixed timestep buckets equally, i.e. uniformly,
    whatever the training sampling, so that runs sampling timesteps differently still compare."""

    def draw(self, shard: Shard, num_timesteps: int, device) -> torch.Tensor:
        return shard.of(torch.randint(0, num_timesteps, (shard.total,), device=device))


def shifted_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift, t' = shift t / (1 + (shift - 1) t): 0 and 1 stay, shift > 1 moves t towards noise.
    FlowMatchEulerDiscreteScheduler shifts its sampling schedule by the same formula and the same --timestep_shift."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class UniformFlowTimes:
    """Flow matching: t uniform in [0, 1), shifted; returned as the UNet's timestep t * num_timesteps."""

    shift: float = 1.0

    def draw(self, shard: Shard, num_timesteps: int, device) -> torch.Tensor:
        t = torch.rand(shard.total, device=device)
        return shard.of(shifted_times(t, self.shift)) * num_timesteps


@dataclass(frozen=True)
class LogitNormalFlowTimes:
    """Flow matching: t = sigmoid(N(mean, std)) (SD3's logit-normal: more of the middle t), shifted; returned as the
    UNet's timestep t * num_timesteps."""

    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def draw(self, shard: Shard, num_timesteps: int, device) -> torch.Tensor:
        t = torch.sigmoid(torch.randn(shard.total, device=device) * self.std + self.mean)
        return shard.of(shifted_times(t, self.shift)) * num_timesteps


@dataclass(frozen=True)
class DiffusionObjective:
    """What a training step minimizes: the weighting, the timestep sampling, and the noise options."""

    weighting: LossWeighting
    timesteps: TimestepSampling = UniformTimesteps()
    noise_offset: float = 0.0
    input_perturbation: float = 0.0


def objective_for(diffusion: DiffusionConfig) -> DiffusionObjective:
    return DiffusionObjective(
        weighting=weighting_for(diffusion.snr_gamma, diffusion.min_snr_variant),
        timesteps=timestep_sampling_for(diffusion),
        noise_offset=diffusion.noise_offset,
        input_perturbation=diffusion.input_perturbation,
    )


def weighting_for(snr_gamma: float, min_snr_variant: str) -> LossWeighting:
    """--snr_gamma and --min_snr_variant; also how examples/evaluate.py weighs a saved model's held-out loss."""
    if min_snr_variant == "snr_plus_one":
        return MinSnrPlusOneWeighting(snr_gamma)
    return MinSnrWeighting(snr_gamma)


def timestep_sampling_for(diffusion: DiffusionConfig) -> TimestepSampling:
    """--timestep_sampling and --timestep_shift for flow matching; DDPM's integer timesteps are drawn uniformly."""
    if diffusion.prediction_type != FLOW_MATCHING:
        return UniformTimesteps()
    if diffusion.timestep_sampling == "logit_normal":
        return LogitNormalFlowTimes(diffusion.logit_mean, diffusion.logit_std, diffusion.timestep_shift)
    return UniformFlowTimes(diffusion.timestep_shift)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights; bounded for every prediction type, finite at SNR 0; 1 for flow matching."""
    if gamma <= 0 or prediction_type == FLOW_MATCHING:
        return torch.ones_like(snr)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)  # == min(snr, gamma) / snr, and 1 where snr == 0
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # sample (x0) loss == snr * epsilon loss, so the x0 weight is min(snr, gamma)


def weighted_losses(
    unet,
    noise_scheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeddings,
    weighting: LossWeighting,
    augment_labels: torch.Tensor | None = None,
    input_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample weighted MSE against the prediction type's target, for given noise and timesteps.
    `input_noise` (--input_perturbation) noises the UNet's input in place of `noise`; the target keeps `noise`."""
    prediction_type = prediction_type_of(noise_scheduler.config)
    noised = flow_terms if prediction_type == FLOW_MATCHING else ddpm_terms
    noisy, target, snr = noised(noise_scheduler, clean, noise, timesteps, noise if input_noise is None else input_noise)
    # DeepSpeed holds the UNet itself in bf16/fp16 and accelerate does not autocast then: feed it its own dtype
    dtype = next(unet.parameters()).dtype
    labels = {} if augment_labels is None else {"class_labels": augment_labels.to(dtype)}
    prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=text_embeddings.to(dtype), **labels).sample
    weights = weighting(snr, prediction_type)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weights


def ddpm_terms(noise_scheduler, clean, noise, timesteps, input_noise):
    """(the UNet's noisy input, the prediction type's target, SNR) at DDPM's integer timesteps."""
    noisy = noise_scheduler.add_noise(clean, input_noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = clean
    else:
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(clean.device)[timesteps]
    return noisy, target, alphas_cumprod / (1 - alphas_cumprod)


def flow_terms(noise_scheduler, clean, noise, timesteps, input_noise):
    """(x_t = (1 - t) x0 + t noise, the velocity noise - x0, SNR ((1 - t) / t)^2) at t = timesteps / num_train_timesteps."""
    t = (timesteps.float() / noise_scheduler.config.num_train_timesteps).view(-1, *[1] * (clean.dim() - 1))
    noisy = (1 - t) * clean + t * input_noise
    return noisy, noise - clean, ((1 - t) / t).square().flatten()


def diffusion_losses(
    unet,
    noise_scheduler,
    clean: torch.Tensor,
    text_embeddings: torch.Tensor,
    objective: DiffusionObjective,
    shard: Shard | None = None,
    augment_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random noise and timesteps for this shard of the global batch: (per-sample weighted losses, timesteps).
    The draws, in this order: noise, noise offset, timesteps, input perturbation (CONTRIBUTING.md)."""
    shard = shard or Shard(size=len(clean))
    batch = (shard.total, clean.shape[1])
    noise = shard.of(torch.randn(*batch, *clean.shape[2:], device=clean.device, dtype=clean.dtype))
    if objective.noise_offset:
        noise += objective.noise_offset * shard.of(torch.randn(*batch, 1, 1, device=clean.device, dtype=clean.dtype))
    timesteps = objective.timesteps.draw(shard, noise_scheduler.config.num_train_timesteps, clean.device)
    input_noise = None
    if objective.input_perturbation:
        extra = shard.of(torch.randn(*batch, *clean.shape[2:], device=clean.device, dtype=clean.dtype))
        input_noise = noise + objective.input_perturbation * extra
    losses = weighted_losses(
        unet,
        noise_scheduler,
        clean,
        noise,
        timesteps,
        text_embeddings,
        objective.weighting,
        augment_labels,
        input_noise,
    )
    return losses, timesteps


class StepLoss:
    """One optimizer step's loss, micro-batch by micro-batch: each micro-batch's mean over the shard (what its
    backward takes), and every sample's loss summed per timestep bucket. The eager step (training.Trainer.step)
    and the device step (captured.DeviceStep) both take their loss here."""

    def __init__(self, unet, noise_scheduler, objective: DiffusionObjective, shard: Shard | None = None, device=None):
        self.unet, self.noise_scheduler, self.objective, self.shard = unet, noise_scheduler, objective, shard
        self.losses: list[torch.Tensor] = []
        self.buckets = torch.zeros(2, VALIDATION_BUCKETS, device=device)  # loss sums, counts

    def micro_batch(
        self, clean: torch.Tensor, text_embeddings: torch.Tensor, augment_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The micro-batch's mean loss; its samples' losses kept for the step's mean and buckets."""
        per_sample, timesteps = diffusion_losses(
            self.unet, self.noise_scheduler, clean, text_embeddings, self.objective, self.shard, augment_labels
        )
        loss = per_sample.mean()
        self.losses.append(loss.detach())
        bucket = timestep_buckets(timesteps, self.noise_scheduler.config.num_train_timesteps)
        self.buckets[0].index_add_(0, bucket, per_sample.detach().float())
        self.buckets[1].index_add_(0, bucket, torch.ones_like(per_sample, dtype=torch.float))
        return loss

    def mean(self) -> torch.Tensor:
        """The mean of the micro-batches' losses."""
        return torch.stack(self.losses).mean()


def timestep_buckets(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Which of VALIDATION_BUCKETS equal timestep ranges each timestep is in (0: least noise); flow matching's
    float timesteps t * num_train_timesteps alike, t = 1 in the last."""
    buckets = torch.div(timesteps * VALIDATION_BUCKETS, num_train_timesteps, rounding_mode="floor")
    return buckets.long().clamp(max=VALIDATION_BUCKETS - 1)


def bucket_names(prefix: str, num_train_timesteps: int) -> list[str]:
    """`prefix`/loss_tSTART per bucket, e.g. val/loss_t0300 for timesteps 300-399 of 1000 (flow matching: t in [0.3, 0.4))."""
    width = len(str(num_train_timesteps))
    return [
        f"{prefix}/loss_t{bucket * num_train_timesteps // VALIDATION_BUCKETS:0{width}d}"
        for bucket in range(VALIDATION_BUCKETS)
    ]
