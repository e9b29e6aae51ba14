"""--cuda_graphs: the step as one device function (captured.DeviceStep). On the CPU: it traces whole under
torch.compile and trains the eager step's weights; the capture-and-replay plumbing (static inputs, the
learning rate and EMA weight written per step, accelerate's step count) trains and resumes exactly, with a
capture that replays by calling the function again."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_tensors, resume_from_the_checkpoint_before, run_ok, train_argv
from safetensors.torch import load_file

from text_to_image.captured import CapturedStep, DeviceFeed, device_step_of, why_not_captured
from text_to_image.config import DiffusionConfig, RunConfig, parse_args
from text_to_image.data import Shard
from text_to_image.loss import diffusion_losses, objective_for, timestep_buckets
from text_to_image.models import build_noise_scheduler
from text_to_image.setup import setup_run


def set_up(argv: list[str]):
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    return setup_run(RunConfig.from_args(args))


def trained_state(run) -> dict[str, torch.Tensor]:
    """The UNet's weights, the EMA's and AdamW's moments and step counts, by name."""
    trainer = run.trainer
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    named = dict(trainer.unet.named_parameters())
    state = {f"unet.{name}": parameter.detach().clone() for name, parameter in named.items()}
    for (name, parameter), shadow in zip(named.items(), trainer.ema.shadow_params, strict=True):
        state[f"ema.{name}"] = shadow.clone()
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state[f"adamw.{key}.{name}"] = optimizer.state[parameter][key].clone()
    return state


def assert_close_states(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def argv(tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path):
    def make(*extra: str, output: str = "out") -> list[str]:
        flags = ("--max_grad_norm", "0.05", "--random_flip")  # a clip that bites, and a draw per image
        return train_argv(
            tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / output, *flags, *extra
        )

    return make


ON_DEVICE = ("--data_on_device", "yes", "--augment_prob", "0.5", "--gradient_accumulation_steps", "2")


@pytest.mark.slow
def test_the_device_step_traces_whole_and_trains_the_eager_steps_weights(argv, monkeypatch):
    flags = ()
    eager = set_up(argv(*flags, output="eager"))
    eager_losses = [eager.trainer.step(step)[0] for step in range(3)]

    traced = set_up(argv(*flags, output="traced"))
    trainer = traced.trainer
    untrained = trainer.unet.conv_in.weight.detach().clone()
    device_step = device_step_of(trainer)
    monkeypatch.setattr(torch._dynamo.config, "trace_autograd_ops", True)  # backward() inside the graph
    torch._dynamo.reset()
    # fullgraph: a graph break (a host sync, a data-dependent branch, an untraceable call) is an error. Dynamo's
    # trace is what is checked (a run captures the step in a CUDA graph, no compiler); the eager backend runs it
    # in a third of aot_eager's time
    compiled = torch.compile(device_step, fullgraph=True, backend="eager")
    traced_losses = []
    # step 0 (the warm-up's zero learning rate) runs untraced: dynamo guards on each param group's lr and would
    # trace the whole step a second time for step 1's; traced steps 1 and 2 read the rate set_scalars writes
    # (the tensor holds step 0's zero until it does)
    for step, run_step in enumerate((device_step, compiled, compiled)):
        inputs = device_step.inputs(trainer.micro_indices(step))
        device_step.set_scalars()
        traced_losses.append(run_step(inputs).loss)
        trainer.lr_scheduler.step()
    torch._dynamo.reset()

    torch.testing.assert_close(torch.stack(traced_losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-6)
    assert trainer.ema.optimization_step == eager.trainer.ema.optimization_step == 3
    assert_close_states(trained_state(traced), trained_state(eager))
    moved = trained_state(traced)["unet.conv_in.weight"] - untrained
    assert moved.abs().max() > 1e-4  # the weights did train


def test_the_batch_drawn_on_the_device_traces_whole_and_draws_every_number(argv):
    """The rest of a --data_on_device step (a minute to trace with the UNet; the test above traces that). A
    traced function drops random numbers it never reads and draws the next ones in their place: the generator
    must end where the eager draws leave it."""
    flags = ("--augment_prob", "0.5", "--alpha_background", "random", "--caption_shuffle_separator", " ")
    trainer = set_up(argv("--data_on_device", "yes", *flags)).trainer
    feed = DeviceFeed(trainer.batches, trainer.conditioner.embed)  # what a --cuda_graphs step gathers with
    rows = trainer.batches.rows(range(1))[0]
    torch.manual_seed(3)
    eager = feed.gathered(rows)
    eager_generator = torch.get_rng_state()
    torch._dynamo.reset()
    compiled = torch.compile(feed.gathered, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    traced = compiled(rows)
    torch._dynamo.reset()
    assert torch.equal(torch.get_rng_state(), eager_generator)
    for traced_part, eager_part in zip(traced, eager, strict=True):
        assert torch.equal(traced_part, eager_part)


def replay_by_calling_again(run):
    """A stand-in for a CUDA graph on the CPU: replaying runs the captured function on the fixed inputs."""
    return run


@pytest.fixture
def capture_on_the_cpu(monkeypatch):
    monkeypatch.setattr("text_to_image.setup.why_not_captured", lambda config, accelerator: None)
    monkeypatch.setattr("text_to_image.captured.capture_cuda_graph", replay_by_calling_again)


@pytest.mark.parametrize("flags", [(), ON_DEVICE], ids=["host-gathered", "drawn-on-the-device"])
def test_captured_steps_train_the_eager_steps_weights(argv, capture_on_the_cpu, flags):
    eager = set_up(argv(*flags, output="eager"))
    for step in range(5):
        eager.trainer.step(step)
    captured = set_up(argv("--cuda_graphs", *flags, output="captured"))  # seeds the global RNG again, as a run does
    assert isinstance(captured.trainer.captured, CapturedStep) and eager.trainer.captured is None
    for step in range(5):  # 3 eager, the capture, a replay
        captured.trainer.step(step)
    assert captured.trainer.captured.static_inputs is not None  # it was captured
    assert captured.accelerator.step == eager.accelerator.step == 5 * captured.trainer.accumulation
    assert captured.trainer.lr_scheduler.get_last_lr() == eager.trainer.lr_scheduler.get_last_lr()
    assert_close_states(trained_state(captured), trained_state(eager))


@pytest.mark.slow
def test_a_compiled_unet_trains_the_same_weights_in_captured_steps(argv, capture_on_the_cpu, monkeypatch):
    """--torch_compile with --cuda_graphs: the step runs the compiled UNet (traced here with aot_eager, as
    inductor would take minutes on the CPU) and updates its weights, AdamW moments and EMA by their _orig_mod names."""
    compile_as_configured = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile_as_configured(model, backend="aot_eager"))
    torch._dynamo.reset()
    eager = set_up(argv("--torch_compile", output="eager"))
    for step in range(5):
        eager.trainer.step(step)
    captured = set_up(argv("--torch_compile", "--cuda_graphs", output="captured"))
    for step in range(5):
        captured.trainer.step(step)
    torch._dynamo.reset()
    assert captured.trainer.captured.static_inputs is not None
    state = trained_state(captured)
    assert any(name.startswith("unet._orig_mod.") for name in state)
    assert_close_states(state, trained_state(eager))


@pytest.mark.slow
@pytest.mark.parametrize(
    "accumulation, on_device", [("1", "no"), ("2", "no"), ("2", "yes")], ids=["1", "2", "2-drawn-on-the-device"]
)
def test_captured_steps_resume_exactly(argv, tmp_path, capture_on_the_cpu, accumulation, on_device):
    def make(*extra, output):
        flags = ("--gradient_accumulation_steps", accumulation, "--data_on_device", on_device)
        return argv("--cuda_graphs", *flags, *extra, output=output)

    flags = ("--max_train_steps", "8", "--checkpointing_steps", "4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(make(*flags, output=straight))  # steps 1-3 eager, 4 captured, 5-8 replayed
    resume_from_the_checkpoint_before(make, flags, straight, 8, resumed)  # 5-7 eager, 8 captured
    assert_same_tensors(
        load_file(straight / "checkpoint-8" / "model.safetensors"),
        load_file(resumed / "checkpoint-8" / "model.safetensors"),
    )
    assert_same_tensors(
        torch.load(straight / "checkpoint-8" / "optimizer.bin", weights_only=False)["state"][0],
        torch.load(resumed / "checkpoint-8" / "optimizer.bin", weights_only=False)["state"][0],
    )


def test_cuda_graphs_without_a_gpu_trains_eagerly_and_says_why(argv, caplog):
    with caplog.at_level("INFO"):
        run = set_up(argv("--cuda_graphs"))
    assert run.trainer.captured is None
    assert "--cuda_graphs: training eagerly, because no CUDA device" in caplog.text


@pytest.mark.parametrize(
    "setting, why",
    [
        ({"distributed_type": "DEEPSPEED"}, "DeepSpeed steps the optimizer itself"),
        ({"num_processes": 2}, "more than one process"),
        ({"mixed_precision": "fp16"}, "fp16's loss scaler skips steps on the host; use bf16"),
        ({"xformers": True}, "xformers attention is not captured"),
        ({"train_text_encoder": True}, "--train_text_encoder trains the encoder outside the step"),
        ({"ema_offload": True}, "--ema_offload keeps the EMA in CPU memory"),
        ({"gradient_checkpointing": True}, "--gradient_checkpointing reads and rewinds the GPU's random state"),
        ({}, None),
    ],
)
def test_what_cuda_graphs_cannot_capture_is_named(setting, why):
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(
        device=torch.device("cuda"),
        distributed_type=DistributedType[setting.get("distributed_type", "NO")],
        num_processes=setting.get("num_processes", 1),
        mixed_precision=setting.get("mixed_precision", "bf16"),
    )
    config = SimpleNamespace(
        model=SimpleNamespace(
            enable_xformers_memory_efficient_attention=setting.get("xformers", False),
            train_text_encoder=setting.get("train_text_encoder", False),
            gradient_checkpointing=setting.get("gradient_checkpointing", False),
        ),
        optim=SimpleNamespace(ema_offload=setting.get("ema_offload", False)),
    )
    reason = why_not_captured(config, accelerator)
    assert reason == why if why is None else why in reason


@dataclass
class Prediction:
    sample: torch.Tensor  # as the UNet's output holds it (a dataclass: torch.compile traces it)


class TimedConv(torch.nn.Module):
    """A one-layer stand-in for the UNet that reads its timestep."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, sample, timesteps, encoder_hidden_states, **kwargs):
        return Prediction(sample=self.conv(sample) * timesteps.view(-1, 1, 1, 1) / 100)


def test_the_flow_matching_loss_traces_whole_and_draws_every_number():
    """--cuda_graphs with --prediction_type flow_matching: the loss (its t draws, x_t, the velocity target, the
    buckets) traces without a graph break, gives the eager losses and leaves the generator where eager does. The
    first test traces the whole step with the UNet; this is its flow-matching part, in seconds."""
    diffusion = DiffusionConfig(
        ddpm_num_steps=100, prediction_type="flow_matching", timestep_sampling="logit_normal", timestep_shift=3.0
    )
    noise_scheduler, objective = build_noise_scheduler(diffusion), objective_for(diffusion)
    unet, shard = TimedConv(), Shard(index=1, count=2, size=2)  # the second process's half of a global batch of 4

    def losses(clean):
        per_sample, timesteps = diffusion_losses(unet, noise_scheduler, clean, torch.zeros(2, 2, 8), objective, shard)
        return per_sample, timestep_buckets(timesteps, noise_scheduler.config.num_train_timesteps)

    clean = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.manual_seed(5)
    eager = losses(clean)
    eager_generator = torch.get_rng_state()
    torch._dynamo.reset()
    torch.manual_seed(5)
    traced = torch.compile(losses, fullgraph=True, backend="aot_eager")(clean)
    torch._dynamo.reset()
    assert torch.equal(torch.get_rng_state(), eager_generator)
    torch.testing.assert_close(traced[0], eager[0])
    assert torch.equal(traced[1], eager[1])
