"""Two processes for real: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` over gloo."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file

import train_text_to_image as trainer
from text_to_image.checkpoints import CHECKPOINT_MARKER
from text_to_image.common import UserError
from text_to_image.config import DiffusionConfig, RunConfig, parse_args
from text_to_image.evaluation import BEST_DIR, EVALUATION_LOG
from text_to_image.loss import DiffusionObjective, MinSnrWeighting, StepLoss
from text_to_image.models import build_noise_scheduler, build_unet
from text_to_image.setup import check_distributed_type

SCRIPT = Path(trainer.__file__)


def launch(argv: list[str], num_processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(SCRIPT), *argv]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def flags(tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file):
    def make(output: Path, batch: int, *extra: str) -> list[str]:
        argv = train_argv(tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, output, *extra)
        argv[argv.index("--train_batch_size") + 1] = str(batch)
        return argv

    return make


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one_process(flags, tmp_path):
    common = ("--use_ema", "--random_flip", "--max_train_steps", "4", "--checkpointing_steps", "2")
    common += ("--validation_split", "4", "--validation_steps", "2", "--keep_best", "val_loss")
    common += ("--augment_prob", "0.5", "--input_perturbation", "0.1", "--caption_shuffle_separator", " ")
    two = tmp_path / "two"
    first = launch(flags(two, 2, *common), num_processes=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "batch 2 x 2 processes x 1 accumulation = 4 per step" in first.stderr
    assert sorted(path.name for path in (two / "checkpoint-4").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert json.loads((two / "checkpoint-4" / CHECKPOINT_MARKER).read_text())["num_processes"] == 2
    assert (two / "model_index.json").is_file() and list((two / "samples").glob("*.png"))

    shutil.rmtree(two / "checkpoint-4")
    resumed = launch(flags(two, 2, *common, "--resume_from_checkpoint", "latest"), num_processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    written = (two / "run_config.yaml").read_text()  # the resumed session's, by the main process alone
    assert "# seed, chosen: the seed of the run resumed from " in written and "checkpoint-2\nseed: 0\n" in written
    assert "# mixed_precision, chosen: no --mixed_precision; accelerate launch's config says no\n" in written

    one = tmp_path / "one"
    assert trainer.main(flags(one, 4, *common)) == 0
    two_weights = load_file(two / "checkpoint-4" / "model.safetensors")
    one_weights = load_file(one / "checkpoint-4" / "model.safetensors")
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    # evaluated on the main process while the other waits: the same held-out loss as one process
    records = {run: (run / EVALUATION_LOG).read_text().splitlines() for run in (one, two)}
    losses = {run: [json.loads(line)["val/loss"] for line in lines] for run, lines in records.items()}
    assert len(losses[two]) == 2 and losses[two] == pytest.approx(losses[one], rel=1e-4)
    assert (two / BEST_DIR / "model_index.json").is_file()


@pytest.mark.slow
def test_two_processes_drawing_on_the_device_train_the_one_process_weights(flags, tmp_path):
    common = ("--data_on_device", "yes", "--random_flip", "--augment_prob", "0.5", "--max_train_steps", "3")
    two = tmp_path / "two"
    launched = launch(flags(two, 2, *common), num_processes=2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "data on the device" in launched.stderr
    one = tmp_path / "one"
    assert trainer.main(flags(one, 4, *common)) == 0
    assert json.loads((one / "checkpoint-3" / "train_state.json").read_text())["data_on_device"] is True
    two_weights = load_file(two / "checkpoint-3" / "model.safetensors")
    for name, weight in load_file(one / "checkpoint-3" / "model.safetensors").items():
        torch.testing.assert_close(two_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_with_another_process_count_is_refused(flags, tmp_path, capsys):
    output = tmp_path / "out"
    assert trainer.main(flags(output, 2, "--max_train_steps", "2")) == 0
    # as a 2-process launch writes it (test_two_processes_train_checkpoint_resume_and_match_one_process checks that)
    state_file = output / "checkpoint-2" / CHECKPOINT_MARKER
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"num_processes": 2}))
    assert trainer.main(flags(output, 2, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")) == 2
    assert "written by 2 processes; resume it with the same --num_processes 2" in capsys.readouterr().err


def test_multi_gpu_launch_without_gpus_or_cpu_flag_is_refused(flags, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("GPUs present: the launch would be real")
    # what `accelerate launch --multi_gpu --num_processes 2` without ACCELERATE_USE_CPU gives each process: its
    # rank and the world's size, and (no GPU, no --cpu) accelerate starts it as a process of its own. In this
    # process: a real launch takes 13 s to start its interpreters, and the refusal is the trainer's own
    for variable, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert trainer.main(flags(tmp_path / "out", 2)) == 2
    error = capsys.readouterr().err
    assert "launched as 2 processes but they are not connected" in error and "ACCELERATE_USE_CPU=1" in error


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "multi_node", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_are_valid_for_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU", "fsdp": "FSDP"}
    assert config.distributed_type.value == expected.get(name, "DEEPSPEED")
    assert config.num_processes >= 1 and config.num_machines == (2 if name == "multi_node" else 1)


def launcher_environment(config_file: Path) -> tuple:
    """What `accelerate launch --config_file` would run with: its own validation and environment, no process started.

    Uses accelerate's private _validate_launch_command (the step between parsing and launching), so a
    change there in a later accelerate shows up here rather than on someone's cluster.
    """
    from accelerate.commands import launch
    from accelerate.utils import launch as launch_utils

    args = launch.launch_command_parser().parse_args(["--config_file", str(config_file), "train_text_to_image.py"])
    args, defaults, _ = launch._validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        return args, launch_utils.prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu or args.use_fsdp:
        return args, launch_utils.prepare_multi_gpu_env(args)
    return args, launch_utils.prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero2"])
def test_nested_config_keys_are_options_accelerate_launch_knows(name):
    """accelerate copies unknown fsdp_config/deepspeed_config keys onto its arguments silently: catch typos here."""
    import yaml
    from accelerate.commands.launch import launch_command_parser

    known = vars(launch_command_parser().parse_args(["train_text_to_image.py"]))
    section = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())[f"{name.split('_')[0]}_config"]
    assert [key for key in section if key not in known] == []


def test_launcher_reads_the_configs_as_intended():
    args, environment = launcher_environment(ACCELERATE_CONFIGS / "multi_node.yaml")
    assert (args.num_machines, args.num_processes, args.main_process_port) == (2, 16, 29500)
    args, environment = launcher_environment(ACCELERATE_CONFIGS / "fsdp.yaml")
    assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert environment["FSDP_AUTO_WRAP_POLICY"] == "SIZE_BASED_WRAP"
    assert environment["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    args, environment = launcher_environment(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml")
    assert environment["ACCELERATE_USE_DEEPSPEED"] == "true" and environment["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    args, environment = launcher_environment(ACCELERATE_CONFIGS / "single_gpu.yaml")
    assert environment["ACCELERATE_MIXED_PRECISION"] == "bf16" and args.num_processes == 1


def test_loss_runs_on_a_unet_held_in_bf16_as_deepspeed_holds_it(tiny_unet_config_file):
    """DeepSpeed casts the model to bf16 and accelerate does not autocast then: the loss feeds it bf16 inputs."""
    unet = build_unet(str(tiny_unet_config_file), 16, 64).to(torch.bfloat16)
    scheduler = build_noise_scheduler(
        DiffusionConfig.from_args(parse_args(["--train_data_dir", "d", "--ddpm_num_steps", "100"]))
    )
    loss = StepLoss(unet, scheduler, DiffusionObjective(MinSnrWeighting(5.0))).micro_batch(
        torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 8, 64)
    )
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert unet.conv_in.weight.grad.dtype == torch.bfloat16


def fake_accelerator(distributed_type: str, deepspeed_config: dict | None = None):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config=deepspeed_config)
    return SimpleNamespace(
        distributed_type=DistributedType(distributed_type), state=SimpleNamespace(deepspeed_plugin=plugin)
    )


def run_config(*argv: str):
    return RunConfig.from_args(parse_args(["--train_data_dir", str(Path(__file__).parent), *argv]))


def test_fsdp_is_refused_with_what_to_use_instead():
    with pytest.raises(UserError, match="FSDP is not supported.*multi_gpu.yaml.*deepspeed_zero2.yaml"):
        check_distributed_type(fake_accelerator("FSDP"), run_config())


def test_deepspeed_gets_the_flags_batch_size_accumulation_and_clipping():
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    argv = ["--train_batch_size", "6", "--gradient_accumulation_steps", "4"]
    check_distributed_type(fake_accelerator("DEEPSPEED", config), run_config(*argv, "--max_grad_norm", "0.5"))
    assert config == {"train_micro_batch_size_per_gpu": 6, "gradient_accumulation_steps": 4, "gradient_clipping": 0.5}
    with pytest.raises(UserError, match="--train_text_encoder with DeepSpeed is not supported"):
        check_distributed_type(fake_accelerator("DEEPSPEED", {}), run_config(*argv, "--train_text_encoder"))


def test_deepspeed_launch_without_deepspeed_installed_says_so(flags, tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("deepspeed"):
        pytest.skip("deepspeed is installed here")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a DeepSpeed config sets
    assert trainer.main(flags(tmp_path / "out", 2)) == 2
    assert (
        "error: the accelerate launch config needs a package that is missing: DeepSpeed is not installed"
        in capsys.readouterr().err
    )
