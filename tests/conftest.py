"""Tiny components built on disk, loaded by the code under test through its normal paths."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_DIR"] = tempfile.mkdtemp(prefix="wandb-tests-")
# nothing from this machine's Hugging Face cache (a cached openai/clip-vit-large-patch14 would load), and the
# CPU even where there is a GPU: the bit-identity tests compare CPU kernels' results
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-tests-")
for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE"):
    os.environ.pop(variable, None)
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def threads_per_worker() -> int:
    """Under pytest-xdist each worker gets its share of the cores: N workers each running torch on every core
    would oversubscribe them and run slower together than one after another."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // workers)


if "PYTEST_XDIST_WORKER" in os.environ:
    # set before torch is first imported, and inherited by the processes tests start (accelerate launch)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads_per_worker())

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ["square", "circle"]
TINY_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}


def draw_shape(colour: str, shape: str, size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def caption_of_pixels(image) -> str:
    """The caption an image of conftest.draw_shape was drawn for: the colour at the centre, and whether the
    corner of the shape's box is filled (square) or white (circle). `image` is [3, R, R], uint8 or in [-1, 1]."""
    import torch

    rgb = image.float() if image.dtype == torch.uint8 else (image.float() + 1) * 127.5
    size = rgb.shape[-1]
    centre = rgb[:, size // 2, size // 2]
    colour = min(COLOURS, key=lambda name: float(((torch.tensor(COLOURS[name]) - centre) ** 2).sum()))
    corner = rgb[:, size // 4, size // 4]
    shape = "circle" if bool((corner > 240).all()) else "square"
    return f"a {colour} {shape}"


def tiny_captions() -> list[str]:
    return [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]


def write_imagefolder(folder: Path, count: int = 16, size: int = 16, captions=None) -> Path:
    """An imagefolder dataset: PNGs + metadata.jsonl with `file_name` and `text`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
        name = f"{index:03d}.png"
        draw_shape(colour, shape, size).save(folder / name)
        text = captions[index] if captions is not None else f"a {colour} {shape}"
        rows.append({"file_name": name, "text": text})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder `make(folder)` fills once per test session, shared by the pytest-xdist workers: the first worker to
    ask makes it, the others wait for it (a session fixture would be made again in every worker)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # the workers' temporary folders sit side by side in one of this session's own
    root = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(parents=True, exist_ok=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_text_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide CLIPTextModel + CLIPTokenizer with a vocabulary from the test captions."""
    from make_text_encoder import build_text_encoder

    words = tiny_captions() + ["on a white background", "an empty caption"]
    folder = tmp_path_factory.mktemp("text_encoder")
    return build_text_encoder(words, folder, hidden_size=64, num_layers=2, num_heads=2, max_length=32)


@pytest.fixture(scope="session")
def tiny_unet_config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unet") / "config.json"
    path.write_text(json.dumps(TINY_UNET_CONFIG))
    return path


@pytest.fixture
def tiny_imagefolder(tmp_path) -> Path:
    return write_imagefolder(tmp_path / "data")


def train_argv(data: Path, text_encoder: Path, unet_config: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--train_data_dir", str(data),
        "--text_encoder_name_or_path", str(text_encoder),
        "--model_config_name_or_path", str(unet_config),
        "--output_dir", str(output),
        "--resolution", "16",
        "--train_batch_size", "4",
        "--eval_batch_size", "2",
        "--max_train_steps", "4",
        "--lr_warmup_steps", "1",
        "--ddpm_num_steps", "100",
        "--ddpm_num_inference_steps", "2",
        "--checkpointing_steps", "2",
        "--logger", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def argv(tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path):
    def make(*extra: str, output: Path | None = None) -> list[str]:
        return train_argv(
            tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, output or tmp_path / "out", *extra
        )

    return make


def run_ok(argv: list[str]) -> None:
    import train_text_to_image as trainer

    assert trainer.main(argv) == 0


def run_error(argv: list[str], capsys) -> str:
    import train_text_to_image as trainer

    assert trainer.main(argv) == 2
    return capsys.readouterr().err


def read_until(stream, pattern: str, seconds: float) -> str:
    """What a process wrote to `stream` up to where `pattern` (a regex) appears: a wait on the process's own
    progress, not on the clock, so that it holds on a slow machine and a fast one alike."""
    import re
    import time

    deadline, seen = time.monotonic() + seconds, ""
    while not re.search(pattern, seen[-400:]):
        character = stream.read(1)
        if not character or time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} within {seconds} s; the process wrote: {seen[-2000:]}")
        seen += character
    return seen


def assert_same_tensors(first: dict, second: dict) -> None:
    import torch

    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def resume_from_the_checkpoint_before(argv, flags: tuple, straight: Path, last_step: int, resumed: Path) -> None:
    """`resumed`: the finished run in `straight` as if it had stopped before its last checkpoint and export
    (a copy without them), resumed from the checkpoint before. The export must then be written again."""
    import shutil

    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / f"checkpoint-{last_step}")
    shutil.rmtree(resumed / "unet")
    (resumed / "model_index.json").unlink()
    run_ok(argv(*flags, "--resume_from_checkpoint", "latest", output=resumed))
    assert (resumed / "model_index.json").is_file() and (resumed / "unet").is_dir()


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker more than the cores. Much of the suite's time is spent starting interpreters (launches,
    example scripts) and writing checkpoints, when a worker does not use its core; on 2 cores 3 workers finish the
    suite in 299 s where 2 take 320 s (torch keeps one thread a worker, threads_per_worker)."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds; scheduled first so parallel workers end together")


def pytest_collection_modifyitems(config, items):
    # slow tests first: with --dist worksteal they make up the first worker's share, one after another, while the
    # other workers run the short ones and then steal from the end of its queue (short ones first). Striping them
    # across the workers' shares, so that all start at once, was slower on 2 cores (341 and 354 s against 299-314 s:
    # launches and example scripts running side by side oversubscribe the cores). The same order in every worker.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
