"""The loss, computed by hand: each prediction type's target (flow matching's too), min-SNR weights, noise offset,
input perturbation and zero-terminal-SNR betas, timestep samplings, against a UNet that returns its input (so that a wrong
sign or a swapped term changes the value, which a UNet of zeros would not see)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from text_to_image.common import UserError
from text_to_image.config import DiffusionConfig
from text_to_image.data import Shard
from text_to_image.evaluation import ValidationSet, fixed_noise, validation_losses
from text_to_image.loss import (
    DiffusionObjective,
    LogitNormalFlowTimes,
    MinSnrWeighting,
    UniformFlowTimes,
    UniformTimesteps,
    bucket_names,
    diffusion_losses,
    objective_for,
    shifted_times,
    timestep_buckets,
)
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


# ---------------------------------------------------------------------------------------------
# Flow matching: x_t = (1 - t) x0 + t noise, target noise - x0, the UNet's timestep t * num_train_timesteps

FLOW_TIMES = [0.0, 0.25, 0.5, 1.0]  # t = 0 is the clean image, t = 1 pure noise


class FixedFlowTimes:
    def draw(self, shard, num_timesteps, device):
        return shard.of(torch.tensor(FLOW_TIMES, device=device) * num_timesteps)


class RecordingEchoUNet(EchoUNet):
    def forward(self, sample, timesteps, encoder_hidden_states, **kwargs):
        self.timesteps = timesteps
        return super().forward(sample, timesteps, encoder_hidden_states, **kwargs)


def flow_by_hand(clean, noise_offset, input_perturbation):
    """The flow-matching loss from the formulas, replaying the loss's draws: noise, offset, perturbation."""
    noise = torch.randn(clean.shape)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(*clean.shape[:2], 1, 1)
    input_noise = noise + input_perturbation * torch.randn(clean.shape) if input_perturbation else noise
    t = torch.tensor(FLOW_TIMES, dtype=torch.double).view(-1, 1, 1, 1)
    clean, noise, input_noise = clean.double(), noise.double(), input_noise.double()
    noisy = (1 - t) * clean + t * input_noise
    return ((noisy - (noise - clean)) ** 2).mean(dim=(1, 2, 3))  # weight 1: min-SNR does not apply


def flow_scheduler(**flags):
    return build_noise_scheduler(DiffusionConfig(ddpm_num_steps=NUM_STEPS, prediction_type="flow_matching", **flags))


@pytest.mark.parametrize(("noise_offset", "input_perturbation"), [(0.0, 0.0), (0.1, 0.2)])
def test_flow_matching_loss_is_the_unweighted_error_against_noise_minus_clean(noise_offset, input_perturbation):
    noise_scheduler = flow_scheduler()
    clean = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    objective = DiffusionObjective(
        MinSnrWeighting(GAMMA),  # the trainer's weighting: 1 for flow matching whatever --snr_gamma
        timesteps=FixedFlowTimes(),
        noise_offset=noise_offset,
        input_perturbation=input_perturbation,
    )
    unet = RecordingEchoUNet()
    torch.manual_seed(0)
    losses, timesteps = diffusion_losses(unet, noise_scheduler, clean, torch.zeros(4, 2, 8), objective)
    torch.manual_seed(0)
    expected = flow_by_hand(clean, noise_offset, input_perturbation)
    assert type(noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert unet.timesteps.tolist() == timesteps.tolist() == [0.0, 25.0, 50.0, 100.0]  # t * num_train_timesteps
    assert torch.allclose(losses.double(), expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    noise = torch.randn(clean.shape)
    # at t = 1 the UNet sees the noise itself, so the echo's error is exactly the clean image: a target of
    # clean - noise (the sign flipped) or noise would leave a different value there
    if not noise_offset:
        assert torch.allclose(losses[-1], clean[-1].pow(2).mean())
        assert not torch.allclose(losses[-1], (2 * noise[-1] - clean[-1]).pow(2).mean())


def test_the_held_out_loss_of_a_flow_matching_model_uses_the_flow_target_in_tenths_of_t():
    noise_scheduler = flow_scheduler()
    pixels = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    validation = ValidationSet(pixels=pixels, captions=["a", "b", "c"])
    unet = EchoUNet()
    unet.config = SimpleNamespace(class_embed_type=None)  # no augmentation labels
    per_bucket = validation_losses(
        unet,
        noise_scheduler,
        validation,
        lambda captions: torch.zeros(len(captions), 2, 8),
        MinSnrWeighting(GAMMA),
        torch.device("cpu"),
    )
    clean = pixels.double() / 127.5 - 1
    for bucket, value in enumerate(per_bucket):
        noise, timesteps = fixed_noise(0, bucket, tuple(pixels.shape), NUM_STEPS, flow=True)
        t = timesteps.double() / NUM_STEPS
        assert ((bucket / 10 <= t) & (t < (bucket + 1) / 10)).all()
        t = t.view(-1, 1, 1, 1)
        noisy = (1 - t) * clean + t * noise.double()
        assert value == pytest.approx(
            ((noisy - (noise.double() - clean)) ** 2).mean(dim=(1, 2, 3)).mean().item(), rel=1e-5
        )


def test_flow_matching_timesteps_fall_in_the_tenth_of_t_they_are_in():
    timesteps = torch.tensor([0.0, 99.9, 100.0, 550.0, 999.9, 1000.0])
    assert timestep_buckets(timesteps, 1000).tolist() == [0, 0, 1, 5, 9, 9]  # t = 1 (a logit-normal can round to it)
    assert bucket_names("val", 1000)[3] == "val/loss_t0300"  # t in [0.3, 0.4)


def test_uniform_flow_times_are_one_draw_of_t_for_the_global_batch_sliced_to_the_shard():
    torch.manual_seed(0)
    expected = torch.rand(8) * NUM_STEPS
    for index in range(2):
        torch.manual_seed(0)
        drawn = UniformFlowTimes().draw(Shard(index=index, count=2, size=4), NUM_STEPS, "cpu")
        assert torch.equal(drawn, expected[4 * index : 4 * index + 4])


def test_logit_normal_flow_times_have_the_asked_mean_and_std_in_logit_space():
    torch.manual_seed(0)
    drawn = LogitNormalFlowTimes(mean=0.5, std=0.8).draw(Shard(size=200_000), NUM_STEPS, "cpu")
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.sigmoid(torch.randn(200_000) * 0.8 + 0.5) * NUM_STEPS)
    logits = torch.logit(drawn.double() / NUM_STEPS)
    assert logits.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logits.std().item() == pytest.approx(0.8, abs=0.01)
    assert 0 < drawn.min() and drawn.max() < NUM_STEPS


def test_timestep_shift_is_sd3s_formula_as_the_sampler_shifts_its_schedule():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert shifted_times(t, 3.0).tolist() == [0.0, 0.5, 0.75, 1.0]  # 3 t / (1 + 2 t)
    assert torch.equal(shifted_times(t, 1.0), t)
    sampler = flow_scheduler(timestep_shift=3.0)  # its schedule: the shifted grid k / T
    grid = torch.arange(NUM_STEPS, 0, -1, dtype=torch.float32) / NUM_STEPS
    assert torch.allclose(sampler.sigmas, shifted_times(grid, 3.0))
    torch.manual_seed(0)
    drawn = UniformFlowTimes(shift=3.0).draw(Shard(size=4), NUM_STEPS, "cpu")
    torch.manual_seed(0)
    assert torch.allclose(drawn, shifted_times(torch.rand(4), 3.0) * NUM_STEPS)


def test_flow_matching_flags_are_chosen_in_the_objective_and_refused_without_it():
    objective = objective_for(
        DiffusionConfig(
            prediction_type="flow_matching", timestep_sampling="logit_normal", logit_std=0.5, timestep_shift=2.0
        )
    )
    assert objective.timesteps == LogitNormalFlowTimes(mean=0.0, std=0.5, shift=2.0)
    assert objective_for(DiffusionConfig(prediction_type="flow_matching")).timesteps == UniformFlowTimes()
    assert objective_for(DiffusionConfig()).timesteps == UniformTimesteps()
    with pytest.raises(
        UserError, match="--timestep_sampling and --timestep_shift apply to --prediction_type flow_matching"
    ):
        DiffusionConfig(timestep_shift=3.0)
    with pytest.raises(UserError, match="--rescale_betas_zero_snr rescales DDPM betas"):
        DiffusionConfig(prediction_type="flow_matching", rescale_betas_zero_snr=True)
    with pytest.raises(UserError, match="--timestep_shift must be above 0"):
        DiffusionConfig(prediction_type="flow_matching", timestep_shift=0.0)
