"""Train a text-conditional pixel-space diffusion model from scratch on captioned images.

One GPU, a notebook cell, a laptop CPU or many GPUs:

    accelerate launch train_text_to_image.py --train_data_dir data/shapes --resolution 32 --output_dir out
    !accelerate launch train_text_to_image.py --config my_run.yaml          # Kaggle / Colab cell
    python train_text_to_image.py --dataset_name diffusers/pokemon-gpt4-captions --output_dir out
    accelerate launch --multi_gpu --num_processes 4 train_text_to_image.py ...

Resume an interrupted run with the same command plus `--resume_from_checkpoint latest`.
The finished `--output_dir` is a diffusers pipeline: see pipeline_text_to_image.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("train_text_to_image")

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
# --model_size presets: channels per level (cut to the resolution's levels) and ResNet layers per level
MODEL_SIZES = {
    "tiny": ((32, 64, 128, 128, 256, 256), 1),
    "small": ((64, 128, 128, 256, 256, 256), 1),
    "base": ((128, 128, 256, 256, 512, 512), 2),
    "large": ((192, 192, 384, 384, 768, 768), 2),
}
DEFAULT_MODEL_SIZE = "base"
ATTENTION_MAX_RESOLUTION = 16  # cross-attention only where the feature map is at most this wide
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_MARKER = "train_state.json"
PIPELINE_STAGING = ".pipeline.tmp"  # a pipeline export is written here, then swapped in
PIPELINE_RETIRED = ".pipeline.old"  # the entries it replaces, until the swap is complete
MAX_BAD_IMAGE_SHARE = 0.5
STREAM_CAPTION_SAMPLE = 256  # streamed examples whose captions stand in for the dataset's (validation prompts)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises for corrupt/truncated files
# With several processes, agreeing to stop is a collective and so a host-device sync: every few steps, not every step
STOP_CHECK_STEPS = 10
DISK_BYTES_PER_SECOND = 100e6  # a slow notebook disk: the estimate of a save's time before one is measured
MIN_USEFUL_LEVEL_SIZE = 4  # px: below it a UNet level sees (almost) one pixel


class UserError(Exception):
    """A mistake in the user's flags or data: printed as one line, no traceback."""


def exists(value) -> bool:
    return value is not None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a text-to-image diffusion model (diffusers UNet2DConditionModel, pixel space).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--config", type=Path, help="YAML or JSON file of flag values (keys are flag names); command-line flags win.")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        help="Hub dataset id, or a local folder load_dataset understands (parquet/csv/json/arrow files, a save_to_disk folder).",
    )
    data.add_argument("--dataset_config_name", help="Dataset configuration name, if the dataset has several.")
    data.add_argument(
        "--train_data_dir", help="An imagefolder folder: images plus metadata.jsonl or metadata.csv with the captions."
    )
    data.add_argument("--cache_dir", help="Where downloaded datasets and models are cached.")
    data.add_argument("--image_column", default="image", help="Column holding the images.")
    data.add_argument(
        "--caption_column", default="text", help="Column holding the captions (a string, a list of strings, or empty)."
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=64,
        help="Training images are resized (shorter side) and cropped to this size.",
    )
    data.add_argument("--center_crop", action="store_true", help="Crop the centre instead of a random square.")
    data.add_argument(
        "--random_flip",
        action="store_true",
        help="Flip images horizontally at random (not for captions that say left/right).",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Worker processes that decode images: all of them once before training, or, when they are decoded per batch (--streaming, or more than --image_cache_max_gb), each batch ahead of the step.",
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Read the dataset as a stream (datasets IterableDataset) for data larger than memory or disk: each process"
        " reads its own shards, images are decoded and captions encoded per batch. Needs --max_train_steps; an 'epoch'"
        " for --save_images_epochs/--save_model_epochs is then --checkpointing_steps steps.",
    )
    data.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="With --streaming: examples held and drawn from at random (more mixes better and costs memory); the"
        " shard order and the draws change every pass.",
    )
    data.add_argument(
        "--caption_max_length",
        type=int,
        default=None,
        help="Tokens every caption is padded or truncated to; the grids and the saved pipeline use the same. Default:"
        " the longest tokenized caption in the dataset (with --streaming: the tokenizer's maximum). Raise it (e.g. 77"
        " for CLIP) to sample with prompts longer than the training captions.",
    )
    data.add_argument(
        "--no_caption_cache",
        dest="caption_cache",
        action="store_false",
        help="Run the frozen text encoder in every step instead of encoding each caption once (for benchmarks).",
    )
    data.add_argument(
        "--image_cache_max_gb",
        type=float,
        default=4.0,
        help="Decode all images once into memory when they fit in this many GiB at the training resolution; 0 decodes every epoch.",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--text_encoder_name_or_path",
        default=DEFAULT_TEXT_ENCODER,
        help="Hub id or local folder of a transformers text encoder (CLIP, T5, BERT-like) with its tokenizer; a diffusers folder with text_encoder/ and tokenizer/ works too.",
    )
    model.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Fine-tune the text encoder with the UNet (otherwise it is frozen and captions are encoded once).",
    )
    model.add_argument(
        "--model_config_name_or_path",
        help="UNet2DConditionModel config.json (or a folder with one); wins over --model_size. Default: the --model_size UNet, log2(resolution)-1 levels (2 to 6), cross-attention at 16 px and below.",
    )
    model.add_argument(
        "--model_size",
        default=DEFAULT_MODEL_SIZE,
        choices=list(MODEL_SIZES),
        help="Size of the default UNet (README 'Model sizes' lists parameters and speed): tiny 32-256 channels and small 64-256 with 1 layer per level, base 128-512 and large 192-768 with 2.",
    )
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    model.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention (GPU, pip install xformers). PyTorch SDPA is used otherwise.",
    )

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument(
        "--ddpm_num_steps", type=int, default=1000, help="Number of diffusion timesteps in training."
    )
    diffusion.add_argument(
        "--ddpm_num_inference_steps", type=int, default=25, help="Sampling steps for the sample grids (DPM-Solver++)."
    )
    diffusion.add_argument(
        "--ddpm_beta_schedule",
        default="linear",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        help="Noise schedule.",
    )
    diffusion.add_argument(
        "--prediction_type",
        default="v_prediction",
        choices=["epsilon", "sample", "v_prediction"],
        help="What the UNet predicts. v_prediction (the default since it made a frozen-encoder model follow prompts in ~40%% fewer images than epsilon, examples/adherence_curve.py) or the seed's epsilon/sample.",
    )
    diffusion.add_argument(
        "--snr_gamma", type=float, default=5.0, help="Min-SNR-gamma loss weighting (arXiv:2303.09556); 0 turns it off."
    )
    diffusion.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Add this much per-channel offset noise (helps very dark/bright images).",
    )
    diffusion.add_argument(
        "--rescale_betas_zero_snr",
        action="store_true",
        help="Rescale betas to zero terminal SNR (use with v_prediction).",
    )
    diffusion.add_argument(
        "--conditioning_dropout_prob",
        type=float,
        default=0.1,
        help="Share of training captions replaced by the empty caption, for classifier-free guidance.",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=16, help="Images per process per micro-step.")
    optim.add_argument(
        "--num_epochs", type=int, default=100, help="Passes over the data (ignored when --max_train_steps is set)."
    )
    optim.add_argument("--max_train_steps", type=int, help="Optimizer steps to train; overrides --num_epochs.")
    optim.add_argument(
        "--max_train_time",
        help="Stop after this long, e.g. 8h30m, 90m, 3600s (Kaggle/Colab limits): checkpoint, a last grid and the pipeline (EMA weights) are written within it; training stops early by their time, as last measured (estimated from the step time and model size before they first ran).",
    )
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    optim.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate.")
    optim.add_argument(
        "--lr_scheduler",
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule after warm-up.",
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up in optimizer steps.")
    optim.add_argument("--adam_beta1", type=float, default=0.95, help="AdamW beta1 (the seed's 0.95).")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    optim.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clip gradients to this norm; 0 turns clipping off."
    )
    optim.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the UNet; samples and the saved pipeline use it.",
    )
    optim.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse gamma.")
    optim.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up power.")
    optim.add_argument("--ema_max_decay", type=float, default=0.9999, help="EMA decay ceiling.")
    optim.add_argument(
        "--ema_offload",
        action="store_true",
        help="Keep the EMA weights in CPU memory (saves GPU memory, costs a copy per step).",
    )
    optim.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision (default: what `accelerate config` says, else no). fp16 needs a CUDA GPU.",
    )
    optim.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    optim.add_argument("--torch_compile", action="store_true", help="Compile the UNet with torch.compile.")
    optim.add_argument(
        "--channels_last",
        action="store_true",
        help="Use channels-last memory format for the UNet (faster convolutions on many GPUs).",
    )
    optim.add_argument("--seed", type=int, help="Random seed (a resumed run keeps the first run's seed).")

    ckpt = parser.add_argument_group("checkpoints and outputs")
    ckpt.add_argument(
        "--output_dir", default="text2image-model", help="Where the pipeline, checkpoints, samples and logs go."
    )
    ckpt.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start over in an --output_dir that holds an earlier run (its checkpoints and samples are deleted).",
    )
    ckpt.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps."
    )
    ckpt.add_argument(
        "--checkpoints_total_limit",
        type=int,
        help="Keep at most this many checkpoints (oldest deleted after a new one is complete).",
    )
    ckpt.add_argument(
        "--resume_from_checkpoint", help="A checkpoint folder, or 'latest' (starts fresh when there is none)."
    )
    ckpt.add_argument(
        "--save_model_epochs", type=int, default=10, help="Save the pipeline every N epochs (and at the end)."
    )

    sampling = parser.add_argument_group("sample grids")
    sampling.add_argument(
        "--save_images_epochs",
        "--save_images_epoch",
        dest="save_images_epochs",
        type=int,
        default=10,
        help="Sample a grid every N epochs (and at the end).",
    )
    sampling.add_argument(
        "--validation_prompts",
        nargs="+",
        help="Prompts for the grids, or one text file with a prompt a line (default: captions drawn from the dataset).",
    )
    sampling.add_argument("--eval_batch_size", type=int, default=16, help="Images in each grid.")
    sampling.add_argument(
        "--guidance_scale",
        type=float,
        default=3.0,
        help="Classifier-free guidance scale for the grids (1 turns it off).",
    )

    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--logger", default="tensorboard", choices=["tensorboard", "wandb", "none"], help="Experiment tracker."
    )
    logs.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    logs.add_argument(
        "--logging_steps", type=int, default=10, help="Log loss, lr, grad norm and speed every N optimizer steps."
    )
    logs.add_argument(
        "--local_rank", type=int, default=-1, help="Set by old launchers; accelerate reads LOCAL_RANK itself."
    )

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hugging Face Hub.")
    hub.add_argument("--hub_model_id", help="Hub repo id (default: the --output_dir name).")
    hub.add_argument("--hub_token", help="Hub token (default: the logged-in token).")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return parser


def read_config_file(path: Path, parser: argparse.ArgumentParser) -> dict:
    """Flag values from a YAML/JSON file, checked against the parser's flags."""
    if not path.is_file():
        raise UserError(f"--config {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    values = {key.lstrip("-").replace("-", "_"): value for key, value in values.items()}
    if unknown := sorted(set(values) - known):
        raise UserError(f"--config {path}: unknown flags {unknown}; see --help for the flag names")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    config_path = parser.parse_known_args(argv)[0].config
    if exists(config_path):
        parser.set_defaults(**read_config_file(config_path, parser))
    args = parser.parse_args(argv)
    args.output_dir = Path(args.output_dir)
    return args


def parse_duration(text: str) -> float:
    """'8h30m' / '90m' / '45s' / '3600' -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not parts or not any(parts.groups()):
        raise UserError(f"--max_train_time {text!r} is not a duration; write e.g. 8h30m, 90m or 3600s")
    hours, minutes, seconds = (float(group or 0) for group in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 instructions on this CPU; without them bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: when it is gone, assume the best
        return True


def validate_args(args: argparse.Namespace) -> None:
    """Cheap checks before any heavy work."""
    if not exists(args.dataset_name) and not exists(args.train_data_dir):
        raise UserError("no data: pass --train_data_dir FOLDER (imagefolder) or --dataset_name NAME_OR_PATH")
    if exists(args.train_data_dir) and not Path(args.train_data_dir).is_dir():
        raise UserError(f"--train_data_dir {args.train_data_dir} is not a folder")
    for flag in (
        "resolution",
        "train_batch_size",
        "gradient_accumulation_steps",
        "eval_batch_size",
        "checkpointing_steps",
        "save_images_epochs",
        "save_model_epochs",
        "ddpm_num_steps",
        "ddpm_num_inference_steps",
        "logging_steps",
    ):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.streaming and not exists(args.max_train_steps):
        raise UserError("--streaming needs --max_train_steps: a stream has no length to count epochs from")
    if exists(args.caption_max_length) and args.caption_max_length < 2:
        raise UserError(
            f"--caption_max_length must be at least 2 (the start and end tokens), got {args.caption_max_length}"
        )
    if args.dataloader_num_workers < 0:
        raise UserError(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}")
    if args.streaming and args.shuffle_buffer_size < 1:
        raise UserError(f"--shuffle_buffer_size must be at least 1, got {args.shuffle_buffer_size}")
    if exists(args.max_train_steps) and args.max_train_steps < 1:
        raise UserError(f"--max_train_steps must be at least 1, got {args.max_train_steps}")
    if not 0 <= args.conditioning_dropout_prob < 1:
        raise UserError(f"--conditioning_dropout_prob must be in [0, 1), got {args.conditioning_dropout_prob}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "--mixed_precision fp16 needs a CUDA GPU and none is visible; use --mixed_precision bf16 or no on CPU"
        )
    if args.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        logger.warning(
            "--mixed_precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is slower than fp32 here; --mixed_precision no is faster"
        )
    if args.enable_xformers_memory_efficient_attention:
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise UserError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed; pip install xformers (GPU only) or drop the flag (PyTorch SDPA attention is used)"
            )
    if exists(args.model_config_name_or_path) and not Path(args.model_config_name_or_path).exists():
        raise UserError(
            f"--model_config_name_or_path {args.model_config_name_or_path} does not exist; pass a UNet config.json or a folder with one"
        )
    if (
        exists(args.resume_from_checkpoint)
        and args.resume_from_checkpoint != "latest"
        and not Path(args.resume_from_checkpoint).is_dir()
    ):
        raise UserError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint} does not exist; pass a checkpoint-STEP folder or 'latest'"
        )
    if exists(args.max_train_time):
        args.max_train_seconds = parse_duration(args.max_train_time)
    if args.push_to_hub and args.logger == "wandb" and os.environ.get("WANDB_MODE") == "disabled":
        logger.warning("--logger wandb with WANDB_MODE=disabled logs nothing")


# ---------------------------------------------------------------------------------------------
# Data: load once, decode once, index per batch


@dataclass
class CaptionedImages:
    """What training needs from the dataset: image sources and, per image, indices into `captions`."""

    sources: list  # per row: {"path": str|None, "bytes": bytes|None} or a file path
    caption_ids: list[list[int]]  # per row: the captions it may be shown with
    captions: list[str]  # distinct captions; captions[0] is "" (classifier-free guidance)


def resolve_split(dataset, name: str):
    from datasets import DatasetDict, IterableDatasetDict

    if not isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        return dataset
    if "train" in dataset:
        return dataset["train"]
    split = next(iter(dataset))
    logger.info("%s has no 'train' split; using '%s'", name, split)
    return dataset[split]


def load_raw_dataset(args: argparse.Namespace):
    """datasets.load_dataset on a Hub id, a local folder, a save_to_disk folder or an imagefolder."""
    import datasets

    if exists(args.train_data_dir):
        folder = Path(args.train_data_dir)
        if not any(folder.glob("metadata.*")) and not any(folder.glob("*/metadata.*")):
            raise UserError(
                f"--train_data_dir {folder} has no metadata.jsonl or metadata.csv; add one with columns file_name and {args.caption_column}"
            )
        try:
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=str(folder), cache_dir=args.cache_dir, streaming=args.streaming
            )
        except (IndexError, ValueError, TypeError, datasets.exceptions.DatasetGenerationError) as error:
            raise UserError(
                f"--train_data_dir {folder}: the dataset could not be read ({type(error).__name__}: {error}); check that"
                " metadata.jsonl/csv has rows and that every caption is a string, or every caption a list of strings"
            ) from error
        return resolve_split(dataset, str(folder))
    name = args.dataset_name
    local = Path(name)
    try:
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            dataset = resolve_split(datasets.load_from_disk(str(local)), name)
            return dataset.to_iterable_dataset() if args.streaming else dataset
        if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise UserError(f"--dataset_name {name} does not exist on disk")
        dataset = datasets.load_dataset(
            name, args.dataset_config_name, cache_dir=args.cache_dir, streaming=args.streaming
        )
        return resolve_split(dataset, name)
    except StopIteration as error:  # the json/csv builders find no first row to infer columns from
        raise UserError(f"the dataset {name} has no rows") from error
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = "the Hub is unreachable (offline)" if offline else f"it could not be loaded ({error})"
        raise UserError(
            f"--dataset_name {name}: not a local folder and {hint}; download it or pass a local path"
        ) from error


def caption_cell_to_list(cell, row: int, column: str) -> list[str]:
    if cell is None:
        return [""]
    if isinstance(cell, str):
        return [cell.strip()]
    if isinstance(cell, (list, tuple)):
        texts = [str(text).strip() for text in cell if text is not None]
        return texts or [""]
    raise UserError(
        f"--caption_column {column!r} row {row} holds {type(cell).__name__}; captions must be strings or lists of strings"
    )


def undecoded_images(dataset, args: argparse.Namespace):
    """Check the image and caption columns exist; keep images as files/bytes so each is decoded once, by us."""
    from datasets import Image as ImageFeature

    columns = dataset.column_names or list(next(iter(dataset), {}))  # a stream may know its columns only from a row
    if not columns:
        raise UserError(f"the dataset {args.train_data_dir or args.dataset_name} has no rows")
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in columns:
            raise UserError(f"{flag} {column!r} not in dataset columns {columns}; pass {flag} with one of them")
    if dataset.features and isinstance(dataset.features[args.image_column], ImageFeature):
        dataset = dataset.cast_column(args.image_column, ImageFeature(decode=False))
    return dataset


def load_captioned_images(args: argparse.Namespace) -> CaptionedImages:
    """Image sources and caption ids, without decoding any image."""
    dataset = undecoded_images(load_raw_dataset(args), args)
    if len(dataset) == 0:
        raise UserError(f"the dataset {args.train_data_dir or args.dataset_name} has no rows")
    table = dataset.select_columns([args.image_column, args.caption_column]).to_dict()
    captions = {"": 0}
    caption_ids = []
    for row, cell in enumerate(table[args.caption_column]):
        texts = caption_cell_to_list(cell, row, args.caption_column)
        caption_ids.append([captions.setdefault(text, len(captions)) for text in texts])
    base = Path(args.train_data_dir or args.dataset_name)
    sources = [resolve_image_source(source, base) for source in table[args.image_column]]
    return CaptionedImages(sources=sources, caption_ids=caption_ids, captions=list(captions))


def resolve_image_source(source, base: Path):
    """A string cell is a file path, relative to the data folder when not absolute."""
    if isinstance(source, str):
        path = Path(source)
        return {"path": str(path if path.is_absolute() or path.exists() else base / path), "bytes": None}
    return source


def describe_source(source) -> str:
    if isinstance(source, dict):
        return source.get("path") or "<image bytes>"
    return type(source).__name__


def open_image(source):
    """A PIL image from a dataset cell ({path, bytes}, a PIL image or a path)."""
    import io

    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        if source.get("bytes"):
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path"):
            return Image.open(source["path"])
    raise ValueError(f"unreadable image cell {describe_source(source)}")


def to_rgb(image):
    """Any PIL mode (L, P, RGBA, CMYK, 16-bit, float) as RGB; transparency composited on white."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(source, resolution: int, center_crop: bool) -> torch.Tensor:
    """uint8 [3, H, W] with the shorter side == resolution (square when center_crop)."""
    from PIL import Image

    with open_image(source) as opened:
        opened.load()
        image = to_rgb(opened)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_or_describe(source, resolution: int, center_crop: bool) -> torch.Tensor | str:
    """The decoded image, or 'source: error' when it cannot be read (the caller decides what to skip)."""
    try:
        return decode_image(source, resolution, center_crop)
    except IMAGE_ERRORS as error:
        return f"{describe_source(source)}: {error}"


class DecodedImages(torch.utils.data.Dataset):
    """Row index -> (index, uint8 image or None when unreadable); runs in DataLoader workers."""

    def __init__(self, sources: list, resolution: int, center_crop: bool):
        self.sources, self.resolution, self.center_crop = sources, resolution, center_crop

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        return index, decode_or_describe(self.sources[index], self.resolution, self.center_crop)


def collate_decoded(items):
    return items


@dataclass
class ImageStore:
    """Decoded training images at the training resolution, all in memory, or decoded per batch.

    Decoded per batch with --dataloader_num_workers, the workers decode the micro-batches ahead of
    the step. The rows of every micro-batch are a pure function of its index (`rows_of`), so the
    workers can be handed the coming batches in order, from wherever the run starts or resumes.
    """

    images: list[torch.Tensor | None]
    decoder: DecodedImages | None  # None once all images are decoded: the files' bytes are not kept twice
    num_workers: int
    bad: set[int] = field(default_factory=set)
    rows_of: Callable[[int], list[int]] | None = None  # micro-batch index -> this process's rows
    ahead: Iterator | None = None  # worker-decoded micro-batches, next one first
    ahead_index: int = -1  # the micro-batch index `ahead` yields next

    @property
    def cached(self) -> bool:
        return bool(self.images)

    def fetch(self, indices: list[int], micro_index: int) -> list[torch.Tensor]:
        """Images for the rows; an image that turns out unreadable is stood in for by one that is not."""
        if self.cached:
            return [self.images[i] for i in indices]
        if self.num_workers == 0 or not exists(self.rows_of):
            return stand_in_for_unreadable([image for _, image in map(self.decoder.__getitem__, indices)])
        if micro_index != self.ahead_index:  # the first batch, or a jump: (re)start the workers there
            self.ahead = iter(self.decoding_loader(micro_index))
        rows, images = zip(*next(self.ahead), strict=True)
        self.ahead_index = micro_index + 1
        if list(rows) != indices:
            raise RuntimeError(
                f"decoded rows {list(rows)} are not the micro-batch's {indices}: a bug, please report it"
            )
        return stand_in_for_unreadable(list(images))

    def decoding_loader(self, first_micro_index: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.decoder,
            batch_sampler=map(self.rows_of, itertools.count(first_micro_index)),
            num_workers=self.num_workers,
            collate_fn=collate_decoded,
            generator=torch.Generator(),  # its workers' seed is not drawn from the global RNG the noise comes from
        )


def stand_in_for_unreadable(images: list[torch.Tensor | str]) -> list[torch.Tensor]:
    """Each unreadable image (its error text) replaced by a readable one of its batch: the batch keeps its size."""
    readable = [image for image in images if isinstance(image, torch.Tensor)]
    for failure in (image for image in images if not isinstance(image, torch.Tensor)):
        logger.warning("skipping unreadable image %s", failure)
    if not readable:
        raise UserError(f"no image of a whole batch could be read (e.g. {images[0]}); check the dataset files")
    return [image if isinstance(image, torch.Tensor) else readable[0] for image in images]


def report_bad_images(failures: list[str], total: int) -> None:
    for failure in failures[:20]:
        logger.warning("skipping unreadable image %s", failure)
    if len(failures) > 20:
        logger.warning("... and %d more unreadable images", len(failures) - 20)
    if failures and len(failures) > MAX_BAD_IMAGE_SHARE * total:
        raise UserError(
            f"{len(failures)} of {total} images could not be read (e.g. {failures[0]}); check the dataset files"
        )


def decode_all_images(decoder: DecodedImages, num_workers: int, show_progress: bool) -> tuple[list, list[str]]:
    from tqdm.auto import tqdm

    # its own generator: opening a DataLoader draws a seed, and the global RNG must not depend on the image cache
    loader = torch.utils.data.DataLoader(
        decoder, batch_size=16, num_workers=num_workers, collate_fn=collate_decoded, generator=torch.Generator()
    )
    images: list = [None] * len(decoder)
    failures = []
    for batch in tqdm(loader, desc="decoding images", disable=not show_progress, unit="batch"):
        for index, image in batch:
            if isinstance(image, torch.Tensor):
                images[index] = image
            else:
                failures.append(image)
    return images, failures


def build_image_store(data: CaptionedImages, args: argparse.Namespace, show_progress: bool) -> ImageStore:
    """Decode every image once when they fit in --image_cache_max_gb, else decode per batch."""
    decoder = DecodedImages(data.sources, args.resolution, args.center_crop)
    estimated_gb = len(data.sources) * 3 * args.resolution**2 * (1 if args.center_crop else 1.5) / 2**30
    if estimated_gb > args.image_cache_max_gb:
        logger.info(
            "images need ~%.1f GiB at %d px: decoding per batch (--image_cache_max_gb %.1f) with %d worker processes (--dataloader_num_workers)",
            estimated_gb,
            args.resolution,
            args.image_cache_max_gb,
            args.dataloader_num_workers,
        )
        return ImageStore(images=[], decoder=decoder, num_workers=args.dataloader_num_workers)
    images, failures = decode_all_images(decoder, args.dataloader_num_workers, show_progress)
    report_bad_images(failures, len(images))
    bad = {index for index, image in enumerate(images) if image is None}
    # a parquet dataset's sources are the encoded files themselves, often far larger than the decoded cache
    data.sources = []
    return ImageStore(images=images, decoder=None, num_workers=args.dataloader_num_workers, bad=bad)


class DecodedExamples(torch.utils.data.Dataset):
    """A streamed example -> (uint8 image or error text, caption cell); runs in DataLoader workers."""

    def __init__(self, image_column: str, caption_column: str, base: Path, resolution: int, center_crop: bool):
        self.image_column, self.caption_column, self.base = image_column, caption_column, base
        self.resolution, self.center_crop = resolution, center_crop

    def __getitem__(self, example: dict):
        source = resolve_image_source(example[self.image_column], self.base)
        return decode_or_describe(source, self.resolution, self.center_crop), example[self.caption_column]


class ImageStream:
    """--streaming: this process's share of an IterableDataset, reshuffled every pass, decoded per batch.

    The position is derived from the step, not saved: every micro-batch takes exactly
    train_batch_size examples (an unreadable image is stood in for by another of its batch), so
    after N micro-batches the stream is N x batch examples in, and a resume skips that many without
    decoding them. The shuffle is a function of (seed, pass), so the skip lands exactly where the
    interrupted run was. IterableDataset.state_dict() would not: datasets drops the shuffle buffer's
    contents on resume and refills it from further on, so a resumed run would see other examples.
    """

    def __init__(self, dataset, args: argparse.Namespace):
        self.dataset, self.args, self.passes = dataset, args, 0
        self.base = Path(args.train_data_dir or args.dataset_name)
        self.examples = self.new_pass()
        self.decoded = None  # the DataLoader's iterator, opened by the first batch (after a resume's skip)

    def new_pass(self) -> Iterator[dict]:
        self.dataset.set_epoch(self.passes)
        self.taken_this_pass = 0
        return iter(self.dataset)

    def take(self, count: int) -> list[dict]:
        taken = []
        while len(taken) < count:
            example = next(self.examples, None)
            if example is not None:
                taken.append(example)
                self.taken_this_pass += 1
                continue
            if self.taken_this_pass == 0:
                raise UserError(f"the dataset {self.base} streams no rows for this process; check the data or shards")
            self.passes += 1
            self.examples = self.new_pass()
        return taken

    def skip(self, count: int) -> None:
        for start in range(0, count, 4096):
            self.take(min(4096, count - start))

    def raw_batches(self) -> Iterator[list[dict]]:
        """train_batch_size undecoded examples at a time, forever (the DataLoader's batch sampler)."""
        while True:
            yield self.take(self.args.train_batch_size)

    def next_batch(self) -> tuple[list[torch.Tensor], list[list[str]]]:
        """Decoded images and caption options of the stream's next train_batch_size examples."""
        if not exists(self.decoded):
            self.decoded = iter(self.decoding_loader())
        images, cells = zip(*next(self.decoded), strict=True)
        column = self.args.caption_column
        options = [caption_cell_to_list(cell, index, column) for index, cell in enumerate(cells)]
        return stand_in_for_unreadable(list(images)), options

    def decoding_loader(self) -> torch.utils.data.DataLoader:
        # the batch sampler runs in this process, so the stream is read once and in order; workers only
        # decode, ahead of the step, and batches come back in order whatever --dataloader_num_workers is
        args = self.args
        decoder = DecodedExamples(args.image_column, args.caption_column, self.base, args.resolution, args.center_crop)
        return torch.utils.data.DataLoader(
            decoder,
            batch_sampler=self.raw_batches(),
            num_workers=args.dataloader_num_workers,
            collate_fn=collate_decoded,
            generator=torch.Generator(),  # its workers' seed is not drawn from the global RNG the noise comes from
        )

    def caption_options(self, examples: list[dict]) -> list[list[str]]:
        column = self.args.caption_column
        return [caption_cell_to_list(example[column], index, column) for index, example in enumerate(examples)]


def open_image_stream(args: argparse.Namespace, process_index: int, num_processes: int, seed: int) -> ImageStream:
    from datasets.distributed import split_dataset_by_node

    dataset = undecoded_images(load_raw_dataset(args), args).select_columns([args.image_column, args.caption_column])
    if num_processes > 1:
        dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    return ImageStream(dataset.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size), args)


def streamed_captions(stream: ImageStream, count: int) -> list[str]:
    """Captions of the first examples of one pass (fewer when the data is smaller): a stand-in for the dataset's."""
    examples = list(itertools.islice(iter(stream.dataset), count))
    return [""] + sorted({text for options in stream.caption_options(examples) for text in options if text})


@dataclass(frozen=True)
class Shard:
    """This process's slice of the global batch.

    Every process draws the random numbers of the whole global batch (same seed everywhere) and
    keeps its slice, so a run does not depend on how the global batch is split across processes.
    """

    index: int = 0
    count: int = 1
    size: int = 1

    @property
    def total(self) -> int:
        return self.size * self.count

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.index * self.size : (self.index + 1) * self.size]


def crop_and_flip(
    images: list[torch.Tensor], resolution: int, crop_at: torch.Tensor, flip: torch.Tensor | None
) -> torch.Tensor:
    """A float batch in [-1, 1]; crop_at holds (top, left) as fractions of the spare pixels."""
    crops = []
    for image, (top_share, left_share) in zip(images, crop_at.tolist(), strict=True):
        spare_h, spare_w = image.shape[1] - resolution, image.shape[2] - resolution
        top, left = int(top_share * (spare_h + 1 - 1e-6)), int(left_share * (spare_w + 1 - 1e-6))
        crops.append(image[:, top : top + resolution, left : left + resolution])
    batch = torch.stack(crops)
    if exists(flip):
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return batch.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# Text encoder and the conditioning cache


def text_encoder_folders(name_or_path: str) -> tuple[dict, dict]:
    """from_pretrained kwargs for the tokenizer and the model (diffusers layout uses subfolders)."""
    folder = Path(name_or_path)
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        return {"subfolder": "tokenizer"}, {"subfolder": "text_encoder"}
    return {}, {}


def text_encoder_class(model_type: str):
    import transformers

    if model_type == "clip":
        return transformers.CLIPTextModel
    if model_type in ("t5", "mt5", "umt5"):
        return transformers.T5EncoderModel
    return transformers.AutoModel


def build_text_encoder(name_or_path: str, cache_dir: str | None):
    """Tokenizer + encoder from a Hub id or a local folder; a clear error when it cannot be had."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer_kwargs, model_kwargs = text_encoder_folders(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir, **tokenizer_kwargs)
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir, **model_kwargs)
        encoder = text_encoder_class(config.model_type).from_pretrained(
            name_or_path, cache_dir=cache_dir, **model_kwargs
        )
    except OSError as error:
        where = (
            "is not a local folder"
            if not Path(name_or_path).exists()
            else "is a folder without a loadable model and tokenizer"
        )
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        hint = "it needs a download and the Hub is offline" if offline else "it could not be downloaded"
        raise UserError(
            f"--text_encoder_name_or_path {name_or_path} {where} and {hint}; download it first or pass a local folder"
        ) from error
    return tokenizer, encoder


def text_hidden_size(encoder) -> int:
    config = encoder.config
    return getattr(config, "hidden_size", None) or config.d_model


def token_limit(tokenizer) -> int:
    """The tokenizer's maximum length (some tokenizers report a huge placeholder: cap it)."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else 512


def caption_token_lengths(tokenizer, captions: list[str]) -> list[int]:
    """Tokens of each caption (with special tokens), capped at the tokenizer's maximum."""
    limit = token_limit(tokenizer)
    return [len(ids) for ids in tokenizer(captions, truncation=True, max_length=limit)["input_ids"]]


def caption_max_length(tokenizer, captions: list[str] | None, requested: int | None) -> int:
    """--caption_max_length if given (checked against the tokenizer), else the longest caption's length."""
    limit = token_limit(tokenizer)
    if exists(requested) and requested > limit:
        raise UserError(f"--caption_max_length {requested} is more than the tokenizer's maximum; use at most {limit}")
    if not exists(captions):  # a stream: its captions are not known ahead
        return requested or limit
    lengths = caption_token_lengths(tokenizer, captions)
    if not exists(requested):
        return max(lengths)
    truncated = sum(length > requested for length in lengths)
    if truncated:
        logger.warning("--caption_max_length %d truncates %d of %d captions", requested, truncated, len(captions))
    return requested


def caption_cache_path(output_dir: Path, encoder_name: str, encoder, captions: list[str], max_length: int) -> Path:
    digest = hashlib.sha256()
    for part in (encoder_name, encoder.config.to_json_string(), str(max_length), *captions):
        digest.update(part.encode() + b"\0")
    first_weight = next(encoder.parameters())
    digest.update(first_weight.detach().float().cpu().numpy().tobytes()[:65536])
    return output_dir / "caption_cache" / f"embeddings-{digest.hexdigest()[:16]}.pt"


@torch.no_grad()
def encode_captions_once(
    tokenizer, encoder, captions: list[str], max_length: int, cache_file: Path | None, device, batch_size: int = 64
) -> torch.Tensor:
    """Embeddings [num_captions, max_length, hidden] of every distinct caption, cached on disk."""
    from tqdm.auto import tqdm

    from pipeline_text_to_image import encode_text

    if exists(cache_file) and cache_file.exists():
        logger.info("caption embeddings loaded from %s", cache_file)
        return torch.load(cache_file, map_location="cpu", weights_only=True).to(device)
    encoder.eval()
    # filled in place, batch by batch: concatenating chunks would hold the table twice at the peak
    embeddings = torch.empty(len(captions), max_length, text_hidden_size(encoder), device=device)
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc="encoding captions", disable=not is_main_process() or len(starts) < 2):
        batch = captions[start : start + batch_size]
        embeddings[start : start + len(batch)] = encode_text(tokenizer, encoder, batch, max_length)
    if exists(cache_file) and is_main_process():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(".tmp")
        torch.save(embeddings.cpu(), temporary)
        temporary.replace(cache_file)
    return embeddings


@dataclass
class Conditioning:
    """Per-batch text conditioning: cached embeddings (frozen encoder) or token ids (trained encoder)."""

    caption_table: torch.Tensor  # [rows, max_captions_per_row] caption ids, padded by repeating
    caption_counts: torch.Tensor  # [rows]
    embeddings: torch.Tensor | None  # [num_captions, L, H] when the encoder is frozen
    token_ids: torch.Tensor | None  # [num_captions, L] when the encoder trains
    attention_mask: torch.Tensor | None
    dropout_prob: float

    def caption_ids_for(self, rows: torch.Tensor) -> torch.Tensor:
        """One caption per row (random among the row's list), the empty caption with dropout_prob."""
        counts = self.caption_counts[rows]
        choice = (torch.rand(len(rows)) * counts).long().clamp_(max=self.caption_table.shape[1] - 1)
        ids = self.caption_table[rows, choice]
        dropped = torch.rand(len(rows)) < self.dropout_prob
        return torch.where(dropped, torch.zeros_like(ids), ids)


def tokenized_conditioning(
    tokenizer, captions: list[str], max_length: int, device, table=None, counts=None, args=None
) -> Conditioning:
    """Token ids for `captions`, run through the encoder per batch (trained, uncached or streamed captions)."""
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    mask = tokens.get("attention_mask")
    return Conditioning(
        table,
        counts,
        None,
        tokens.input_ids.to(device),
        mask.to(device) if exists(mask) else None,
        args.conditioning_dropout_prob if exists(args) else 0.0,
    )


def build_conditioning(
    data: CaptionedImages, tokenizer, encoder, max_length: int, args, device, cache_file
) -> Conditioning:
    widest = max(len(ids) for ids in data.caption_ids)
    table = torch.tensor([(ids * widest)[:widest] for ids in data.caption_ids])
    counts = torch.tensor([len(ids) for ids in data.caption_ids])
    if args.train_text_encoder or not args.caption_cache:
        return tokenized_conditioning(tokenizer, data.captions, max_length, device, table, counts, args)
    embeddings = encode_captions_once(tokenizer, encoder, data.captions, max_length, cache_file, device)
    return Conditioning(table, counts, embeddings, None, None, args.conditioning_dropout_prob)


def condition_batch(conditioning: Conditioning, caption_ids: torch.Tensor, text_encoder) -> torch.Tensor:
    if exists(conditioning.embeddings):
        return conditioning.embeddings[caption_ids.to(conditioning.embeddings.device)]
    ids = caption_ids.to(conditioning.token_ids.device)
    mask = conditioning.attention_mask[ids] if exists(conditioning.attention_mask) else None
    return text_encoder(input_ids=conditioning.token_ids[ids], attention_mask=mask).last_hidden_state


# ---------------------------------------------------------------------------------------------
# UNet


def default_unet_config(resolution: int, model_size: str = DEFAULT_MODEL_SIZE) -> dict:
    """Levels = log2(resolution) - 1 (2..6), so the lowest feature map is 4 px or larger.

    No pooled-prompt ("text" addition) embedding: with a frozen encoder it did not make the model follow
    prompts sooner (examples/adherence_curve.py); a config file can still ask for it.
    """
    channels, layers_per_block = MODEL_SIZES[model_size]
    levels = max(2, min(len(channels), int(math.log2(resolution)) - 1))
    widths = [resolution // 2**level for level in range(levels)]
    attention = [width <= ATTENTION_MAX_RESOLUTION for width in widths]
    return {
        "sample_size": resolution,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": layers_per_block,
        "block_out_channels": list(channels[:levels]),
        "down_block_types": ["CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention)],
        "attention_head_dim": 8,
    }


def load_unet_config(path: str | None, resolution: int, model_size: str = DEFAULT_MODEL_SIZE) -> dict:
    if not exists(path):
        return default_unet_config(resolution, model_size)
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise UserError(f"--model_config_name_or_path {path} has no config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"--model_config_name_or_path {file} is not valid JSON: {error}") from error


def level_sizes(resolution: int, levels: int) -> list[int]:
    """Feature-map side at each UNet level: a stride-2 conv with padding 1 takes n to ceil(n / 2)."""
    sizes = [resolution]
    for _ in range(levels - 1):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def warn_collapsed_levels(config: dict, resolution: int) -> None:
    """diffusers runs levels below 4 px (down to 1x1 again and again), but they cost parameters and buy little."""
    sizes = level_sizes(resolution, len(config.get("down_block_types", [])))
    small = [index for index, size in enumerate(sizes) if size < MIN_USEFUL_LEVEL_SIZE]
    if not small:
        return
    useful = len(sizes) - len(small)
    logger.warning(
        "the UNet's %d levels take --resolution %d down to %s px: levels %d-%d work on maps under %d px "
        "(slow, little to learn there); a %d-level config, or a larger --resolution, does the same work cheaper",
        len(sizes),
        resolution,
        "/".join(map(str, sizes)),
        small[0] + 1,
        len(sizes),
        MIN_USEFUL_LEVEL_SIZE,
        max(useful, 2),
    )


def fit_text_pooling_heads(config: dict, text_width: int) -> None:
    """The pooled-prompt attention splits the encoder width into heads (diffusers' default 64): keep it a divisor."""
    if config.get("addition_embed_type") != "text":
        return
    heads = config.get("addition_embed_type_num_heads") or 64
    if text_width % heads:
        config["addition_embed_type_num_heads"] = math.gcd(text_width, heads)


def build_unet(
    config_path: str | None, resolution: int, cross_attention_dim: int, model_size: str = DEFAULT_MODEL_SIZE
):
    """UNet2DConditionModel for pixel space; sample_size and cross_attention_dim follow the data and encoder."""
    from diffusers import UNet2DConditionModel

    config = load_unet_config(config_path, resolution, model_size)
    warn_collapsed_levels(config, resolution)
    if config.get("cross_attention_dim") not in (None, cross_attention_dim):
        logger.info(
            "UNet cross_attention_dim %s -> %d to match the text encoder",
            config["cross_attention_dim"],
            cross_attention_dim,
        )
    config.update(sample_size=resolution, cross_attention_dim=cross_attention_dim)
    fit_text_pooling_heads(config, cross_attention_dim)
    try:
        return UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError) as error:
        raise UserError(f"--model_config_name_or_path: the UNet config is not valid: {error}") from error


def build_noise_scheduler(args: argparse.Namespace):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        rescale_betas_zero_snr=args.rescale_betas_zero_snr,
        clip_sample=False,
    )


# ---------------------------------------------------------------------------------------------
# Loss


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


def diffusion_loss(
    unet,
    noise_scheduler,
    clean: torch.Tensor,
    text_embeddings: torch.Tensor,
    snr_gamma: float,
    noise_offset: float,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Noise, random timesteps, target per prediction type, min-SNR weighted MSE."""
    shard = shard or Shard(size=len(clean))
    batch = (shard.total, clean.shape[1])
    noise = shard.of(torch.randn(*batch, *clean.shape[2:], device=clean.device, dtype=clean.dtype))
    if noise_offset:
        noise += noise_offset * shard.of(torch.randn(*batch, 1, 1, device=clean.device, dtype=clean.dtype))
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = shard.of(torch.randint(0, num_timesteps, (shard.total,), device=clean.device))
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = clean
    else:
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    # DeepSpeed holds the UNet itself in bf16/fp16 and accelerate does not autocast then: feed it its own dtype
    dtype = next(unet.parameters()).dtype
    prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=text_embeddings.to(dtype)).sample
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(clean.device)[timesteps]
    weights = min_snr_weights(alphas_cumprod / (1 - alphas_cumprod), snr_gamma, prediction_type)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete-or-ignored, rotated in one place


@dataclass
class TrainState:
    """Loop state saved with every checkpoint (model/optimizer/RNG are saved by accelerate)."""

    step: int = 0
    seed: int = 0
    num_processes: int = 1
    skipped_images: int = 0


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: Path) -> bool:
    marker = path / CHECKPOINT_MARKER
    try:
        json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*")) or any(path.glob("model_*"))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-STEP folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and exists(checkpoint_step(path))]
    return sorted(found, key=checkpoint_step)


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete or unreadable ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        if is_complete_checkpoint(path):
            return path
        logger.warning("ignoring incomplete checkpoint %s (no readable %s)", path, CHECKPOINT_MARKER)
    return None


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(accelerator, output_dir: Path, state: TrainState, total_limit: int | None) -> Path:
    """Write to a hidden temporary folder, fsync, then rename: a crash never leaves a half checkpoint."""
    final = output_dir / f"checkpoint-{state.step}"
    temporary = output_dir / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / CHECKPOINT_MARKER).write_text(json.dumps(state.__dict__, indent=2))
        fsync_tree(temporary)
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    """Keep the newest `total_limit` complete checkpoints (incomplete ones go too)."""
    if not exists(total_limit):
        return
    checkpoints = list_checkpoints(output_dir)
    complete = [path for path in checkpoints if is_complete_checkpoint(path)]
    doomed = [path for path in checkpoints if path not in complete] + complete[: max(0, len(complete) - total_limit)]
    for path in doomed:
        logger.info("removing old checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume_checkpoint(requested: str | None, output_dir: Path) -> Path | None:
    if not exists(requested):
        return None
    if requested != "latest":
        path = Path(requested)
        if not is_complete_checkpoint(path):
            raise UserError(
                f"--resume_from_checkpoint {path} is not a complete checkpoint (no readable {CHECKPOINT_MARKER}); pass another checkpoint-STEP folder or 'latest'"
            )
        return path
    latest = find_latest_checkpoint(output_dir)
    if not exists(latest):
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a fresh run", output_dir)
    return latest


def read_train_state(checkpoint: Path) -> TrainState:
    return TrainState(**json.loads((checkpoint / CHECKPOINT_MARKER).read_text()))


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse to silently mix a fresh run into an earlier run's checkpoints."""
    earlier = list_checkpoints(args.output_dir)
    if not earlier or exists(args.resume_from_checkpoint):
        return
    if not args.overwrite_output_dir:
        raise UserError(
            f"--output_dir {args.output_dir} already holds checkpoints of an earlier run; add --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over, or choose another --output_dir"
        )
    if is_main_process():
        for path in earlier + [args.output_dir / "samples"]:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Sampling, saving the pipeline


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


def unwrap(accelerator, model):
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def build_pipeline(unet, text_encoder, tokenizer, noise_scheduler, text_max_length: int):
    from pipeline_text_to_image import TextToImagePipeline, make_sampling_scheduler

    scheduler = make_sampling_scheduler("dpm", noise_scheduler.config)
    pipeline = TextToImagePipeline(
        unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, text_max_length=text_max_length
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def choose_validation_prompts(requested: list[str] | None, captions: list[str], count: int, seed: int) -> list[str]:
    """The prompts for every grid of the run: the user's, or captions drawn once from the dataset."""
    if requested and len(requested) == 1 and Path(requested[0]).is_file():
        requested = [line.strip() for line in Path(requested[0]).read_text().splitlines() if line.strip()]
    if requested:
        return requested
    pool = [caption for caption in captions if caption] or [""]
    return random.Random(seed).sample(pool, min(count, len(pool)))


def sample_images(
    pipeline, prompts: list[str], num_images: int, steps: int, guidance: float, seed: int, embeddings=None
):
    """PIL images, prompts repeated to fill num_images; a fixed seed so grids compare across epochs.

    `embeddings` (prompts', empty caption's) stand in for a text encoder that was freed after caching.
    """
    per_prompt = max(1, math.ceil(num_images / len(prompts)))
    generator = torch.Generator("cpu").manual_seed(seed)
    text = {"prompt": prompts}
    if exists(embeddings):
        prompt_embeds, empty = embeddings
        text = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": empty.expand(len(prompts), -1, -1)}
    images = pipeline(
        **text,
        num_images_per_prompt=per_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
    ).images
    captions = [prompt for prompt in prompts for _ in range(per_prompt)]
    return images[: max(num_images, len(prompts))], captions[: max(num_images, len(prompts))]


def write_grid(images, captions, samples_dir: Path, step: int, epoch: int) -> Path:
    """A captioned PNG grid, plus an animated GIF of every grid of the run so far."""
    from PIL import Image

    from pipeline_text_to_image import make_captioned_grid

    samples_dir.mkdir(parents=True, exist_ok=True)
    grid = make_captioned_grid(images, captions, columns=min(len(images), 8))
    path = samples_dir / f"epoch-{epoch:05d}-step-{step:07d}.png"
    grid.save(path)
    frames = [Image.open(frame).convert("RGB") for frame in sorted(samples_dir.glob("epoch-*.png"))]
    frames = [frame for frame in frames if frame.size == grid.size]
    frames[0].save(samples_dir / "progress.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    return path


def log_grid(accelerator, grid_path: Path, step: int) -> None:
    from PIL import Image

    for tracker in accelerator.trackers:
        image = np.asarray(Image.open(grid_path).convert("RGB"))
        if tracker.name == "tensorboard":
            tracker.writer.add_images("samples", image[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": [wandb.Image(image, caption=grid_path.name)]}, step=step)


def all_finite(model) -> bool:
    return all(torch.isfinite(parameter).all() for parameter in model.parameters())


def save_pipeline(pipeline, output_dir: Path, args: argparse.Namespace, state: TrainState, grid: Path | None) -> None:
    """The diffusers pipeline at output_dir, its code as pipeline.py, and a model card."""
    from pipeline_text_to_image import copy_pipeline_code

    if not all_finite(pipeline.unet):
        raise UserError(
            f"the UNet weights hold NaN/inf at step {state.step}; not overwriting the pipeline in {output_dir}"
        )
    staging = output_dir / PIPELINE_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    copy_pipeline_code(staging)
    (staging / "README.md").write_text(model_card(args, state, grid, output_dir))
    fsync_tree(staging)
    swap_in_pipeline(staging, output_dir)


def swap_in_pipeline(staging: Path, output_dir: Path) -> None:
    """Move a complete pipeline from `staging` into output_dir, entry by entry (renames only, no copying).

    The slow part (writing) happened in `staging`, so a kill then leaves the previous pipeline whole.
    PIPELINE_RETIRED exists only while entries are being swapped, so it marks `staging` as complete: a kill
    between two renames is finished at the next start (finish_interrupted_export), never left mixed.
    """
    retired = output_dir / PIPELINE_RETIRED
    retired.mkdir(exist_ok=True)
    for entry in sorted(staging.iterdir()):
        current = output_dir / entry.name
        if current.exists():
            shutil.rmtree(retired / entry.name, ignore_errors=True)
            current.rename(retired / entry.name)
        entry.rename(current)
    shutil.rmtree(retired)
    staging.rmdir()


def finish_interrupted_export(output_dir: Path) -> None:
    """A complete staged pipeline is swapped in; a half-written one is dropped (the previous one stays)."""
    staging, retired = output_dir / PIPELINE_STAGING, output_dir / PIPELINE_RETIRED
    if retired.is_dir() and staging.is_dir():
        swap_in_pipeline(staging, output_dir)
        logger.warning("finished swapping in the pipeline an interrupted export had written to %s", staging)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)


def model_card(args: argparse.Namespace, state: TrainState, grid: Path | None, output_dir: Path) -> str:
    data = args.dataset_name or args.train_data_dir
    grid_line = (
        f"![samples]({grid.relative_to(output_dir).as_posix()})\n"
        if exists(grid) and grid.is_relative_to(output_dir)
        else ""
    )
    flags = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in sorted(vars(args).items())
        if key != "hub_token"
    }
    return f"""---
library_name: diffusers
tags: [text-to-image, diffusion, pixel-space, train_text_to_image]
---
# {output_dir.name}

A pixel-space text-to-image diffusion model ({args.resolution} px) trained from scratch with
`train_text_to_image.py` on `{data}` for {state.step} optimizer steps
({args.prediction_type} prediction, {args.ddpm_beta_schedule} betas, text encoder
`{args.text_encoder_name_or_path}`{", trained jointly" if args.train_text_encoder else ", frozen"}).

{grid_line}
## Use

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{args.hub_model_id or output_dir}", custom_pipeline="{args.hub_model_id or output_dir}", trust_remote_code=True)
image = pipe("{args.validation_prompts[0] if args.validation_prompts else "a prompt"}", guidance_scale={args.guidance_scale}).images[0]
```

## Training flags

```json
{json.dumps(flags, indent=2, default=str)}
```
"""


def push_to_hub(output_dir: Path, args: argparse.Namespace, step: int) -> str:
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or output_dir.name
    repo_id = create_repo(repo_id, private=args.hub_private_repo, token=args.hub_token, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        token=args.hub_token,
        commit_message=f"train_text_to_image.py: step {step}",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", ".pipeline.*", "caption_cache/*", f"{args.logging_dir}/*"],
    )
    return repo_id


# ---------------------------------------------------------------------------------------------
# Stopping: signals, time limits, divergence


class StopRequest:
    """Set by SIGTERM/SIGINT or --max_train_time; the loop finishes its step (with several processes,
    up to STOP_CHECK_STEPS steps, so that all stop at the same one), checkpoints, exports and exits.

    The time limit is checked against the deadline less `reserve`, the measured (or estimated) time of
    that final checkpoint, grid and export, so the whole stop fits in --max_train_time.
    """

    def __init__(self, max_seconds: float | None):
        self.reason: str | None = None
        self.by_signal = False  # agreed by all processes: skip the final grid, a preemption may be short
        self.deadline = time.monotonic() + max_seconds if exists(max_seconds) else None
        self.reserve = 0.0
        self.previous = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.reason = signal.Signals(signum).name
        print(
            f"\n{self.reason} received: finishing this step, saving a checkpoint, then the pipeline (Ctrl-C again quits without saving)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, accelerator, step: int) -> bool:
        if self.reason is None and exists(self.deadline) and time.monotonic() > self.deadline - self.reserve:
            self.reason = "--max_train_time"
        signalled = self.reason is not None and self.reason != "--max_train_time"
        if accelerator.num_processes == 1:
            self.by_signal = signalled
            return self.reason is not None
        if step % STOP_CHECK_STEPS:
            return False
        # 2: a signal somewhere, 1: a time limit somewhere; the max tells every process both
        flag = torch.tensor([2.0 if signalled else float(self.reason is not None)], device=accelerator.device)
        agreed = accelerator.reduce(flag, reduction="max").item()
        if agreed and self.reason is None:
            self.reason = "another process"
        self.by_signal = agreed == 2
        return bool(agreed)


def check_finite_loss(loss_sum: torch.Tensor, step: int, since: int, args) -> None:
    if torch.isfinite(loss_sum).all():
        return
    hint = "try a lower --learning_rate, bf16 instead of fp16, or --max_grad_norm 1"
    raise UserError(
        f"loss became NaN/inf between steps {since} and {step}; {hint}. Nothing was saved from this point; resume from the last checkpoint in {args.output_dir}"
    )


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Schedule:
    """Step arithmetic in one place: micro-batches per epoch, optimizer steps, epoch events."""

    batches_per_epoch: int  # micro-batches of train_batch_size x num_processes
    accumulation: int
    max_steps: int

    def epoch_of(self, step: int) -> int:
        """Epochs completed after `step` optimizer steps."""
        return step * self.accumulation // self.batches_per_epoch

    def crosses(self, step: int, every_epochs: int) -> bool:
        """True when optimizer step `step` completes a multiple of `every_epochs` epochs."""
        return self.epoch_of(step) // every_epochs > self.epoch_of(step - 1) // every_epochs

    def micro_batches(self, start_step: int) -> Iterator[tuple[int, int]]:
        """(epoch, position in epoch) for every micro-batch from optimizer step `start_step` on."""
        for micro in range(start_step * self.accumulation, self.max_steps * self.accumulation):
            yield divmod(micro, self.batches_per_epoch)


def plan_schedule(num_rows: int, args, num_processes: int) -> Schedule:
    global_batch = args.train_batch_size * num_processes
    batches_per_epoch = num_rows // global_batch
    if batches_per_epoch == 0:
        raise UserError(
            f"the dataset has {num_rows} usable images, fewer than one batch of {global_batch} (--train_batch_size {args.train_batch_size} x {num_processes} processes); lower --train_batch_size"
        )
    max_steps = args.max_train_steps or math.ceil(
        args.num_epochs * batches_per_epoch / args.gradient_accumulation_steps
    )
    return Schedule(batches_per_epoch, args.gradient_accumulation_steps, max_steps)


def epoch_order(usable_rows: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch: a pure function of (seed, epoch), so resume needs no sampler state."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return usable_rows[torch.randperm(len(usable_rows), generator=generator)]


def global_batch_rows(
    usable_rows: torch.Tensor, seed: int, epoch: int, position: int, global_batch: int
) -> torch.Tensor:
    return epoch_order(usable_rows, seed, epoch)[position * global_batch : (position + 1) * global_batch]


def shard_rows(
    usable_rows: torch.Tensor, seed: int, batches_per_epoch: int, shard: Shard, micro_index: int
) -> list[int]:
    """This process's rows of the run's `micro_index`-th micro-batch (what decoding workers are handed)."""
    epoch, position = divmod(micro_index, batches_per_epoch)
    return shard.of(global_batch_rows(usable_rows, seed, epoch, position, shard.total)).tolist()


@dataclass
class Run:
    """Everything the loop touches, built once by `setup_run`."""

    args: argparse.Namespace
    accelerator: object
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object | None
    images: ImageStore
    usable_rows: torch.Tensor
    conditioning: Conditioning
    text_max_length: int
    schedule: Schedule
    state: TrainState
    validation_prompts: list[str]
    captions: list[str] = field(default_factory=list)
    stream: ImageStream | None = None
    validation_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # (prompts, "") when the encoder is freed


def build_optimizer(parameters, args, device: torch.device):
    kwargs = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # fused: one kernel for all parameters instead of one per tensor; on CPU (torch >= 2.4) 5x faster than
    # foreach for the seed UNet (0.39 -> 0.075 s a step, 144M parameters, 2 cores: foreach sqrt is a loop there)
    if device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= (2, 4)):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(parameters, **kwargs)


def build_ema(unet, args):
    if not args.use_ema:
        return None
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    return EMAModel(
        unet.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        foreach=True,
        model_cls=UNet2DConditionModel,
        model_config=unet.config,
    )


def make_accelerator(args: argparse.Namespace):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    project = ProjectConfiguration(
        project_dir=str(args.output_dir), logging_dir=str(args.output_dir / args.logging_dir)
    )
    # non-main processes wait at a barrier while the main one samples grids and saves: allow it time
    timeout = InitProcessGroupKwargs(timeout=timedelta(hours=2))
    try:
        return Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.logger == "none" else args.logger,
            project_config=project,
            kwargs_handlers=[timeout],
        )
    except ImportError as error:  # e.g. a DeepSpeed config without deepspeed installed
        raise UserError(f"the accelerate launch config needs a package that is missing: {error}") from error


def check_launch(accelerator) -> None:
    """`accelerate launch --multi_gpu` on a machine without GPUs starts unconnected single processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes != world:
        raise UserError(
            f"launched as {world} processes but they are not connected ({accelerator.num_processes} in the group); on CPU set ACCELERATE_USE_CPU=1 with --multi_gpu"
        )


def check_distributed_type(accelerator, args: argparse.Namespace) -> None:
    """Refuse the accelerate setups the trainer cannot run correctly, and tell DeepSpeed the batch size."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # EMA, the sample grids and the saved pipeline all read whole weights, which FSDP shards
        raise UserError(
            "FSDP is not supported: the trainer's EMA, grids and saved pipeline need whole weights; use DDP "
            "(examples/accelerate/multi_gpu.yaml) or DeepSpeed ZeRO-2 (examples/accelerate/deepspeed_zero2.yaml)"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if args.train_text_encoder:
            raise UserError("--train_text_encoder with DeepSpeed is not supported (one engine per model); use DDP")
        # no DataLoader goes through accelerator.prepare(), so DeepSpeed cannot read the batch size from one;
        # the flags win over the config file, so the step arithmetic and clipping are the ones asked for
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=args.train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            gradient_clipping=args.max_grad_norm,
        )


def configure_unet(unet, args) -> None:
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class TrainingData:
    """What the loop draws batches from: decoded images + cached conditioning, or a stream."""

    images: ImageStore | None
    usable_rows: torch.Tensor | None
    conditioning: Conditioning | None
    text_max_length: int
    schedule: Schedule
    captions: list[str]
    stream: ImageStream | None = None


def prepare_in_memory_data(args, accelerator, state: TrainState, tokenizer, text_encoder) -> TrainingData:
    data = load_captioned_images(args)
    text_max_length = caption_max_length(tokenizer, data.captions, args.caption_max_length)
    images = build_image_store(data, args, accelerator.is_local_main_process)
    usable_rows = torch.tensor([row for row in range(len(data.caption_ids)) if row not in images.bad])
    state.skipped_images = len(images.bad)
    schedule = plan_schedule(len(usable_rows), args, accelerator.num_processes)
    shard = Shard(accelerator.process_index, accelerator.num_processes, args.train_batch_size)
    images.rows_of = functools.partial(shard_rows, usable_rows, state.seed, schedule.batches_per_epoch, shard)
    cache_file = (
        None
        if args.train_text_encoder or not args.caption_cache
        else caption_cache_path(
            args.output_dir, args.text_encoder_name_or_path, text_encoder, data.captions, text_max_length
        )
    )
    with accelerator.main_process_first():  # the others then read the main process's cache file
        conditioning = build_conditioning(
            data, tokenizer, text_encoder, text_max_length, args, accelerator.device, cache_file
        )
    return TrainingData(images, usable_rows, conditioning, text_max_length, schedule, data.captions)


def prepare_streamed_data(args, accelerator, state: TrainState, tokenizer, text_encoder) -> TrainingData:
    """A stream has no length: --max_train_steps sets the run, and an 'epoch' is --checkpointing_steps steps."""
    stream = open_image_stream(args, accelerator.process_index, accelerator.num_processes, state.seed)
    accumulation = args.gradient_accumulation_steps
    schedule = Schedule(args.checkpointing_steps * accumulation, accumulation, args.max_train_steps)
    captions = streamed_captions(stream, STREAM_CAPTION_SAMPLE)
    text_max_length = caption_max_length(tokenizer, None, args.caption_max_length)
    return TrainingData(None, None, None, text_max_length, schedule, captions, stream)


def encode_validation_prompts(tokenizer, text_encoder, prompts: list[str], data: TrainingData):
    """The grids' fixed prompts and the empty caption, encoded now so the frozen encoder can be freed."""
    from pipeline_text_to_image import encode_text

    with torch.no_grad():
        prompt_embeddings = encode_text(tokenizer, text_encoder, prompts, data.text_max_length).float()
    return prompt_embeddings, data.conditioning.embeddings[:1]


def setup_run(args: argparse.Namespace) -> Run:
    """Data, models, optimizer, EMA and accelerate, restored from a checkpoint when resuming."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    # the Rust tokenizers' thread pool, once woken by a batch encode, kept competing with torch's threads:
    # training steps ran 2x slower on a 2-core CPU after the captions were encoded (measured)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    accelerator = make_accelerator(args)
    check_launch(accelerator)
    check_distributed_type(accelerator, args)
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    state = (
        read_train_state(resume)
        if exists(resume)
        else TrainState(seed=args.seed if exists(args.seed) else random.randrange(2**31))
    )
    if exists(resume) and state.num_processes != accelerator.num_processes:
        raise UserError(
            f"{resume} was written by {state.num_processes} processes; resume it with the same --num_processes {state.num_processes} (this launch has {accelerator.num_processes})"
        )
    state.num_processes = accelerator.num_processes
    set_seed(state.seed)

    tokenizer, text_encoder = build_text_encoder(args.text_encoder_name_or_path, args.cache_dir)
    text_encoder.requires_grad_(args.train_text_encoder)
    text_encoder.to(accelerator.device)
    prepare = prepare_streamed_data if args.streaming else prepare_in_memory_data
    data = prepare(args, accelerator, state, tokenizer, text_encoder)
    unet = build_unet(args.model_config_name_or_path, args.resolution, text_hidden_size(text_encoder), args.model_size)
    configure_unet(unet, args)
    ema = build_ema(unet, args)  # from the CPU copy: with --ema_offload the EMA never touches the GPU
    # on the device before the optimizer: torch 2.1-2.3 refuse fused AdamW over CPU parameters at construction
    unet.to(accelerator.device)
    trained = list(unet.parameters()) + (list(text_encoder.parameters()) if args.train_text_encoder else [])
    optimizer = build_optimizer(trained, args, accelerator.device)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=data.schedule.max_steps
    )
    if args.torch_compile:
        unet = torch.compile(unet)
    if args.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    # stepped by hand once per optimizer step: accelerate would step a prepared one per process
    accelerator.register_for_checkpointing(lr_scheduler)
    if exists(ema):
        accelerator.register_for_checkpointing(ema)
    if exists(resume):
        accelerator.load_state(str(resume))
        if exists(data.stream):
            data.stream.skip(state.step * args.gradient_accumulation_steps * args.train_batch_size)
        logger.info("resumed from %s at step %d", resume, state.step)
    if exists(ema):
        # after load_state: accelerate loads custom objects with map_location="cpu" and EMAModel.load_state_dict
        # replaces its shadow tensors, so placing it before would leave a resumed EMA on the CPU
        ema.to(accelerator.device if not args.ema_offload else "cpu")
    prompts = choose_validation_prompts(args.validation_prompts, data.captions, args.eval_batch_size, state.seed)
    validation_embeddings = None
    if exists(data.conditioning) and exists(data.conditioning.embeddings):
        validation_embeddings = encode_validation_prompts(tokenizer, text_encoder, prompts, data)
        # training reads the cached table only: free the frozen encoder (~0.5 GB for CLIP-L), reloaded to save
        text_encoder = None
    return Run(
        args,
        accelerator,
        unet,
        text_encoder,
        tokenizer,
        build_noise_scheduler(args),
        optimizer,
        lr_scheduler,
        ema,
        data.images,
        data.usable_rows,
        data.conditioning,
        data.text_max_length,
        data.schedule,
        state,
        prompts,
        data.captions,
        data.stream,
        validation_embeddings,
    )


def micro_batch(run: Run, epoch: int, position: int) -> tuple[torch.Tensor, Conditioning, torch.Tensor, Shard]:
    """Pixels [-1, 1], their conditioning and caption ids for this process's share of one global micro-batch."""
    accelerator, args = run.accelerator, run.args
    shard = Shard(accelerator.process_index, accelerator.num_processes, args.train_batch_size)
    if exists(run.stream):
        images, conditioning, caption_ids = streamed_batch(run, shard)
    else:
        rows = global_batch_rows(run.usable_rows, run.state.seed, epoch, position, shard.total)
        conditioning, caption_ids = run.conditioning, shard.of(run.conditioning.caption_ids_for(rows))
        images = run.images.fetch(shard.of(rows).tolist(), epoch * run.schedule.batches_per_epoch + position)
    crop_at = shard.of(torch.full((shard.total, 2), 0.5) if args.center_crop else torch.rand(shard.total, 2))
    flip = shard.of(torch.rand(shard.total) < 0.5) if args.random_flip else None
    pixels = crop_and_flip(images, args.resolution, crop_at, flip).to(accelerator.device, non_blocking=True)
    if args.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return pixels, conditioning, caption_ids, shard


def streamed_batch(run: Run, shard: Shard) -> tuple[list[torch.Tensor], Conditioning, torch.Tensor]:
    """The stream's next examples, one caption each (random among a list, empty with the dropout rate)."""
    images, caption_options = run.stream.next_batch()
    choice, dropped = (
        shard.of(torch.rand(shard.total)),
        shard.of(torch.rand(shard.total)) < run.args.conditioning_dropout_prob,
    )
    texts = [
        "" if drop else options[min(int(pick * len(options)), len(options) - 1)]
        for options, pick, drop in zip(caption_options, choice.tolist(), dropped.tolist(), strict=True)
    ]
    return images, *streamed_conditioning(run, texts)


def streamed_conditioning(run: Run, texts: list[str]) -> tuple[Conditioning, torch.Tensor]:
    """The batch's captions: token ids for a trained encoder, else embeddings from the frozen one, without autograd."""
    device = run.accelerator.device
    if run.args.train_text_encoder:
        return tokenized_conditioning(run.tokenizer, texts, run.text_max_length, device), torch.arange(len(texts))
    # No cache across batches: on data big enough to stream, captions rarely repeat, and an embedding
    # would then depend on the batch that first encoded it, so a resumed run could differ in the last bits.
    distinct = list(dict.fromkeys(texts))
    encoder = unwrap(run.accelerator, run.text_encoder)
    embeddings = encode_captions_once(
        run.tokenizer, encoder, distinct, run.text_max_length, None, device, batch_size=len(distinct)
    )
    caption_ids = torch.tensor([distinct.index(text) for text in texts])
    return Conditioning(None, None, embeddings, None, None, 0.0), caption_ids


def training_micro_step(
    run: Run, pixels: torch.Tensor, conditioning: Conditioning, caption_ids: torch.Tensor, shard: Shard
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward, backward and (on the last micro-step) clip + optimizer step. Returns (loss, grad norm)."""
    accelerator, grad_norm = run.accelerator, None
    trained = (run.unet, run.text_encoder) if run.args.train_text_encoder else (run.unet,)
    with accelerator.accumulate(*trained):
        with accelerator.autocast():
            text = condition_batch(conditioning, caption_ids, run.text_encoder)
            loss = diffusion_loss(
                run.unet, run.noise_scheduler, pixels, text, run.args.snr_gamma, run.args.noise_offset, shard
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.args.max_grad_norm > 0:
            parameters = list(run.unet.parameters()) + (
                list(run.text_encoder.parameters()) if run.args.train_text_encoder else []
            )
            grad_norm = accelerator.clip_grad_norm_(parameters, run.args.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


def update_ema(run: Run) -> None:
    if not exists(run.ema):
        return
    if run.args.ema_offload:
        run.ema.to(run.accelerator.device, non_blocking=True)
    run.ema.step(unwrap(run.accelerator, run.unet).parameters())
    if run.args.ema_offload:
        run.ema.to("cpu", non_blocking=True)


def take_micro_step(run: Run, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch through the model; after the last of an accumulation, the LR, EMA and step advance."""
    loss, grad_norm = training_micro_step(run, *micro_batch(run, epoch, position))
    if run.accelerator.sync_gradients:
        run.lr_scheduler.step()
        update_ema(run)
        run.state.step += 1
    return loss, grad_norm


def make_grid(run: Run, epoch: int) -> Path | None:
    """Sample the fixed prompts with EMA weights (main process only) and log the grid."""
    accelerator, grid = run.accelerator, None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = unwrap(accelerator, run.unet)
        with ema_weights(run.ema, unet), accelerator.autocast():
            unet.eval()
            text_encoder = unwrap(accelerator, run.text_encoder) if exists(run.text_encoder) else None
            pipeline = build_pipeline(unet, text_encoder, run.tokenizer, run.noise_scheduler, run.text_max_length)
            images, captions = sample_images(
                pipeline,
                run.validation_prompts,
                run.args.eval_batch_size,
                run.args.ddpm_num_inference_steps,
                run.args.guidance_scale,
                run.state.seed,
                run.validation_embeddings,
            )
            unet.train()
        grid = write_grid(images, captions, run.args.output_dir / "samples", run.state.step, epoch)
        log_grid(accelerator, grid, run.state.step)
    accelerator.wait_for_everyone()
    return grid


def export_pipeline(run: Run, grid: Path | None) -> None:
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = unwrap(accelerator, run.unet)
        if exists(run.text_encoder):
            text_encoder = unwrap(accelerator, run.text_encoder)
        else:  # frozen and freed after caching: its weights are still the ones on disk
            text_encoder = build_text_encoder(run.args.text_encoder_name_or_path, run.args.cache_dir)[1]
        with ema_weights(run.ema, unet):
            pipeline = build_pipeline(unet, text_encoder, run.tokenizer, run.noise_scheduler, run.text_max_length)
            save_pipeline(pipeline, run.args.output_dir, run.args, run.state, grid)
        logger.info("saved the pipeline to %s", run.args.output_dir)
    accelerator.wait_for_everyone()


@dataclass
class Meter:
    """Loss and throughput between log lines; .item() only here, once per logging interval."""

    loss_sum: torch.Tensor | None = None
    micro_steps: int = 0
    images: int = 0
    since_step: int = 0
    since_time: float = field(default_factory=time.perf_counter)
    start_time: float = field(default_factory=time.perf_counter)
    total_images: int = 0

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro_steps += 1
        self.images += images
        self.total_images += images

    def flush(self, step: int, args) -> dict:
        check_finite_loss(self.loss_sum, step, self.since_step, args)
        now = time.perf_counter()
        logs = {
            "loss": self.loss_sum.item() / self.micro_steps,
            "images_per_second": self.images / max(now - self.since_time, 1e-9),
        }
        self.loss_sum, self.micro_steps, self.images, self.since_step, self.since_time = None, 0, 0, step, now
        return logs


def log_step(run: Run, meter: Meter, grad_norm, progress) -> None:
    logs = meter.flush(run.state.step, run.args)
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    if exists(grad_norm):
        logs["grad_norm"] = float(grad_norm)
    if exists(run.ema):
        logs["ema_decay"] = run.ema.cur_decay_value or 0.0
    progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    run.accelerator.log(logs, step=run.state.step)


@dataclass(kw_only=True)
class StopCost:
    """Seconds the final checkpoint, grid and export take: as last measured, estimated before they first ran."""

    model_bytes: int
    grid_passes_per_step: float  # grid UNet passes over training passes (forward + backward ~ 3) in one step
    measured: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.measured[kind] = time.monotonic() - started

    def seconds(self, step_seconds: float) -> float:
        estimate = {
            "checkpoint": 4 * self.model_bytes / DISK_BYTES_PER_SECOND,  # weights, two Adam moments, EMA
            "grid": step_seconds * self.grid_passes_per_step,
            "export": 2 * self.model_bytes / DISK_BYTES_PER_SECOND,  # UNet and text encoder, roughly
        }
        return sum(self.measured.get(kind, guess) for kind, guess in estimate.items())


def stop_cost(run: Run) -> StopCost:
    args = run.args
    model_bytes = sum(p.numel() * p.element_size() for p in unwrap(run.accelerator, run.unet).parameters())
    guidance = 2 if args.guidance_scale > 1 else 1
    grid_passes = guidance * args.ddpm_num_inference_steps * args.eval_batch_size
    return StopCost(
        model_bytes=model_bytes,
        grid_passes_per_step=grid_passes / (3 * args.train_batch_size * args.gradient_accumulation_steps),
    )


def train(run: Run, stop: StopRequest) -> str:
    """The loop. Returns why it ended: 'done' or the stop reason."""
    from tqdm.auto import tqdm

    args, accelerator, state, schedule = run.args, run.accelerator, run.state, run.schedule
    meter, grad_norm, grid = Meter(), None, None
    cost, started, start_step = stop_cost(run), time.monotonic(), state.step
    progress = tqdm(
        total=schedule.max_steps,
        initial=state.step,
        desc="training",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    run.unet.train()
    if exists(run.text_encoder):
        run.text_encoder.train(args.train_text_encoder)
    for epoch, position in schedule.micro_batches(state.step):
        loss, norm = take_micro_step(run, epoch, position)
        meter.add(loss, args.train_batch_size * accelerator.num_processes)
        if not accelerator.sync_gradients:
            continue
        grad_norm = norm if exists(norm) else grad_norm
        progress.update(1)
        if state.step % args.logging_steps == 0:
            log_step(run, meter, grad_norm, progress)
        finished = state.step >= schedule.max_steps
        if schedule.crosses(state.step, args.save_images_epochs) or finished:
            with cost.timed("grid"):
                grid = make_grid(run, schedule.epoch_of(state.step))
        if schedule.crosses(state.step, args.save_model_epochs) or finished:
            check_finite_loss(meter.loss_sum if exists(meter.loss_sum) else loss, state.step, meter.since_step, args)
            with cost.timed("export"):
                export_pipeline(run, grid)
        stop.reserve = cost.seconds((time.monotonic() - started) / (state.step - start_step))
        stopping = stop.requested(accelerator, state.step)
        if state.step % args.checkpointing_steps == 0 or finished or stopping:
            check_finite_loss(meter.loss_sum if exists(meter.loss_sum) else loss, state.step, meter.since_step, args)
            with cost.timed("checkpoint"):
                path = save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)
            logger.info("saved checkpoint %s", path)
        if stopping:
            progress.close()
            if not finished:  # the last step has exported already
                export_at_stop(run, stop, grid, schedule.epoch_of(state.step))
            return stop.reason
    progress.close()
    return "done"


def export_at_stop(run: Run, stop: StopRequest, grid: Path | None, epoch: int) -> None:
    """After the stop's checkpoint: the pipeline (and, unless a signal may cut us short, a last grid)."""
    if not stop.by_signal:
        grid = make_grid(run, epoch)
    export_pipeline(run, grid)


def summary_line(run: Run, meter_images: int, seconds: float, reason: str) -> str:
    rate = meter_images / max(seconds, 1e-9)
    skipped = f", skipped {run.state.skipped_images} unreadable images" if run.state.skipped_images else ""
    return f"{'finished' if reason == 'done' else 'stopped'} at step {run.state.step}/{run.schedule.max_steps}: {meter_images} images in {seconds:.1f} s, {rate:.2f} img/s{skipped}"


def log_run_plan(run: Run) -> None:
    args, accelerator = run.args, run.accelerator
    effective = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    unet_params = sum(parameter.numel() for parameter in run.unet.parameters()) / 1e6
    if exists(run.stream):
        data = f"streaming {run.stream.base} (shuffle buffer {args.shuffle_buffer_size}), captions padded to {run.text_max_length} tokens"
        length = ""
    else:
        data = f"{len(run.usable_rows)} images ({run.state.skipped_images} skipped), {len(run.captions)} captions padded to {run.text_max_length} tokens"
        length = f" ({run.schedule.max_steps * args.gradient_accumulation_steps / run.schedule.batches_per_epoch:.1f} epochs)"
    logger.info(
        "%s; batch %d x %d processes x %d accumulation = %d per step; %d steps%s; UNet %.1fM parameters",
        data,
        args.train_batch_size,
        accelerator.num_processes,
        args.gradient_accumulation_steps,
        effective,
        run.schedule.max_steps,
        length,
        unet_params,
    )


def run_training(args: argparse.Namespace) -> int:
    validate_args(args)
    check_output_dir(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    run = setup_run(args)
    if run.accelerator.is_main_process:
        for stale in args.output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        finish_interrupted_export(args.output_dir)
        tracker_config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        run.accelerator.init_trackers("train_text_to_image", config=tracker_config)
    log_run_plan(run)
    stop = StopRequest(getattr(args, "max_train_seconds", None))
    stop.install()
    started, start_step = time.perf_counter(), run.state.step
    try:
        reason = train(run, stop)
    finally:
        stop.uninstall()
        run.accelerator.end_training()
    images = (
        (run.state.step - start_step)
        * args.train_batch_size
        * run.accelerator.num_processes
        * args.gradient_accumulation_steps
    )
    if run.accelerator.is_main_process:
        print(summary_line(run, images, time.perf_counter() - started, reason), flush=True)
    if reason != "done":
        if run.accelerator.is_main_process:
            print(
                f"stopped by {reason} at step {run.state.step}; the pipeline in {args.output_dir} holds that step's weights; resume with the same command plus --resume_from_checkpoint latest",
                file=sys.stderr,
                flush=True,
            )
        return 0
    if args.push_to_hub and run.accelerator.is_main_process:
        print(f"uploaded to https://huggingface.co/{push_to_hub(args.output_dir, args, run.state.step)}")
    return 0


def setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main_process() else logging.WARNING,
    )
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    # accelerate logs every file of every checkpoint at INFO; our own line says where it went
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = parse_args(argv)
        return run_training(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
