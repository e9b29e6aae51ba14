"""Two processes for real: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` over gloo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import train_argv

import train_text_to_image as trainer

SCRIPT = Path(trainer.__file__)


def launch(argv: list[str], num_processes: int, use_cpu: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
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


def test_two_processes_train_checkpoint_resume_and_match_one_process(flags, tmp_path):
    common = ("--use_ema", "--random_flip", "--max_train_steps", "4", "--checkpointing_steps", "2")
    two = tmp_path / "two"
    first = launch(flags(two, 2, *common), num_processes=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "batch 2 x 2 processes x 1 accumulation = 4 per step" in first.stderr
    assert sorted(path.name for path in (two / "checkpoint-4").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (two / "model_index.json").is_file() and list((two / "samples").glob("*.png"))

    shutil.rmtree(two / "checkpoint-4")
    resumed = launch(flags(two, 2, *common, "--resume_from_checkpoint", "latest"), num_processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr

    one = tmp_path / "one"
    assert trainer.main(flags(one, 4, *common)) == 0
    two_weights = load_file(two / "checkpoint-4" / "model.safetensors")
    one_weights = load_file(one / "checkpoint-4" / "model.safetensors")
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_with_another_process_count_is_refused(flags, tmp_path, capsys):
    output = tmp_path / "out"
    first = launch(flags(output, 2, "--max_train_steps", "2"), num_processes=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert trainer.main(flags(output, 2, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")) == 2
    assert "written by 2 processes; resume it with the same --num_processes 2" in capsys.readouterr().err


def test_multi_gpu_launch_without_gpus_or_cpu_flag_is_refused(flags, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("GPUs present: the launch would be real")
    result = launch(flags(tmp_path / "out", 2), num_processes=2, use_cpu=False)
    assert result.returncode != 0
    assert "not connected" in result.stderr and "ACCELERATE_USE_CPU=1" in result.stderr
