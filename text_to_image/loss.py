"""The diffusion loss: the target of each prediction type, min-SNR weighting, and the timestep buckets of the validation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_to_image.config import VALIDATION_BUCKETS
from text_to_image.data import Shard


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights; bounded for every prediction type, finite at SNR 0."""
    if gamma <= 0:
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
    snr_gamma,
    augment_labels: torch.Tensor | None = None,
    input_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample min-SNR weighted MSE against the prediction type's target, for given noise and timesteps.
    `input_noise` (--input_perturbation) noises the UNet's input in place of `noise`; the target keeps `noise`."""
    noisy = noise_scheduler.add_noise(clean, noise if input_noise is None else input_noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = clean
    else:
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    # DeepSpeed holds the UNet itself in bf16/fp16 and accelerate does not autocast then: feed it its own dtype
    dtype = next(unet.parameters()).dtype
    labels = {} if augment_labels is None else {"class_labels": augment_labels.to(dtype)}
    prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=text_embeddings.to(dtype), **labels).sample
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(clean.device)[timesteps]
    weights = min_snr_weights(alphas_cumprod / (1 - alphas_cumprod), snr_gamma, prediction_type)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weights


def diffusion_losses(
    unet,
    noise_scheduler,
    clean: torch.Tensor,
    text_embeddings: torch.Tensor,
    snr_gamma: float,
    noise_offset: float,
    shard: Shard | None = None,
    augment_labels: torch.Tensor | None = None,
    input_perturbation: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random noise and timesteps for this shard of the global batch: (per-sample weighted losses, timesteps)."""
    shard = shard or Shard(size=len(clean))
    batch = (shard.total, clean.shape[1])
    noise = shard.of(torch.randn(*batch, *clean.shape[2:], device=clean.device, dtype=clean.dtype))
    if noise_offset:
        noise += noise_offset * shard.of(torch.randn(*batch, 1, 1, device=clean.device, dtype=clean.dtype))
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = shard.of(torch.randint(0, num_timesteps, (shard.total,), device=clean.device))
    input_noise = None
    if input_perturbation:
        extra = shard.of(torch.randn(*batch, *clean.shape[2:], device=clean.device, dtype=clean.dtype))
        input_noise = noise + input_perturbation * extra
    losses = weighted_losses(
        unet, noise_scheduler, clean, noise, timesteps, text_embeddings, snr_gamma, augment_labels, input_noise
    )
    return losses, timesteps


def diffusion_loss(unet, noise_scheduler, clean, text_embeddings, snr_gamma, noise_offset, shard=None) -> torch.Tensor:
    """The training loss: noise, random timesteps, target per prediction type, min-SNR weighted MSE."""
    return diffusion_losses(unet, noise_scheduler, clean, text_embeddings, snr_gamma, noise_offset, shard)[0].mean()


def timestep_buckets(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Which of VALIDATION_BUCKETS equal timestep ranges each timestep is in (0: least noise)."""
    return torch.div(timesteps * VALIDATION_BUCKETS, num_train_timesteps, rounding_mode="floor")


def bucket_names(prefix: str, num_train_timesteps: int) -> list[str]:
    """`prefix`/loss_tSTART per bucket, e.g. val/loss_t0300 for timesteps 300-399 of 1000."""
    width = len(str(num_train_timesteps))
    return [
        f"{prefix}/loss_t{bucket * num_train_timesteps // VALIDATION_BUCKETS:0{width}d}"
        for bucket in range(VALIDATION_BUCKETS)
    ]
