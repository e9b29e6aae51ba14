"""The loss, computed by hand: each prediction type's target, min-SNR weights, noise offset, input
perturbation and zero-terminal-SNR betas, against a UNet that returns its input (so that a wrong
sign or a swapped term changes the value, which a UNet of zeros would not see)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from text_to_image.config import DiffusionConfig
from text_to_image.data import Shard
from text_to_image.loss import DiffusionObjective, MinSnrWeighting, diffusion_losses
from text_to_image.models import build_noise_scheduler

NUM_STEPS = 100
TIMESTEPS = [0, 37, 80, NUM_STEPS - 1]  # the last: SNR 0 with zero-terminal-SNR betas
GAMMA = 5.0


class EchoUNet(torch.nn.Module):
    """Predicts its noisy input."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the loss reads the UNet's dtype from its parameters

    def forward(self, sample, timesteps, encoder_hidden_states, **kwargs):
        return SimpleNamespace(sample=sample.clone())


class FixedTimesteps:
    def draw(self, shard, num_timesteps, device):
        return shard.of(torch.tensor(TIMESTEPS, device=device))


def by_hand(clean, alphas_cumprod, prediction_type, noise_offset, input_perturbation):
    """The per-sample loss from the formulas, replaying the loss's draws: noise, offset, perturbation."""
    noise = torch.randn(clean.shape)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(*clean.shape[:2], 1, 1)
    input_noise = noise + input_perturbation * torch.randn(clean.shape) if input_perturbation else noise
    alpha = alphas_cumprod[torch.tensor(TIMESTEPS)].double().view(-1, 1, 1, 1)
    clean, noise, input_noise = clean.double(), noise.double(), input_noise.double()
    noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * input_noise
    target = {
        "epsilon": noise,
        "sample": clean,
        "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * clean,
    }[prediction_type]
    snr = (alpha / (1 - alpha)).view(-1)
    clipped = torch.minimum(snr, torch.tensor(GAMMA, dtype=torch.double))
    weight = {
        "epsilon": torch.where(snr > 0, clipped / snr, torch.ones_like(snr)),  # min(snr, gamma) / snr, 1 at snr 0
        "sample": clipped,
        "v_prediction": clipped / (snr + 1),
    }[prediction_type]
    return ((noisy - target) ** 2).mean(dim=(1, 2, 3)) * weight


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize(
    ("noise_offset", "input_perturbation", "zero_terminal_snr"),
    [(0.0, 0.0, False), (0.1, 0.0, False), (0.0, 0.2, False), (0.1, 0.2, True)],
)
def test_each_samples_loss_is_the_weighted_error_against_its_prediction_types_target(
    prediction_type, noise_offset, input_perturbation, zero_terminal_snr
):
    noise_scheduler = build_noise_scheduler(
        DiffusionConfig(
            ddpm_num_steps=NUM_STEPS,
            ddpm_beta_schedule="linear",
            prediction_type=prediction_type,
            rescale_betas_zero_snr=zero_terminal_snr,
        )
    )
    clean = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    objective = DiffusionObjective(
        MinSnrWeighting(GAMMA),
        timesteps=FixedTimesteps(),
        noise_offset=noise_offset,
        input_perturbation=input_perturbation,
    )
    torch.manual_seed(0)
    losses, timesteps = diffusion_losses(EchoUNet(), noise_scheduler, clean, torch.zeros(4, 2, 8), objective)
    torch.manual_seed(0)
    expected = by_hand(clean, noise_scheduler.alphas_cumprod, prediction_type, noise_offset, input_perturbation)
    assert timesteps.tolist() == TIMESTEPS
    assert torch.allclose(losses.double(), expected, rtol=1e-4, atol=1e-6)
    if zero_terminal_snr:
        assert noise_scheduler.alphas_cumprod[-1] < 1e-6  # the last timestep is (near) pure noise
    assert torch.isfinite(losses).all()


def test_a_shard_gets_the_losses_of_its_slice_of_the_global_batch():
    noise_scheduler = build_noise_scheduler(DiffusionConfig(ddpm_num_steps=NUM_STEPS, ddpm_beta_schedule="linear"))
    clean = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    objective = DiffusionObjective(MinSnrWeighting(GAMMA), timesteps=FixedTimesteps(), noise_offset=0.1)
    torch.manual_seed(0)
    whole, _ = diffusion_losses(EchoUNet(), noise_scheduler, clean, torch.zeros(4, 2, 8), objective)
    halves = []
    for index in range(2):
        torch.manual_seed(0)
        shard = Shard(index=index, count=2, size=2)
        halves.append(
            diffusion_losses(
                EchoUNet(), noise_scheduler, clean[2 * index : 2 * index + 2], torch.zeros(2, 2, 8), objective, shard
            )[0]
        )
    assert torch.allclose(torch.cat(halves), whole)
