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
import dataclasses
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
# --learning_rate's default per --model_size at LEARNING_RATE_REFERENCE_BATCH images per optimizer step, frozen encoder,
# shapes task (docs/learning-rates.md): base 1e-3 collapsed in 1 seed of 3 and 2e-3 in 3 of 3, 5e-4 reached 90% prompt
# adherence at 19.2k images in 3 of 3; large is extrapolated (rate ~ 1 / parameters from small to base), not measured
PRESET_LEARNING_RATES = {"tiny": 2e-3, "small": 2e-3, "base": 5e-4, "large": 2.5e-4}
LEARNING_RATE_REFERENCE_BATCH = 32
TEXT_ENCODER_RATE_SHARE = 0.5  # a jointly trained encoder's default rate, of the chosen UNet rate
ATTENTION_MAX_RESOLUTION = 16  # cross-attention only where the feature map is at most this wide
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_MARKER = "train_state.json"
PIPELINE_STAGING = ".pipeline.tmp"  # a pipeline export is written here, then swapped in
PIPELINE_RETIRED = ".pipeline.old"  # the entries it replaces, until the swap is complete
MAX_BAD_IMAGE_SHARE = 0.5  # more unreadable images than this refuses the run
MAX_NAMED_BAD_IMAGES = 20  # unreadable images named one per line; the rest are counted
MIN_EXAMPLES_TO_JUDGE_A_STREAM = 100  # a stream is refused as mostly unreadable only after this many examples
STREAM_CAPTION_SAMPLE = 256  # streamed examples whose captions stand in for the dataset's (validation prompts)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises for corrupt/truncated files
# With several processes, agreeing to stop is a collective and so a host-device sync: every few steps, not every step
STOP_CHECK_STEPS = 10
DISK_BYTES_PER_SECOND = 100e6  # a slow notebook disk: the estimate of a save's time before one is measured
CPU = torch.device("cpu")
MIN_USEFUL_LEVEL_SIZE = 4  # px: below it a UNet level sees (almost) one pixel
NEAREST_SCALE_PROBES = 64  # images whose size is checked against --resize_filter nearest's whole-number scales
RESIZE_FILTERS = ("nearest", "box", "bilinear", "bicubic", "lanczos")
ALPHA_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIDE_WORDS = re.compile(r"\b(left|right)(?=\b|ward|most|side|hand)", re.IGNORECASE)
# --augment_prob: the conditioning vector's entries, zero for an untouched image, and the transforms' ranges
AUGMENT_LABELS = (
    "x_flip",
    "quarter_turn_sin",
    "quarter_turn_cos_minus_1",
    "rotation",
    "log2_scale",
    "shift_x",
    "shift_y",
)
AUGMENT_TRANSFORM_PROB = 0.5  # an augmented image gets each of the five transforms with this probability
AUGMENT_MAX_ROTATION = math.pi / 12  # radians
AUGMENT_LOG2_SCALE_STD = 0.2
AUGMENT_MAX_SHIFT = 0.125  # of the side, rounded to whole pixels


VALIDATION_MAX_HELD_OUT = 256  # a --validation_split share holds out at most this many images
VALIDATION_SPLIT_SEED = 20261126  # held-out rows depend on the data only, not on --seed: runs compare
VALIDATION_BUCKETS = 10  # the validation loss is read at this many fixed timestep ranges
COPY_PERCENTILE = 5.0  # copy threshold: this percentile of the training images' leave-one-out NN distances
COPY_PROBES = 2000  # training images whose nearest neighbour calibrates the copy threshold
EVALUATION_LOG = "evaluation.jsonl"  # one line per evaluation, in --output_dir
BEST_DIR = "best"  # --keep_best's pipeline, in --output_dir
VALIDATION_CHUNK = 32  # held-out images per validation forward pass (fixes the noise draws too)
NEAREST_CHUNK = 256  # samples compared with the training images at once
FEATURE_CHUNK = 32  # images per feature-model forward pass
SUMMARY_METRICS = ("val/loss", "memorization/copy_rate", "eval/fd", "eval/kid", "eval/clip_score", "eval/copy_rate")


class UserError(Exception):
    """A mistake in the user's flags or data: printed as one line, no traceback."""


def exists(value) -> bool:
    return value is not None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU from pinned memory without blocking, so the host runs ahead."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
        help="Flip images horizontally at random; a caption that says left or right gets them swapped (--flip_sided_captions).",
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

    small = parser.add_argument_group(
        "small datasets",
        "Levers against copying the training set (README 'Small datasets'); all off by default.",
    )
    small.add_argument(
        "--augment_prob",
        type=float,
        default=0.0,
        help="Share of training images geometrically augmented without leaking into samples (EDM, Karras et al. 2022):"
        " an augmented image gets each of x-flip, a quarter turn, a small rotation (up to 15 degrees), an isotropic"
        " scale (log2 ~ N(0, 0.2)) and a whole-pixel shift (up to 1/8 of the side) with probability 1/2, and the"
        " transform's parameters reach the UNet through its class embedding (zeros for an untouched image; samples"
        " always get zeros, so they look un-augmented). 0.2-0.5 for a few hundred images.",
    )
    small.add_argument(
        "--flip_sided_captions",
        default="swap",
        choices=["swap", "no_flip"],
        help="A mirrored image (--random_flip, or the x-flip of --augment_prob) whose caption says left or right:"
        " swap the words in its caption, or do not mirror it.",
    )
    small.add_argument(
        "--caption_shuffle_separator",
        default=None,
        help='Split captions into tags at this separator (e.g. ",") and shuffle the tags after'
        " --caption_keep_tokens: --caption_variants orders per caption, one picked each time it is shown.",
    )
    small.add_argument(
        "--caption_keep_tokens",
        type=int,
        default=0,
        help="Tags at the start of a caption that stay in place and are never dropped (e.g. 1 for 'a sprite of X').",
    )
    small.add_argument(
        "--caption_tag_dropout",
        type=float,
        default=0.0,
        help="Drop each tag (after --caption_keep_tokens; split at --caption_shuffle_separator, else at ',') with this"
        " probability; one tag always stays.",
    )
    small.add_argument(
        "--caption_variants",
        type=int,
        default=8,
        help="With shuffling or tag dropout: variants of each caption, fixed by its text, one picked at random each"
        " time it is shown; a frozen encoder's cache holds all of them (K x the captions' memory).",
    )
    small.add_argument(
        "--input_perturbation",
        type=float,
        default=0.0,
        help="DDPM-IP (Ning et al. 2023): the UNet's noisy input gets this much extra noise that the target does not"
        " (0.1 in the paper); counters the gap between training and sampling inputs.",
    )
    small.add_argument(
        "--resize_filter",
        default="bicubic",
        choices=list(RESIZE_FILTERS),
        help="How images are resized to --resolution: nearest keeps pixel art's hard edges (at whole-number scales).",
    )
    small.add_argument(
        "--alpha_background",
        default="white",
        choices=["white", "black", "gray", "random"],
        help="What transparent pixels of RGBA images become: a fixed colour, or random = a random flat colour per"
        " image each time it is shown, so the model does not learn one background (evaluation uses white).",
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
        default="squaredcos_cap_v2",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        help="Noise schedule (cosine by default: with v-prediction it follows prompts sooner, docs/adherence.md; the seed's was linear).",
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
    optim.add_argument(
        "--learning_rate",
        type=float,
        help="Peak learning rate. Default: chosen for the UNet and the batch (README 'Model sizes'): the --model_size"
        " preset's rate, or for a --model_config_name_or_path UNet the presets' rates log-interpolated by parameter"
        f" count, times sqrt(images per optimizer step / {LEARNING_RATE_REFERENCE_BATCH}); the run plan says which.",
    )
    optim.add_argument(
        "--text_encoder_learning_rate",
        type=float,
        help="Peak learning rate of the text encoder with --train_text_encoder. Default: --learning_rate when that is"
        f" given, else {TEXT_ENCODER_RATE_SHARE:g} x the chosen UNet rate (the encoder learning with a small UNet is"
        " steadier below its rate, docs/adherence.md).",
    )
    optim.add_argument(
        "--lr_scheduler",
        default="constant_with_warmup",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule after warm-up (constant by default: a decay to zero over a short --max_train_steps starves the late phase in which prompts are learned).",
    )
    optim.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=100,
        help="Warm-up in optimizer steps (100: what every measured run of the default rates used; the earlier 500"
        " did as well in the one run that compared them, docs/learning-rates.md).",
    )
    optim.add_argument("--adam_beta1", type=float, default=0.95, help="AdamW beta1 (the seed's 0.95).")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    optim.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clip gradients to this norm; 0 turns clipping off."
    )
    optim.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep an exponential moving average of the UNet; samples and the saved pipeline use it (--no-use_ema:"
        " the trained weights, one UNet copy less in memory).",
    )
    optim.add_argument(
        "--ema_inv_gamma",
        type=float,
        default=20.0,
        help="EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power, up to --ema_max_decay. The defaults (20, 1)"
        " average about the last 5%% of the steps at any point of a run, so a short run's EMA is not behind it.",
    )
    optim.add_argument("--ema_power", type=float, default=1.0, help="EMA warm-up power (see --ema_inv_gamma).")
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
        "--save_model_epochs",
        type=int,
        default=10,
        help="Save the pipeline every N epochs (and at the end); with --streaming, an epoch is --checkpointing_steps steps.",
    )

    sampling = parser.add_argument_group("sample grids")
    sampling.add_argument(
        "--save_images_epochs",
        "--save_images_epoch",
        dest="save_images_epochs",
        type=int,
        default=10,
        help="Sample a grid every N epochs (and at the end); with --streaming, an epoch is --checkpointing_steps steps.",
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

    evaluation = parser.add_argument_group(
        "evaluation: is it learning, has it stopped improving, is it copying? (see README, 'Know your model')"
    )
    evaluation.add_argument(
        "--validation_split",
        type=float,
        default=0.02,
        help=f"Images held out of training for the validation loss: a share (below 1; at most {VALIDATION_MAX_HELD_OUT} images, none when it rounds down to 0) or a count (1 or more). The same rows whatever --seed, so runs compare. 0 turns it off.",
    )
    evaluation.add_argument(
        "--validation_data_dir",
        help="An imagefolder of held-out images for the validation loss, instead of --validation_split.",
    )
    evaluation.add_argument(
        "--validation_steps",
        type=int,
        help=f"Compute the validation loss (EMA weights, fixed noise, {VALIDATION_BUCKETS} fixed timestep buckets) every N optimizer steps (default: with every grid).",
    )
    evaluation.add_argument(
        "--memorization_check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"With every grid, find each sample's nearest training image (pixel RMS distance at the training resolution) and write samples/nearest-STEP.png. Copy rate = share of samples nearer to a training image than {100 - COPY_PERCENTILE:.0f}%% of training images are to their own nearest neighbour (leave-one-out): about {COPY_PERCENTILE:.0f}%% for a model that makes new images, towards 100%% for one that copies. Needs the decoded images in memory (--image_cache_max_gb).",
    )
    evaluation.add_argument(
        "--eval_feature_model",
        help="A transformers image model (Hub id or local folder, e.g. facebook/dinov2-small) whose features give the Frechet distance (FD) and KID between generated and training images. Default: off.",
    )
    evaluation.add_argument(
        "--eval_clip_model",
        help="A transformers CLIP model (e.g. openai/clip-vit-base-patch32) for the prompt alignment score (CLIP score) of generated images. Default: off.",
    )
    evaluation.add_argument(
        "--eval_num_images",
        type=int,
        default=256,
        help="Images generated (fixed seeds, prompts = captions of as many fixed training images) for FD, KID, CLIP score and the copy rate.",
    )
    evaluation.add_argument(
        "--eval_steps",
        type=int,
        help="Compute FD/KID/CLIP score every N optimizer steps (default: with every grid, when a model above is given).",
    )
    evaluation.add_argument(
        "--keep_best",
        choices=["val_loss", "kid", "fd"],
        help="Keep the pipeline of the best evaluation so far (lowest value) in OUTPUT_DIR/best, with its metrics in its model card.",
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


# ---------------------------------------------------------------------------------------------
# The run's configuration: one frozen object per flag group, each checked where it is built


def require_at_least(minimum: int, **flags: int) -> None:
    for flag, value in flags.items():
        if value < minimum:
            raise UserError(f"--{flag} must be at least {minimum}, got {value}")


@dataclass(frozen=True, kw_only=True)
class CaptionVariants:
    """--caption_shuffle_separator / --caption_tag_dropout: how a caption's tags are reordered and dropped."""

    separator: str
    shuffle: bool
    keep_tokens: int
    tag_dropout: float
    count: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CaptionVariants | None:
        if not 0 <= args.caption_tag_dropout < 1:
            raise UserError(f"--caption_tag_dropout must be in [0, 1), got {args.caption_tag_dropout}")
        require_at_least(0, caption_keep_tokens=args.caption_keep_tokens)
        require_at_least(1, caption_variants=args.caption_variants)
        if args.caption_shuffle_separator == "":
            raise UserError('--caption_shuffle_separator is empty; pass the text between tags, e.g. ","')
        if not exists(args.caption_shuffle_separator) and args.caption_tag_dropout == 0:
            return None
        return cls(
            separator=args.caption_shuffle_separator or ",",
            shuffle=exists(args.caption_shuffle_separator),
            keep_tokens=args.caption_keep_tokens,
            tag_dropout=args.caption_tag_dropout,
            count=args.caption_variants,
        )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the captioned images are and how they become training pixels."""

    dataset_name: str | None
    dataset_config_name: str | None
    train_data_dir: str | None
    cache_dir: str | None
    image_column: str
    caption_column: str
    resolution: int
    center_crop: bool
    random_flip: bool
    image_cache_max_gb: float
    num_workers: int
    streaming: bool
    shuffle_buffer_size: int
    caption_max_length: int | None
    caption_cache: bool
    batch_size: int  # per process and micro-batch
    resize_filter: str = "bicubic"
    alpha_background: str = "white"
    augment_prob: float = 0.0
    flip_sided_captions: str = "swap"
    caption_variants: CaptionVariants | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataConfig:
        if not exists(args.dataset_name) and not exists(args.train_data_dir):
            raise UserError("no data: pass --train_data_dir FOLDER (imagefolder) or --dataset_name NAME_OR_PATH")
        if exists(args.train_data_dir) and not Path(args.train_data_dir).is_dir():
            raise UserError(f"--train_data_dir {args.train_data_dir} is not a folder")
        require_at_least(1, resolution=args.resolution, train_batch_size=args.train_batch_size)
        require_at_least(0, dataloader_num_workers=args.dataloader_num_workers)
        if args.streaming:
            require_at_least(1, shuffle_buffer_size=args.shuffle_buffer_size)
        if exists(args.caption_max_length) and args.caption_max_length < 2:
            raise UserError(
                f"--caption_max_length must be at least 2 (the start and end tokens), got {args.caption_max_length}"
            )
        if not 0 <= args.augment_prob <= 1:
            raise UserError(f"--augment_prob must be in [0, 1], got {args.augment_prob}")
        return cls(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_data_dir=args.train_data_dir,
            cache_dir=args.cache_dir,
            image_column=args.image_column,
            caption_column=args.caption_column,
            resolution=args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            image_cache_max_gb=args.image_cache_max_gb,
            num_workers=args.dataloader_num_workers,
            streaming=args.streaming,
            shuffle_buffer_size=args.shuffle_buffer_size,
            caption_max_length=args.caption_max_length,
            caption_cache=args.caption_cache,
            batch_size=args.train_batch_size,
            resize_filter=args.resize_filter,
            alpha_background=args.alpha_background,
            augment_prob=args.augment_prob,
            flip_sided_captions=args.flip_sided_captions,
            caption_variants=CaptionVariants.from_args(args),
        )

    @property
    def name(self) -> str:
        return self.train_data_dir or self.dataset_name

    @property
    def mirrors(self) -> bool:
        """Whether some training images are shown mirrored."""
        return self.random_flip or self.augment_prob > 0

    @property
    def decoding(self) -> Decoding:
        return Decoding(
            resolution=self.resolution,
            center_crop=self.center_crop,
            resize_filter=self.resize_filter,
            alpha_background=self.alpha_background,
        )

    @property
    def base(self) -> Path:
        """Where a caption table's relative file paths point."""
        return Path(self.name)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The text encoder, the UNet and how they run."""

    text_encoder: str
    train_text_encoder: bool
    unet_config: str | None
    model_size: str
    gradient_checkpointing: bool
    xformers: bool
    channels_last: bool
    allow_tf32: bool
    torch_compile: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelConfig:
        if args.enable_xformers_memory_efficient_attention:
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise UserError(
                    "--enable_xformers_memory_efficient_attention: xformers is not installed; pip install xformers (GPU only) or drop the flag (PyTorch SDPA attention is used)"
                )
        if args.torch_compile and torch.cuda.is_available() and torch.cuda.get_device_capability() < (7, 0):
            major, minor = torch.cuda.get_device_capability()
            raise UserError(
                f"--torch_compile needs a GPU of compute capability 7.0 or newer (Triton); {torch.cuda.get_device_name()} is {major}.{minor}: drop --torch_compile"
            )
        if exists(args.model_config_name_or_path) and not Path(args.model_config_name_or_path).exists():
            raise UserError(
                f"--model_config_name_or_path {args.model_config_name_or_path} does not exist; pass a UNet config.json or a folder with one"
            )
        return cls(
            text_encoder=args.text_encoder_name_or_path,
            train_text_encoder=args.train_text_encoder,
            unet_config=args.model_config_name_or_path,
            model_size=args.model_size,
            gradient_checkpointing=args.gradient_checkpointing,
            xformers=args.enable_xformers_memory_efficient_attention,
            channels_last=args.channels_last,
            allow_tf32=args.allow_tf32,
            torch_compile=args.torch_compile,
        )


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """The noise schedule, what the UNet predicts and how its loss is weighted."""

    num_train_timesteps: int
    beta_schedule: str
    prediction_type: str
    rescale_betas_zero_snr: bool
    snr_gamma: float
    noise_offset: float
    conditioning_dropout_prob: float
    input_perturbation: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DiffusionConfig:
        require_at_least(1, ddpm_num_steps=args.ddpm_num_steps)
        if args.input_perturbation < 0:
            raise UserError(f"--input_perturbation must be at least 0, got {args.input_perturbation}")
        if not 0 <= args.conditioning_dropout_prob < 1:
            raise UserError(f"--conditioning_dropout_prob must be in [0, 1), got {args.conditioning_dropout_prob}")
        return cls(
            num_train_timesteps=args.ddpm_num_steps,
            beta_schedule=args.ddpm_beta_schedule,
            prediction_type=args.prediction_type,
            rescale_betas_zero_snr=args.rescale_betas_zero_snr,
            snr_gamma=args.snr_gamma,
            noise_offset=args.noise_offset,
            conditioning_dropout_prob=args.conditioning_dropout_prob,
            input_perturbation=args.input_perturbation,
        )


def given_learning_rate(args: argparse.Namespace) -> float | None:
    if exists(args.learning_rate) and not args.learning_rate > 0:
        raise UserError(f"--learning_rate must be > 0, got {args.learning_rate}")
    return args.learning_rate


def text_encoder_learning_rate(args: argparse.Namespace) -> float | None:
    if not exists(args.text_encoder_learning_rate):
        return None
    if not args.text_encoder_learning_rate > 0:
        raise UserError(f"--text_encoder_learning_rate must be > 0, got {args.text_encoder_learning_rate}")
    if not args.train_text_encoder:
        logger.warning("--text_encoder_learning_rate is ignored: the text encoder is frozen (no --train_text_encoder)")
        return None
    return args.text_encoder_learning_rate


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """How long, how fast and in what precision the weights are trained, and their EMA."""

    num_epochs: int
    max_train_steps: int | None
    max_train_seconds: float | None
    gradient_accumulation_steps: int
    learning_rate: float | None  # None: chosen for the UNet and the batch (choose_learning_rates)
    text_encoder_learning_rate: float | None  # as given; see choose_learning_rates for the default
    lr_scheduler: str
    lr_warmup_steps: int
    adam_betas: tuple[float, float]
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float
    use_ema: bool
    ema_max_decay: float
    ema_inv_gamma: float
    ema_power: float
    ema_offload: bool
    mixed_precision: str
    seed: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimConfig:
        require_at_least(1, gradient_accumulation_steps=args.gradient_accumulation_steps)
        if exists(args.max_train_steps):
            require_at_least(1, max_train_steps=args.max_train_steps)
        if args.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError(
                "--mixed_precision fp16 needs a CUDA GPU and none is visible; use --mixed_precision bf16 or no on CPU"
            )
        if args.mixed_precision == "bf16" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
            logger.warning(
                "--mixed_precision bf16: %s has no native bf16 (compute capability below 8.0, e.g. T4, V100, P100), so it is emulated and slow; use --mixed_precision fp16",
                torch.cuda.get_device_name(),
            )
        if args.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
            logger.warning(
                "--mixed_precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is slower than fp32 here; --mixed_precision no is faster"
            )
        return cls(
            num_epochs=args.num_epochs,
            max_train_steps=args.max_train_steps,
            max_train_seconds=parse_duration(args.max_train_time) if exists(args.max_train_time) else None,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=given_learning_rate(args),
            text_encoder_learning_rate=text_encoder_learning_rate(args),
            lr_scheduler=args.lr_scheduler,
            lr_warmup_steps=args.lr_warmup_steps,
            adam_betas=(args.adam_beta1, args.adam_beta2),
            adam_weight_decay=args.adam_weight_decay,
            adam_epsilon=args.adam_epsilon,
            max_grad_norm=args.max_grad_norm,
            use_ema=args.use_ema,
            ema_max_decay=args.ema_max_decay,
            ema_inv_gamma=args.ema_inv_gamma,
            ema_power=args.ema_power,
            ema_offload=args.ema_offload,
            mixed_precision=args.mixed_precision,
            seed=args.seed,
        )


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """What the run writes, when, and where: checkpoints, grids, the pipeline, logs, the Hub."""

    output_dir: Path
    overwrite_output_dir: bool
    resume_from_checkpoint: str | None
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    save_model_epochs: int
    save_images_epochs: int
    validation_prompts: list[str] | None
    eval_batch_size: int
    num_inference_steps: int
    guidance_scale: float
    logger: str
    logging_dir: str
    logging_steps: int
    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None = field(repr=False)  # for the upload only: in no public flag, log or file
    hub_private_repo: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OutputConfig:
        require_at_least(
            1,
            checkpointing_steps=args.checkpointing_steps,
            save_model_epochs=args.save_model_epochs,
            save_images_epochs=args.save_images_epochs,
            eval_batch_size=args.eval_batch_size,
            ddpm_num_inference_steps=args.ddpm_num_inference_steps,
            logging_steps=args.logging_steps,
        )
        resume = args.resume_from_checkpoint
        if exists(resume) and resume != "latest" and not Path(resume).is_dir():
            raise UserError(
                f"--resume_from_checkpoint {resume} does not exist; pass a checkpoint-STEP folder or 'latest'"
            )
        if args.logger == "wandb" and os.environ.get("WANDB_MODE") == "disabled":
            logger.warning("--logger wandb with WANDB_MODE=disabled logs nothing")
        return cls(
            output_dir=Path(args.output_dir),
            overwrite_output_dir=args.overwrite_output_dir,
            resume_from_checkpoint=resume,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            save_model_epochs=args.save_model_epochs,
            save_images_epochs=args.save_images_epochs,
            validation_prompts=args.validation_prompts,
            eval_batch_size=args.eval_batch_size,
            num_inference_steps=args.ddpm_num_inference_steps,
            guidance_scale=args.guidance_scale,
            logger=args.logger,
            logging_dir=args.logging_dir,
            logging_steps=args.logging_steps,
            push_to_hub=args.push_to_hub,
            hub_model_id=args.hub_model_id,
            hub_token=args.hub_token,
            hub_private_repo=args.hub_private_repo,
        )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What tells the user whether the model learns or copies: held-out loss, nearest neighbours, FD/KID."""

    validation_split: float
    validation_data_dir: str | None
    validation_steps: int | None  # None: with every grid
    memorization_check: bool
    feature_model: str | None
    clip_model: str | None
    num_images: int
    eval_steps: int | None  # None: with every grid
    keep_best: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalConfig:
        split = args.validation_split
        if split < 0 or (split >= 1 and split != int(split)):
            raise UserError(f"--validation_split must be a share below 1, a whole count, or 0; got {split}")
        if exists(args.validation_data_dir) and not Path(args.validation_data_dir).is_dir():
            raise UserError(f"--validation_data_dir {args.validation_data_dir} is not a folder")
        for flag in ("validation_steps", "eval_steps"):
            if exists(getattr(args, flag)):
                require_at_least(1, **{flag: getattr(args, flag)})
        require_at_least(2, eval_num_images=args.eval_num_images)
        has_validation = split > 0 or exists(args.validation_data_dir)
        if args.keep_best == "val_loss" and not has_validation:
            raise UserError(
                "--keep_best val_loss needs held-out images: pass --validation_split or --validation_data_dir"
            )
        if args.keep_best in ("kid", "fd") and not exists(args.eval_feature_model):
            raise UserError(f"--keep_best {args.keep_best} needs --eval_feature_model (e.g. facebook/dinov2-small)")
        if args.streaming and (exists(args.eval_feature_model) or exists(args.eval_clip_model)):
            raise UserError(
                "--eval_feature_model/--eval_clip_model compare with training images, which a stream cannot index; drop them or --streaming"
            )
        return cls(
            validation_split=0.0 if exists(args.validation_data_dir) else split,
            validation_data_dir=args.validation_data_dir,
            validation_steps=args.validation_steps,
            memorization_check=args.memorization_check,
            feature_model=args.eval_feature_model,
            clip_model=args.eval_clip_model,
            num_images=args.eval_num_images,
            eval_steps=args.eval_steps,
            keep_best=args.keep_best,
        )

    @property
    def measures_quality(self) -> bool:
        return exists(self.feature_model) or exists(self.clip_model)


SECRET_FLAGS = ("hub_token",)  # never written: not to the model card, the trackers or anywhere else


def public_flags(args: argparse.Namespace) -> dict:
    """The run's flags as anything the run writes may show them: secrets left out, paths as text."""
    return {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in sorted(vars(args).items())
        if key not in SECRET_FLAGS
    }


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every flag, checked, by concern; `args` goes no further than here."""

    data: DataConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    optim: OptimConfig
    output: OutputConfig
    evaluation: EvalConfig
    public_flags: dict  # for the model card and the trackers

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """Cheap checks before any heavy work; a mistake gets one line naming the flag."""
        if args.streaming and not exists(args.max_train_steps):
            raise UserError("--streaming needs --max_train_steps: a stream has no length to count epochs from")
        return cls(
            data=DataConfig.from_args(args),
            model=ModelConfig.from_args(args),
            diffusion=DiffusionConfig.from_args(args),
            optim=OptimConfig.from_args(args),
            output=OutputConfig.from_args(args),
            evaluation=EvalConfig.from_args(args),
            public_flags=public_flags(args),
        )


# ---------------------------------------------------------------------------------------------
# Data: one batch source per kind of dataset, one caption parser, one policy for unreadable images


def resolve_split(dataset, name: str):
    from datasets import DatasetDict, IterableDatasetDict

    if not isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        return dataset
    if "train" in dataset:
        return dataset["train"]
    split = next(iter(dataset))
    logger.info("%s has no 'train' split; using '%s'", name, split)
    return dataset[split]


def metadata_has_rows(path: Path) -> bool:
    """A metadata.jsonl with a line, a metadata.csv with a line after its header (other formats: assumed)."""
    if path.suffix not in (".jsonl", ".csv"):
        return True
    with open(path, encoding="utf-8", errors="replace") as lines:
        filled = (line for line in lines if line.strip())
        return next(filled, None) is not None and (path.suffix == ".jsonl" or next(filled, None) is not None)


def load_raw_dataset(config: DataConfig):
    """datasets.load_dataset on a Hub id, a local folder, a save_to_disk folder or an imagefolder."""
    import datasets

    if exists(config.train_data_dir):
        folder = Path(config.train_data_dir)
        metadata = [*folder.glob("metadata.*"), *folder.glob("*/metadata.*")]
        if not metadata:
            raise UserError(
                f"--train_data_dir {folder} has no metadata.jsonl or metadata.csv; add one with columns file_name and {config.caption_column}"
            )
        if not any(map(metadata_has_rows, metadata)):
            raise UserError(f"--train_data_dir {folder}: {metadata[0].name} has no rows; add one row per image")
        try:
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=str(folder), cache_dir=config.cache_dir, streaming=config.streaming
            )
        except datasets.exceptions.DatasetGenerationError as error:  # the metadata file itself is malformed
            raise UserError(
                f"--train_data_dir {folder}: the dataset could not be read ({error.__cause__ or error}); check that"
                " metadata.jsonl/csv has rows and that every caption is a string, or every caption a list of strings"
            ) from error
        return resolve_split(dataset, str(folder))
    name = config.dataset_name
    local = Path(name)
    try:
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            dataset = resolve_split(datasets.load_from_disk(str(local)), name)
            return dataset.to_iterable_dataset() if config.streaming else dataset
        if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise UserError(f"--dataset_name {name} does not exist on disk")
        dataset = datasets.load_dataset(
            name, config.dataset_config_name, cache_dir=config.cache_dir, streaming=config.streaming
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
    """A caption cell (text, list of texts or empty) as the captions its image may be shown with."""
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


def undecoded_images(dataset, config: DataConfig):
    """The image and caption columns only; images kept as files/bytes so each is decoded once, by us."""
    from datasets import Image as ImageFeature

    columns = dataset.column_names or list(next(iter(dataset), {}))  # a stream may know its columns only from a row
    if not columns:
        raise UserError(f"the dataset {config.name} has no rows")
    for flag, column in (("--image_column", config.image_column), ("--caption_column", config.caption_column)):
        if column not in columns:
            raise UserError(f"{flag} {column!r} not in dataset columns {columns}; pass {flag} with one of them")
    if dataset.features and isinstance(dataset.features[config.image_column], ImageFeature):
        dataset = dataset.cast_column(config.image_column, ImageFeature(decode=False))
    return dataset.select_columns([config.image_column, config.caption_column])


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


def to_rgb(image, background: str = "white"):
    """Any PIL mode (L, P, RGBA, CMYK, 16-bit, float) as RGB, transparency composited on the --alpha_background
    colour; as RGBA for "random" (the colour is drawn per batch, so the alpha is kept)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if background == "random":
        return image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUNDS[background], 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """How a file becomes training pixels: --resolution, --center_crop, --resize_filter, --alpha_background."""

    resolution: int
    center_crop: bool
    resize_filter: str = "bicubic"
    alpha_background: str = "white"

    @property
    def channels(self) -> int:
        """3, or 4 when the alpha is kept for a background drawn per batch."""
        return 4 if self.alpha_background == "random" else 3


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def decode_image(
    source, resolution: int, center_crop: bool, resize_filter: str = "bicubic", alpha_background: str = "white"
) -> torch.Tensor:
    """uint8 [C, H, W] with the shorter side == resolution (square when center_crop); C = 4 (RGBA) only for a
    random background."""
    from PIL import Image

    with open_image(source) as opened:
        opened.load()
        image = to_rgb(opened, alpha_background)
    size = resized_size(*image.size, resolution)
    if size != image.size:
        resample = Image.Resampling[resize_filter.upper()]
        # reducing_gap shrinks by box-averaging first: right for smooth filters, but it would blur pixel art
        reducing_gap = None if resize_filter == "nearest" else 3.0
        image = image.resize(size, resample, reducing_gap=reducing_gap)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_or_describe(source, decoding: Decoding) -> torch.Tensor | str:
    """The decoded image, or 'source: error' when it cannot be read (the caller decides what to skip)."""
    try:
        return decode_image(
            source, decoding.resolution, decoding.center_crop, decoding.resize_filter, decoding.alpha_background
        )
    except IMAGE_ERRORS as error:
        return f"{describe_source(source)}: {error}"


def is_whole_scale(width: int, height: int, resolution: int) -> bool:
    """Whether resizing to `resolution` multiplies or divides the side by a whole number."""
    short = min(width, height)
    return short % resolution == 0 or resolution % short == 0


def warn_fractional_nearest(sources, decoding: Decoding) -> None:
    """--resize_filter nearest at a non-integer scale drops or doubles pixel rows unevenly: say so, once."""
    if decoding.resize_filter != "nearest":
        return
    sizes = []
    for source in sources:
        with contextlib.suppress(*IMAGE_ERRORS), open_image(source) as image:  # header only: no pixels read
            sizes.append(image.size)
    uneven = [size for size in sizes if not is_whole_scale(*size, decoding.resolution)]
    if uneven:
        width, height = uneven[0]
        logger.warning(
            "--resize_filter nearest: %d of the first %d images scale by a non-integer factor (e.g. %dx%d px to"
            " %d px: %.3gx), so some pixel rows are doubled and others not; pick a --resolution that divides or is a"
            " multiple of the images' size, or --resize_filter box/bicubic",
            len(uneven),
            len(sizes),
            width,
            height,
            decoding.resolution,
            decoding.resolution / min(width, height),
        )


def name_unreadable(failures: list[str], already_named: int = 0) -> None:
    """One warning line per unreadable image, the first 20 of a run; after that, one line saying how many more."""
    for failure in failures[: max(0, MAX_NAMED_BAD_IMAGES - already_named)]:
        logger.warning("skipping unreadable image %s", failure)
    unnamed = len(failures) - max(0, MAX_NAMED_BAD_IMAGES - already_named)
    if unnamed > 0:
        logger.warning("... and %d more unreadable images", unnamed)


def refuse_mostly_unreadable(failures: int, total: int, example: str) -> None:
    if failures > MAX_BAD_IMAGE_SHARE * total:
        raise UserError(f"{failures} of {total} images could not be read (e.g. {example}); check the dataset files")


def stand_in_for_unreadable(images: list[torch.Tensor | str]) -> list[torch.Tensor]:
    """Each unreadable image (its error text) replaced by a readable one of its batch: the batch keeps its size."""
    readable = [image for image in images if isinstance(image, torch.Tensor)]
    if not readable:
        raise UserError(f"no image of a whole batch could be read (e.g. {images[0]}); check the dataset files")
    return [image if isinstance(image, torch.Tensor) else readable[0] for image in images]


def collate_as_list(items):
    return items


def decoding_loader(dataset, batch_sampler, num_workers: int) -> torch.utils.data.DataLoader:
    """The one DataLoader of the trainer: workers decode the batches `batch_sampler` names, in its order.

    The sampler runs in this process, so which examples form a batch never depends on the workers; its
    own generator keeps opening a loader from drawing on the global RNG the noise comes from.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_as_list,
        generator=torch.Generator(),
    )


class RowDecoder(torch.utils.data.Dataset):
    """Row -> (row, uint8 image or error text), reading the row's cell from the Arrow table on demand."""

    def __init__(self, table, column: str, base: Path, decoding: Decoding):
        self.table, self.column, self.base, self.decoding = table, column, base, decoding

    def __len__(self) -> int:
        return len(self.table)

    def source(self, row: int):
        return resolve_image_source(self.table[int(row)][self.column], self.base)

    def __getitem__(self, row: int):
        return row, decode_or_describe(self.source(row), self.decoding)


@dataclass(frozen=True, kw_only=True)
class ImageTable:
    """A map-style dataset ready to index: captions per row, the rows that decode, and the decoded images
    when they fit in --image_cache_max_gb (else the rows are decoded again per batch)."""

    decoder: RowDecoder
    caption_options: list[list[str]]  # per row: the captions its image may be shown with
    captions: list[str]  # distinct captions, "" first (classifier-free guidance)
    usable_rows: torch.Tensor
    unreadable_rows: list[int]
    cache: list[torch.Tensor | None] | None


def read_captions(table, column: str) -> tuple[list[list[str]], list[str]]:
    options = [caption_cell_to_list(cell, row, column) for row, cell in enumerate(table[column])]
    distinct = {"": None} | {text: None for texts in options for text in texts}
    return options, list(distinct)


def check_images(decoder: RowDecoder, num_workers: int, keep: bool, show_progress: bool):
    """Decode every row once: (the images when `keep`, else None; the error texts; the unreadable rows)."""
    from tqdm.auto import tqdm

    rows = range(len(decoder))
    batches = [rows[start : start + 16] for start in range(0, len(rows), 16)]
    images = [None] * len(decoder) if keep else None
    failures, unreadable = [], []
    desc = "decoding images" if keep else "checking images"
    for batch in tqdm(decoding_loader(decoder, batches, num_workers), desc=desc, disable=not show_progress):
        for row, image in batch:
            if not isinstance(image, torch.Tensor):
                failures.append(image)
                unreadable.append(row)
            elif keep:
                images[row] = image
    return images, failures, unreadable


def read_image_table(config: DataConfig, known_unreadable: list[int] | None, show_progress: bool) -> ImageTable:
    """Captions now; images decoded once into the cache when it fits, else only checked.

    Either way every row is tried before training, so decoding once or per batch trains on the same
    rows; a resumed per-batch run takes the unreadable rows from its checkpoint instead of checking again.
    """
    table = undecoded_images(load_raw_dataset(config), config)
    if len(table) == 0:
        raise UserError(f"the dataset {config.name} has no rows")
    options, captions = read_captions(table, config.caption_column)
    decoder = RowDecoder(table, config.image_column, config.base, config.decoding)
    warn_fractional_nearest(map(decoder.source, range(min(len(table), NEAREST_SCALE_PROBES))), config.decoding)
    pixels = config.decoding.channels * config.resolution**2
    estimated_gb = len(table) * pixels * (1 if config.center_crop else 1.5) / 2**30
    keep = estimated_gb <= config.image_cache_max_gb
    if not keep:
        logger.info(
            "images need ~%.1f GiB at %d px: decoding per batch (--image_cache_max_gb %.1f) with %d worker processes (--dataloader_num_workers)",
            estimated_gb,
            config.resolution,
            config.image_cache_max_gb,
            config.num_workers,
        )
    if keep or not exists(known_unreadable):
        cache, failures, unreadable = check_images(decoder, config.num_workers, keep, show_progress)
        name_unreadable(failures)
        refuse_mostly_unreadable(len(failures), len(table), failures[0] if failures else "")
    else:
        cache, unreadable = None, known_unreadable
    skipped = set(unreadable)
    return ImageTable(
        decoder=decoder,
        caption_options=options,
        captions=captions,
        usable_rows=torch.tensor([row for row in range(len(table)) if row not in skipped], dtype=torch.long),
        unreadable_rows=sorted(skipped),
        cache=cache,
    )


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


def epoch_order(usable_rows: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch: a pure function of (seed, epoch), so resume needs no sampler state."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return usable_rows[torch.randperm(len(usable_rows), generator=generator)]


@dataclass(frozen=True, kw_only=True)
class Examples:
    """This process's share of one micro-batch, before augmentation and captioning."""

    images: list[torch.Tensor]  # uint8 [3, H, W], the short side at the resolution
    caption_options: list[list[str]]


class IndexedBatches:
    """Micro-batches of an ImageTable: the rows of micro-batch i are a pure function of (seed, i), so a
    resumed or re-split run reads the same rows; without the cache, workers decode the coming batches."""

    def __init__(self, table: ImageTable, *, seed: int, shard: Shard, batches_per_epoch: int, num_workers: int):
        self.table, self.seed, self.shard = table, seed, shard
        self.batches_per_epoch, self.num_workers = batches_per_epoch, num_workers
        self.ahead: Iterator | None = None  # worker-decoded micro-batches
        self.ahead_index = -1  # the micro-batch index `ahead` yields next
        # epoch -> its row order: one shuffle per epoch, not per micro-batch; two kept, as the decoding
        # workers' sampler runs into the next epoch while the step still reads the current one
        self.orders: dict[int, torch.Tensor] = {}

    def epoch_rows(self, epoch: int) -> torch.Tensor:
        if epoch not in self.orders:
            self.orders = {key: value for key, value in self.orders.items() if key == epoch - 1}
            self.orders[epoch] = epoch_order(self.table.usable_rows, self.seed, epoch)
        return self.orders[epoch]

    def rows(self, micro_index: int) -> list[int]:
        epoch, position = divmod(micro_index, self.batches_per_epoch)
        total = self.shard.total
        return self.shard.of(self.epoch_rows(epoch)[position * total : (position + 1) * total]).tolist()

    def examples(self, micro_index: int) -> Examples:
        rows = self.rows(micro_index)
        options = [self.table.caption_options[row] for row in rows]
        if exists(self.table.cache):
            return Examples(images=[self.table.cache[row] for row in rows], caption_options=options)
        if self.num_workers == 0:
            decoded = [self.table.decoder[row] for row in rows]
        else:
            if micro_index != self.ahead_index:  # the first batch, or a jump: (re)start the workers there
                batch_rows = map(self.rows, itertools.count(micro_index))
                self.ahead = iter(decoding_loader(self.table.decoder, batch_rows, self.num_workers))
            decoded = next(self.ahead)
            self.ahead_index = micro_index + 1
        if [row for row, _ in decoded] != rows:
            raise RuntimeError(
                f"decoded rows {[row for row, _ in decoded]} are not the micro-batch's {rows}: a bug, please report it"
            )
        images = [image for _, image in decoded]
        name_unreadable([image for image in images if not isinstance(image, torch.Tensor)])  # changed since checked
        return Examples(images=stand_in_for_unreadable(images), caption_options=options)

    @property
    def skipped(self) -> int:
        return len(self.table.unreadable_rows)

    def describe(self) -> str:
        return f"{len(self.table.usable_rows)} images ({self.skipped} skipped), {len(self.table.captions)} captions"


class ExampleDecoder(torch.utils.data.Dataset):
    """A streamed example -> (uint8 image or error text, caption cell); runs in DataLoader workers."""

    def __init__(self, config: DataConfig):
        self.image_column, self.caption_column, self.base = config.image_column, config.caption_column, config.base
        self.decoding = config.decoding

    def __getitem__(self, example: dict):
        source = resolve_image_source(example[self.image_column], self.base)
        return decode_or_describe(source, self.decoding), example[self.caption_column]


class StreamedBatches:
    """--streaming: this process's share of an IterableDataset, reshuffled every pass, decoded per batch.

    The position is derived from the step, not saved: every micro-batch takes exactly batch_size
    examples (an unreadable image is stood in for by another of its batch, named and counted), so
    after N micro-batches the stream is N x batch examples in, and a resume skips that many without
    decoding them. The shuffle is a function of (seed, pass), so the skip lands exactly where the
    interrupted run was. IterableDataset.state_dict() would not: datasets drops the shuffle buffer's
    contents on resume and refills it from further on, so a resumed run would see other examples.
    """

    def __init__(self, dataset, config: DataConfig, start_micro_index: int):
        self.dataset, self.config, self.passes = dataset, config, 0
        self.examples_seen, self.unreadable = 0, 0
        self.stream = self.new_pass()
        self.taken = 0  # examples taken from the stream, across passes: an example's row number
        self.skip(start_micro_index * config.batch_size)
        self.decoded = None  # the DataLoader's iterator, opened by the first batch (after a resume's skip)

    def new_pass(self) -> Iterator[dict]:
        self.dataset.set_epoch(self.passes)
        self.taken_this_pass = 0
        return iter(self.dataset)

    def take(self, count: int) -> list[dict]:
        taken = []
        while len(taken) < count:
            example = next(self.stream, None)
            if example is not None:
                taken.append(example)
                self.taken_this_pass += 1
                continue
            if self.taken_this_pass == 0:
                raise UserError(
                    f"the dataset {self.config.name} streams no rows for this process; check the data or shards"
                )
            self.passes += 1
            self.stream = self.new_pass()
        return taken

    def skip(self, count: int) -> None:
        for start in range(0, count, 4096):
            self.take(min(4096, count - start))
        self.taken = count

    def raw_batches(self) -> Iterator[list[dict]]:
        """batch_size undecoded examples at a time, forever (the DataLoader's batch sampler)."""
        while True:
            yield self.take(self.config.batch_size)

    def examples(self, micro_index: int) -> Examples:
        if not exists(self.decoded):
            self.decoded = iter(
                decoding_loader(ExampleDecoder(self.config), self.raw_batches(), self.config.num_workers)
            )
        images, cells = zip(*next(self.decoded), strict=True)
        first_row, self.taken = self.taken, self.taken + len(images)
        column = self.config.caption_column
        options = [caption_cell_to_list(cell, first_row + index, column) for index, cell in enumerate(cells)]
        failures = [image for image in images if not isinstance(image, torch.Tensor)]
        name_unreadable(failures, already_named=self.unreadable)
        self.examples_seen, self.unreadable = self.examples_seen + len(images), self.unreadable + len(failures)
        if self.examples_seen >= MIN_EXAMPLES_TO_JUDGE_A_STREAM and failures:
            refuse_mostly_unreadable(self.unreadable, self.examples_seen, failures[0])
        return Examples(images=stand_in_for_unreadable(list(images)), caption_options=options)

    def first_sources(self, count: int) -> Iterator:
        """The image cells of the first examples of one pass, as decode_image takes them."""
        for example in itertools.islice(iter(self.dataset), count):
            yield resolve_image_source(example[self.config.image_column], self.config.base)

    def sample_captions(self, count: int) -> list[str]:
        """Captions of the first examples of one pass (fewer when the data is smaller): a stand-in for the dataset's."""
        cells = [example[self.config.caption_column] for example in itertools.islice(iter(self.dataset), count)]
        texts = {
            text
            for row, cell in enumerate(cells)
            for text in caption_cell_to_list(cell, row, self.config.caption_column)
        }
        return [""] + sorted(text for text in texts if text)

    @property
    def skipped(self) -> int:
        return self.unreadable

    def describe(self) -> str:
        return f"streaming {self.config.name} (shuffle buffer {self.config.shuffle_buffer_size})"


def open_stream(
    config: DataConfig, process_index: int, num_processes: int, seed: int, start_micro_index: int
) -> StreamedBatches:
    from datasets.distributed import split_dataset_by_node

    dataset = undecoded_images(load_raw_dataset(config), config)
    if num_processes > 1:
        dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    return StreamedBatches(
        dataset.shuffle(seed=seed, buffer_size=config.shuffle_buffer_size), config, start_micro_index
    )


@dataclass(frozen=True, kw_only=True)
class AugmentDraws:
    """--augment_prob: each example's transform; all zero / False for an untouched one."""

    x_flip: torch.Tensor  # bool
    quarter_turns: torch.Tensor  # long, 0-3 (clockwise as displayed: y points down)
    rotation: torch.Tensor  # radians (clockwise as displayed)
    log2_scale: torch.Tensor
    shift: torch.Tensor  # [N, 2] (x, y) as fractions of the side, rounded to whole pixels when applied


def draw_augmentation(shard: Shard, augment_prob: float) -> AugmentDraws:
    """Which examples are augmented and their transforms (for draw_batch: a fixed count of draws)."""
    total = shard.total
    augmented = torch.rand(total) < augment_prob
    applied = (torch.rand(total, 5) < AUGMENT_TRANSFORM_PROB) & augmented[:, None]
    quarter_turns = 1 + (torch.rand(total) * 3).long().clamp(max=2)
    rotation = (torch.rand(total) * 2 - 1) * AUGMENT_MAX_ROTATION
    log2_scale = torch.randn(total) * AUGMENT_LOG2_SCALE_STD
    shift = (torch.rand(total, 2) * 2 - 1) * AUGMENT_MAX_SHIFT
    return AugmentDraws(
        x_flip=shard.of(applied[:, 0]),
        quarter_turns=shard.of(torch.where(applied[:, 1], quarter_turns, 0)),
        rotation=shard.of(torch.where(applied[:, 2], rotation, 0.0)),
        log2_scale=shard.of(torch.where(applied[:, 3], log2_scale, 0.0)),
        shift=shard.of(torch.where(applied[:, 4:5], shift, 0.0)),
    )


@dataclass(frozen=True, kw_only=True)
class BatchDraws:
    """Every random number one micro-batch needs before the loss draws its noise and timesteps."""

    caption_choice: torch.Tensor  # [0, 1) per example: which of its captions
    dropped: torch.Tensor  # bool per example: shown with the empty caption
    crop_at: torch.Tensor  # (top, left) as fractions of the spare pixels
    flip: torch.Tensor | None
    variant_choice: torch.Tensor | None = None  # [0, 1) per example: which variant of its caption
    augment: AugmentDraws | None = None
    background: torch.Tensor | None = None  # [N, 3] in [0, 1]: the flat colour behind transparent pixels


def draw_batch(
    shard: Shard,
    *,
    dropout_prob: float,
    center_crop: bool,
    random_flip: bool,
    caption_variants: bool = False,
    augment_prob: float = 0.0,
    random_background: bool = False,
) -> BatchDraws:
    """The micro-batch's random numbers, from the global RNG, in a fixed order.

    The ordering contract that exact resume and "N processes = 1 process" rest on: per micro-batch,
    this function draws first (caption choice, dropout, crop, flip, then when turned on caption variant,
    augmentation, background; each for the whole global batch, then sliced to this process's shard), then
    `diffusion_loss` draws noise, noise offset, timesteps and input perturbation, and nothing else in the
    step draws from the global RNG (data loaders own their generators). A draw added anywhere else, or
    moved, changes every later batch of a run and breaks both guarantees without failing; add new draws
    here, at the end, and only when their flag is on, so that runs without it keep their batches.
    """
    caption_choice = shard.of(torch.rand(shard.total))
    dropped = shard.of(torch.rand(shard.total)) < dropout_prob
    crop_at = shard.of(torch.full((shard.total, 2), 0.5) if center_crop else torch.rand(shard.total, 2))
    flip = shard.of(torch.rand(shard.total) < 0.5) if random_flip else None
    variant_choice = shard.of(torch.rand(shard.total)) if caption_variants else None
    augment = draw_augmentation(shard, augment_prob) if augment_prob > 0 else None
    background = shard.of(torch.rand(shard.total, 3)) if random_background else None
    return BatchDraws(
        caption_choice=caption_choice,
        dropped=dropped,
        crop_at=crop_at,
        flip=flip,
        variant_choice=variant_choice,
        augment=augment,
        background=background,
    )


def share_index(share: float, count: int) -> int:
    """The index at `share` in [0, 1) of `count` options (a share rounding up to 1 still gives the last)."""
    return min(int(share * count), count - 1)


def pick(options: list, share: float):
    """The option at `share` in [0, 1) of the list."""
    return options[share_index(share, len(options))]


def caption_variant(caption: str, index: int, variants: CaptionVariants) -> str:
    """Variant `index` of a caption: its tags after the kept ones shuffled and/or dropped, by a generator
    seeded with (index, caption), so every process, run and resume makes the same K variants."""
    import random

    tags = [tag.strip() for tag in caption.split(variants.separator)]
    tags = [tag for tag in tags if tag]
    kept, rest = tags[: variants.keep_tokens], tags[variants.keep_tokens :]
    if not rest:
        return caption
    generator = random.Random(f"{index}\0{caption}")  # str seeds hash with sha512: stable across processes
    if variants.shuffle:
        generator.shuffle(rest)
    survivors = [tag for tag in rest if generator.random() >= variants.tag_dropout]
    if not survivors and not kept:  # one tag always stays: an empty caption is the unconditional one
        survivors = [rest[0]]
    joiner = variants.separator if variants.separator.isspace() else variants.separator.strip() + " "
    return joiner.join(kept + survivors)


def caption_variants_of(caption: str, variants: CaptionVariants | None) -> list[str]:
    """The texts a caption is shown as in training (itself when there are no variants)."""
    if not exists(variants) or not caption:
        return [caption]
    return [caption_variant(caption, index, variants) for index in range(variants.count)]


def pick_variant(caption: str, share: float, variants: CaptionVariants | None) -> str:
    """The variant at `share` in [0, 1) of caption_variants_of(caption), made alone (not all K per showing)."""
    if not exists(variants) or not caption:
        return caption
    return caption_variant(caption, share_index(share, variants.count), variants)


def says_side(caption: str) -> bool:
    return bool(SIDE_WORDS.search(caption))


def swap_sides(caption: str) -> str:
    """'left' <-> 'right' (also in leftward, rightmost, ...), keeping each word's case."""

    def swapped(match: re.Match) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return SIDE_WORDS.sub(swapped, caption)


def training_texts(captions: list[str], data: DataConfig) -> list[str]:
    """Every text a caption can be shown as (its variants, mirrored ones with sides swapped), for the cache."""
    texts = {}
    for caption in captions:
        for variant in caption_variants_of(caption, data.caption_variants):
            texts[variant] = None
            if data.mirrors and data.flip_sided_captions == "swap" and says_side(variant):
                texts[swap_sides(variant)] = None
    return list(texts)


def mirrored(draws: BatchDraws) -> torch.Tensor | None:
    """Per example, whether it is shown mirrored: flipped once, by --random_flip or the augmentation's x-flip."""
    flips = [flip for flip in (draws.flip, draws.augment.x_flip if exists(draws.augment) else None) if exists(flip)]
    return functools.reduce(torch.logical_xor, flips) if flips else None


def without_mirroring(draws: BatchDraws, keep: torch.Tensor) -> BatchDraws:
    """The draws with no flip where `keep` is False (--flip_sided_captions no_flip)."""
    flip = draws.flip & keep if exists(draws.flip) else None
    augment = draws.augment
    if exists(augment):
        augment = dataclasses.replace(augment, x_flip=augment.x_flip & keep)
    return dataclasses.replace(draws, flip=flip, augment=augment)


def choose_captions(
    caption_options: list[list[str]], draws: BatchDraws, variants: CaptionVariants | None = None
) -> list[str]:
    """One caption per example, picked among its list, then among its variants; the empty one where dropped
    (classifier-free guidance)."""
    captions = [
        "" if drop else pick(options, share)
        for options, share, drop in zip(
            caption_options, draws.caption_choice.tolist(), draws.dropped.tolist(), strict=True
        )
    ]
    if not exists(draws.variant_choice):
        return captions
    return [
        pick_variant(caption, share, variants)
        for caption, share in zip(captions, draws.variant_choice.tolist(), strict=True)
    ]


def mind_the_sides(captions: list[str], draws: BatchDraws, policy: str) -> tuple[list[str], BatchDraws]:
    """Mirrored images whose caption says left or right: the words swapped (policy "swap") or the image left
    unmirrored ("no_flip"), so flips do not teach that left looks like right. (captions, draws as applied)"""
    flips = mirrored(draws)
    if not exists(flips):
        return captions, draws
    sided = torch.tensor([says_side(caption) for caption in captions], dtype=torch.bool)
    if policy == "no_flip":
        return captions, without_mirroring(draws, ~sided)
    return [swap_sides(text) if flip else text for text, flip in zip(captions, flips.tolist(), strict=True)], draws


def crop_and_flip(
    images: list[torch.Tensor],
    resolution: int,
    crop_at: torch.Tensor,
    flip: torch.Tensor | None,
    device: torch.device = CPU,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """A float batch [N, 3, R, R] in [-1, 1] on `device`; crop_at holds (top, left) as fractions of the spare
    pixels; RGBA images are composited on `background` ([N, 3] in [0, 1]). The batch crosses to the device as
    uint8 (a quarter of the float bytes) and is scaled there."""
    crops = []
    for image, (top_share, left_share) in zip(images, crop_at.tolist(), strict=True):
        spare_h, spare_w = image.shape[1] - resolution, image.shape[2] - resolution
        top, left = int(top_share * (spare_h + 1 - 1e-6)), int(left_share * (spare_w + 1 - 1e-6))
        crops.append(image[:, top : top + resolution, left : left + resolution])
    batch = torch.stack(crops)
    if exists(flip):
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    batch = to_device(batch, device).float()
    if batch.shape[1] == 4:
        alpha = batch[:, 3:] / 255.0
        colour = to_device(background if exists(background) else torch.ones(len(batch), 3), device) * 255.0
        batch = batch[:, :3] * alpha + colour[:, :, None, None] * (1 - alpha)
    return batch.div_(127.5).sub_(1.0)


def quarter_turn_sin_cos(turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sine and cosine of 0-3 quarter turns, exact (entries 0 and +-1: no rounding of pi / 2)."""
    return torch.tensor([0.0, 1.0, 0.0, -1.0])[turns], torch.tensor([1.0, 0.0, -1.0, 0.0])[turns]


def augmentation_labels(augment: AugmentDraws, resolution: int) -> torch.Tensor:
    """The conditioning vector [N, len(AUGMENT_LABELS)] of each example's transform: exactly zero when untouched."""
    sin, cos = quarter_turn_sin_cos(augment.quarter_turns)
    shift_pixels = torch.round(augment.shift * resolution)
    return torch.stack(
        [
            augment.x_flip.float(),
            sin,
            cos - 1,
            augment.rotation,
            augment.log2_scale,
            shift_pixels[:, 0] / resolution,
            shift_pixels[:, 1] / resolution,
        ],
        dim=1,
    )


def sampling_grids(augment: AugmentDraws, resolution: int) -> torch.Tensor:
    """affine_grid's [N, 2, 3]: for each output pixel, where in the input it comes from. The image is
    mirrored, turned, rotated, scaled and shifted, in that order; the grid is that map's inverse."""
    count = len(augment.x_flip)
    sin, cos = quarter_turn_sin_cos(augment.quarter_turns)
    turn = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    angle = augment.rotation
    rotate = torch.stack([torch.stack([angle.cos(), -angle.sin()], 1), torch.stack([angle.sin(), angle.cos()], 1)], 1)
    mirror = torch.stack([torch.where(augment.x_flip, -1.0, 1.0), torch.ones(count)], dim=1)
    # inverse of shift . scale . rotate . turn . mirror: mirror^-1 = mirror, R^-1 = R^T
    inverse = torch.diag_embed(mirror) @ turn.transpose(1, 2) @ rotate.transpose(1, 2)
    inverse = inverse / (2.0**augment.log2_scale)[:, None, None]
    shift = torch.round(augment.shift * resolution) * 2 / resolution  # pixels in [-1, 1] coordinates
    return torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)


def augment_pixels(pixels: torch.Tensor, augment: AugmentDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """--augment_prob: (the batch transformed where drawn, its conditioning labels). Untouched images are kept
    bit for bit; the others are resampled bilinearly, reflecting at the borders (EDM's choice)."""
    resolution = pixels.shape[-1]
    labels = augmentation_labels(augment, resolution)
    changed = labels.ne(0).any(dim=1)
    if changed.any():
        grids = F.affine_grid(
            sampling_grids(augment, resolution).to(pixels.device), list(pixels.shape), align_corners=False
        )
        moved = F.grid_sample(pixels, grids, mode="bilinear", padding_mode="reflection", align_corners=False)
        pixels = torch.where(to_device(changed, pixels.device)[:, None, None, None], moved, pixels)
    return pixels, to_device(labels, pixels.device)


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


def freeze_what_last_hidden_state_skips(encoder) -> None:
    """Training reads last_hidden_state only; a BERT/RoBERTa pooler after it never gets a gradient, which
    DDP reports as an error at the second step. Frozen, it keeps its loaded weights."""
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, torch.nn.Module):
        pooler.requires_grad_(False)


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
    """Embeddings [num_captions, max_length, hidden] of every distinct caption, in CPU memory, cached on disk.

    The encoder runs on `device`; the table stays on the CPU: it grows with the captions (~231 KiB per
    77-token CLIP-L caption, 11 GiB for 50k) and a batch needs only its own rows on the GPU.
    """
    from tqdm.auto import tqdm

    from pipeline_text_to_image import encode_text

    if exists(cache_file) and cache_file.exists():
        logger.info("caption embeddings loaded from %s", cache_file)
        return torch.load(cache_file, map_location="cpu", weights_only=True)
    encoder.eval()
    # filled in place, batch by batch: concatenating chunks would hold the table twice at the peak
    embeddings = torch.empty(len(captions), max_length, text_hidden_size(encoder))
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc="encoding captions", disable=not is_main_process() or len(starts) < 2):
        batch = captions[start : start + batch_size]
        embeddings[start : start + len(batch)] = encode_text(tokenizer, encoder, batch, max_length, device).cpu()
    if exists(cache_file) and is_main_process():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(".tmp")
        torch.save(embeddings, temporary)
        temporary.replace(cache_file)
    return embeddings


class CachedEmbeddings:
    """A frozen encoder's embedding of every distinct caption, computed once: a batch is a table lookup."""

    def __init__(self, captions: list[str], table: torch.Tensor, device):
        self.row_of = {text: row for row, text in enumerate(captions)}
        self.table, self.device = table, torch.device(device)  # [captions, tokens, hidden] in CPU memory

    def embed(self, texts: list[str]) -> torch.Tensor:
        """The texts' rows, gathered on the CPU and copied to the device without waiting for it."""
        return to_device(self.table[[self.row_of[text] for text in texts]], self.device)


class LiveEncoder:
    """Captions through the encoder every batch: when it trains, or when the captions are not cached
    (a stream, --no_caption_cache). A frozen encoder runs without autograd, once per distinct caption."""

    def __init__(self, *, tokenizer, encoder, max_length: int, trains: bool, device):
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder, max_length
        self.trains, self.device = trains, device

    def embed(self, texts: list[str]) -> torch.Tensor:
        from pipeline_text_to_image import encode_text

        if self.trains:
            return encode_text(self.tokenizer, self.encoder, texts, self.max_length, self.device)
        # No cache across batches: on data big enough to stream, captions rarely repeat, and an embedding
        # would then depend on the batch that first encoded it, so a resumed run could differ in the last bits.
        distinct = list(dict.fromkeys(texts))
        with torch.no_grad():
            embeddings = encode_text(self.tokenizer, self.encoder, distinct, self.max_length, self.device)
        return embeddings[torch.tensor([distinct.index(text) for text in texts], device=embeddings.device)]


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


def condition_on_augmentation(config: dict) -> None:
    """--augment_prob: the transform's parameters enter through the class-embedding projection (added to the
    timestep embedding); the saved config records it, and the pipeline then passes zeros."""
    if config.get("class_embed_type") not in (None, "projection") or config.get("num_class_embeds"):
        raise UserError(
            f"--augment_prob conditions the UNet through its class embedding, but the --model_config_name_or_path"
            f" config already uses one (class_embed_type {config.get('class_embed_type')!r}); remove it or pass --augment_prob 0"
        )
    config.update(class_embed_type="projection", projection_class_embeddings_input_dim=len(AUGMENT_LABELS))


def build_unet(
    config_path: str | None,
    resolution: int,
    cross_attention_dim: int,
    model_size: str = DEFAULT_MODEL_SIZE,
    augmentation: bool = False,
):
    """UNet2DConditionModel for pixel space; sample_size and cross_attention_dim follow the data and encoder."""
    from diffusers import UNet2DConditionModel

    config = load_unet_config(config_path, resolution, model_size)
    if augmentation:
        condition_on_augmentation(config)
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


def build_noise_scheduler(diffusion: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=diffusion.num_train_timesteps,
        beta_schedule=diffusion.beta_schedule,
        prediction_type=diffusion.prediction_type,
        rescale_betas_zero_snr=diffusion.rescale_betas_zero_snr,
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


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete-or-ignored, rotated in one place


@dataclass
class TrainState:
    """Loop state saved with every checkpoint (model/optimizer/RNG are saved by accelerate)."""

    step: int = 0
    seed: int = 0
    num_processes: int = 1
    skipped_images: int = 0
    unreadable_rows: list[int] = field(default_factory=list)  # a resumed per-batch run need not check again
    torch_compile: bool | None = None  # compiled weights are saved under "_orig_mod." names (None: not recorded)
    best: dict | None = None  # --keep_best: {"metric", "value", "step"} of the pipeline in OUTPUT_DIR/best


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


def check_output_dir(output: OutputConfig) -> None:
    """Refuse to silently mix a fresh run into an earlier run's checkpoints."""
    earlier = list_checkpoints(output.output_dir)
    if not earlier or exists(output.resume_from_checkpoint):
        return
    if not output.overwrite_output_dir:
        raise UserError(
            f"--output_dir {output.output_dir} already holds checkpoints of an earlier run; add --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over, or choose another --output_dir"
        )
    if is_main_process():
        for path in earlier + [output.output_dir / "samples"]:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Evaluation: held-out loss, nearest training images, sample-quality metrics


def held_out_count(split: float, usable: int) -> int:
    """Images a --validation_split holds out of `usable`: a count (>= 1), or a share capped at VALIDATION_MAX_HELD_OUT."""
    return int(split) if split >= 1 else min(int(split * usable), VALIDATION_MAX_HELD_OUT)


def hold_out_rows(usable_rows: torch.Tensor, split: float) -> torch.Tensor:
    """The held-out rows, sorted: a function of the usable rows only (not --seed), so every run holds out the same."""
    count = held_out_count(split, len(usable_rows))
    if count >= len(usable_rows):
        raise UserError(
            f"--validation_split {split:g} holds out {count} of the {len(usable_rows)} usable images, leaving none to train on; pass a smaller share or count"
        )
    order = torch.randperm(len(usable_rows), generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED))
    return usable_rows[order[:count]].sort().values


def without_rows(table: ImageTable, rows: torch.Tensor) -> ImageTable:
    return dataclasses.replace(table, usable_rows=table.usable_rows[~torch.isin(table.usable_rows, rows)])


def centre_crop(image: torch.Tensor, resolution: int) -> torch.Tensor:
    top, left = (image.shape[1] - resolution) // 2, (image.shape[2] - resolution) // 2
    return image[:, top : top + resolution, left : left + resolution]


def on_white(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB of a uint8 image, RGBA (--alpha_background random) composited on white as evaluation shows it."""
    if image.shape[0] == 3:
        return image
    alpha = image[3:].float() / 255
    return (image[:3].float() * alpha + 255 * (1 - alpha)).round().to(torch.uint8)


def centre_crops(table: ImageTable, rows: list[int], resolution: int) -> torch.Tensor:
    """uint8 [N, 3, R, R]: the rows' images cropped at the centre, decoded again where they are not cached."""
    images = [table.cache[row] if exists(table.cache) else table.decoder[row][1] for row in rows]
    images = stand_in_for_unreadable(images)
    return (
        torch.stack([on_white(centre_crop(image, resolution)) for image in images])
        if images
        else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    )


@dataclass(frozen=True, kw_only=True)
class ValidationSet:
    """Held-out images at the training resolution (centre crops) and one caption each (their first)."""

    pixels: torch.Tensor  # uint8 [N, 3, R, R], on the CPU
    captions: list[str]

    @classmethod
    def from_table(cls, table: ImageTable, rows: list[int], resolution: int) -> ValidationSet:
        return cls(
            pixels=centre_crops(table, rows, resolution),
            captions=[table.caption_options[row][0] for row in rows],
        )


def fixed_noise(chunk: int, bucket: int, shape: tuple[int, ...], num_train_timesteps: int):
    """The validation noise and timesteps of one chunk of held-out images in one bucket: the same every call."""
    generator = torch.Generator().manual_seed(VALIDATION_SPLIT_SEED + 1_000_003 * bucket + chunk)
    low = bucket * num_train_timesteps // VALIDATION_BUCKETS
    high = (bucket + 1) * num_train_timesteps // VALIDATION_BUCKETS
    noise = torch.randn(shape, generator=generator)
    return noise, torch.randint(low, high, (shape[0],), generator=generator)


@torch.no_grad()
def validation_losses(unet, noise_scheduler, validation: ValidationSet, embed, snr_gamma: float, device) -> list[float]:
    """The training loss (same weighting) on the held-out images, one mean per timestep bucket.

    Noise and timesteps are fixed (fixed_noise), so the same weights give the same numbers on every call
    and after a resume; the plain mean over buckets estimates the loss at uniform timesteps, as trained.
    """
    from pipeline_text_to_image import unaugmented_labels

    num_timesteps = noise_scheduler.config.num_train_timesteps
    totals = [0.0] * VALIDATION_BUCKETS
    for chunk, start in enumerate(range(0, len(validation.captions), VALIDATION_CHUNK)):
        pixels = validation.pixels[start : start + VALIDATION_CHUNK]
        clean = to_device(pixels, device).float().div_(127.5).sub_(1.0)
        text = embed(validation.captions[start : start + VALIDATION_CHUNK])  # once per chunk, for every bucket
        labels = unaugmented_labels(unet, len(pixels), device, torch.float32).get("class_labels")
        for bucket in range(VALIDATION_BUCKETS):
            noise, timesteps = fixed_noise(chunk, bucket, tuple(pixels.shape), num_timesteps)
            losses = weighted_losses(
                unet, noise_scheduler, clean, noise.to(device), timesteps.to(device), text, snr_gamma, labels
            )
            totals[bucket] += losses.double().sum().item()
    return [total / len(validation.captions) for total in totals]


def pixel_rows(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, R, R] -> float32 [N, 3 R R] in [0, 1]."""
    return images.reshape(len(images), -1).float().div_(255)


def nearest_neighbours(
    queries: torch.Tensor, reference: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS pixel distance in [0, 1], index) of each query's nearest reference image; `exclude[i]` is a
    reference index query i may not match (itself, for leave-one-out)."""
    queries, reference = pixel_rows(queries), pixel_rows(reference)
    reference_norms = reference.pow(2).sum(1)
    distances, indices = [], []
    for start in range(0, len(queries), NEAREST_CHUNK):
        chunk = queries[start : start + NEAREST_CHUNK]
        squared = chunk.pow(2).sum(1, keepdim=True) + reference_norms - 2 * chunk @ reference.T
        if exists(exclude):
            squared[torch.arange(len(chunk)), exclude[start : start + NEAREST_CHUNK]] = float("inf")
        best = squared.min(dim=1)
        distances.append(best.values.clamp_(min=0).div_(reference.shape[1]).sqrt_())
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)


def copy_threshold(images: torch.Tensor) -> float:
    """COPY_PERCENTILE of the training images' distances to their nearest other training image (up to
    COPY_PROBES fixed probes): a sample nearer than that to a training image is counted as a copy."""
    if len(images) < 2:
        return 0.0
    probes = torch.randperm(len(images), generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED))
    probes = probes[:COPY_PROBES]
    distances, _ = nearest_neighbours(images[probes], images, exclude=probes)
    return float(np.percentile(distances.numpy(), COPY_PERCENTILE))


@dataclass(frozen=True, kw_only=True)
class TrainingReference:
    """The training images at the training resolution, for nearest-neighbour checks and FD/KID."""

    images: torch.Tensor  # uint8 [N, 3, R, R] centre crops
    captions: list[str]  # first caption of each
    copy_threshold: float

    @classmethod
    def from_table(cls, table: ImageTable, resolution: int) -> TrainingReference:
        rows = table.usable_rows.tolist()
        images = centre_crops(table, rows, resolution)
        return cls(
            images=images,
            captions=[table.caption_options[row][0] for row in rows],
            copy_threshold=copy_threshold(images),
        )

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def memorization(self, samples: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Copy rate and nearest distances of uint8 samples [M, 3, R, R]: (metrics, distances, indices)."""
        distances, indices = nearest_neighbours(samples, self.images)
        metrics = {
            "memorization/copy_rate": (distances <= self.copy_threshold).float().mean().item(),
            "memorization/nearest_distance_median": distances.median().item(),
            "memorization/copy_threshold": self.copy_threshold,
        }
        return metrics, distances, indices


def to_uint8_batch(images, resolution: int) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, R, R] (resized when the pipeline was asked for another size)."""
    arrays = [np.asarray(image.convert("RGB").resize((resolution, resolution))) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]


def write_nearest_strip(samples, prompts, reference: TrainingReference, distances, indices, path: Path) -> Path:
    """samples/nearest-STEP.png: each sample (its prompt) beside its nearest training image (distance, caption)."""
    from pipeline_text_to_image import make_captioned_grid

    cells, captions = [], []
    for sample, prompt, distance, index in zip(samples, prompts, distances.tolist(), indices.tolist(), strict=True):
        copied = " COPY," if distance <= reference.copy_threshold else ""
        cells += [sample, to_pil(reference.images[index : index + 1])[0]]
        captions += [prompt, f"d={distance:.3f}{copied} {reference.captions[index]}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_captioned_grid(cells, captions, columns=8).save(path)
    return path


def load_eval_model(flag: str, name_or_path: str, processor_class, model_class, device, cache_dir: str | None):
    """(processor, model in eval mode on `device`) of a --eval_* flag; one line naming the flag if it fails."""
    try:
        processor = processor_class.from_pretrained(name_or_path, cache_dir=cache_dir)
        model = model_class.from_pretrained(name_or_path, cache_dir=cache_dir).eval().to(device)
    except OSError as error:
        raise UserError(f"--{flag} {name_or_path}: could not be loaded ({error})") from error
    return processor, model


class ImageFeatures:
    """Image features from a transformers model (DINOv2 recommended): pooled output, or mean over tokens."""

    def __init__(self, name_or_path: str, device: torch.device, cache_dir: str | None = None):
        from transformers import AutoImageProcessor, AutoModel

        self.processor, self.model = load_eval_model(
            "eval_feature_model", name_or_path, AutoImageProcessor, AutoModel, device, cache_dir
        )
        self.device = device

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        features = []
        for start in range(0, len(images), FEATURE_CHUNK):
            inputs = self.processor(images=images[start : start + FEATURE_CHUNK], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device)
            if hasattr(self.model, "get_image_features"):  # a CLIP-like model given as the feature model
                output = self.model.get_image_features(pixel_values=pixels)
                output = output if isinstance(output, torch.Tensor) else output.pooler_output
            else:
                output = self.model(pixel_values=pixels)
                pooled = getattr(output, "pooler_output", None)
                output = pooled if exists(pooled) else output.last_hidden_state.mean(dim=1)
            features.append(output.double().cpu())
        return torch.cat(features)


class ClipScore:
    """Prompt alignment: 100 x the cosine of CLIP's image and text embeddings, floored at 0, averaged."""

    def __init__(self, name_or_path: str, device: torch.device, cache_dir: str | None = None):
        from transformers import AutoProcessor, CLIPModel

        self.processor, self.model = load_eval_model(
            "eval_clip_model", name_or_path, AutoProcessor, CLIPModel, device, cache_dir
        )
        self.device = device

    @torch.no_grad()
    def __call__(self, images, texts: list[str]) -> float:
        scores = []
        for start in range(0, len(images), FEATURE_CHUNK):
            inputs = self.processor(
                text=texts[start : start + FEATURE_CHUNK],
                images=images[start : start + FEATURE_CHUNK],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            output = self.model(**inputs)
            scores.append((100 * (output.image_embeds * output.text_embeds).sum(-1)).clamp(min=0).double().cpu())
        return torch.cat(scores).mean().item()


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 (symmetric form: no complex sqrtm)."""
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def kernel_inception_distance(
    features_a: torch.Tensor, features_b: torch.Tensor, subset_size: int = 1000, subsets: int = 100
) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (Binkowski et al. 2018), averaged over
    random subsets of `subset_size`; sets no larger than that are compared whole, once."""
    a, b = features_a.double(), features_b.double()
    size = min(len(a), len(b), subset_size)
    whole = len(a) == len(b) == size
    generator = torch.Generator().manual_seed(VALIDATION_SPLIT_SEED)
    estimates = []
    for _ in range(1 if whole else subsets):
        x = a if whole else a[torch.randperm(len(a), generator=generator)[:size]]
        y = b if whole else b[torch.randperm(len(b), generator=generator)[:size]]
        dimension = x.shape[1]
        k_xx, k_yy, k_xy = ((p @ q.T / dimension + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off_diagonal = size * (size - 1)
        estimates.append(
            (k_xx.sum() - k_xx.diagonal().sum()) / off_diagonal
            + (k_yy.sum() - k_yy.diagonal().sum()) / off_diagonal
            - 2 * k_xy.mean()
        )
    return torch.stack(estimates).mean().item()


class SampleQuality:
    """FD and KID against training images and the CLIP score, on images generated for the captions of
    fixed training rows (the same rows, prompts and seeds at every evaluation)."""

    def __init__(self, *, table: ImageTable, config: EvalConfig, resolution: int, device, cache_dir: str | None):
        generator = torch.Generator().manual_seed(VALIDATION_SPLIT_SEED)
        usable = table.usable_rows
        if len(usable) >= config.num_images:
            chosen = usable[torch.randperm(len(usable), generator=generator)[: config.num_images]]
        else:
            chosen = usable[torch.randint(len(usable), (config.num_images,), generator=generator)]
        self.rows = chosen.tolist()
        self.prompts = [table.caption_options[row][0] for row in self.rows]
        self.features = ImageFeatures(config.feature_model, device, cache_dir) if config.feature_model else None
        self.clip = ClipScore(config.clip_model, device, cache_dir) if config.clip_model else None
        self.real_features = None
        if exists(self.features):
            self.real_features = self.features(to_pil(centre_crops(table, self.rows, resolution)))

    def measure(self, images) -> dict:
        metrics = {}
        if exists(self.features):
            generated = self.features(images)
            metrics["eval/fd"] = frechet_distance(generated, self.real_features)
            metrics["eval/kid"] = kernel_inception_distance(generated, self.real_features)
        if exists(self.clip):
            metrics["eval/clip_score"] = self.clip(images, self.prompts)
        return metrics


@dataclass(frozen=True)
class Due:
    """What an evaluation at this step includes."""

    grid: bool = False
    validation: bool = False
    quality: bool = False

    def __bool__(self) -> bool:
        return self.grid or self.validation or self.quality


class EvaluationLog:
    """OUTPUT_DIR/evaluation.jsonl: one line of metrics per evaluation, kept in step with the checkpoints."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / EVALUATION_LOG

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_until(self, step: int) -> None:
        """Drop the lines of steps after `step`: a resumed run evaluates them again."""
        kept = [record for record in self.records() if record["step"] <= step]
        if kept or self.path.exists():
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def newest_values(records: list[dict]) -> dict[str, tuple[int, float]]:
    """Each metric's newest value and its step: a grid's record has no val/loss, a validation's no copy rate."""
    return {name: (record["step"], value) for record in records for name, value in record.items() if "/" in name}


def metrics_table(values: dict[str, tuple[int, float]]) -> str:
    """The model card's evaluation section: each metric's value and the step it was measured at."""
    if not values:
        return ""
    rows = "".join(f"| {name} | {value:.6g} | {step} |\n" for name, (step, value) in values.items())
    return f"\n## Evaluation\n\n| metric | value | at step |\n|---|---|---|\n{rows}"


BEST_METRICS = {"val_loss": "val/loss", "kid": "eval/kid", "fd": "eval/fd"}  # --keep_best -> logged name


@dataclass(frozen=True, kw_only=True)
class Checks:
    """The run's evaluation material, on the main process (None elsewhere, and when turned off)."""

    validation: ValidationSet | None
    reference: TrainingReference | None  # for --memorization_check
    quality: SampleQuality | None  # for --eval_feature_model / --eval_clip_model
    embed: Callable[[list[str]], torch.Tensor]  # captions -> text embeddings, as in training
    snr_gamma: float
    keep_best: str | None

    def validate(self, unet, noise_scheduler) -> dict:
        """val/loss (the mean over timestep buckets) and val/loss_tSTART per bucket."""
        if not exists(self.validation):
            return {}
        device = next(unet.parameters()).device
        per_bucket = validation_losses(unet, noise_scheduler, self.validation, self.embed, self.snr_gamma, device)
        names = bucket_names("val", noise_scheduler.config.num_train_timesteps)
        return {"val/loss": sum(per_bucket) / len(per_bucket)} | dict(zip(names, per_bucket, strict=True))


@contextlib.contextmanager
def eval_mode(unet, text_encoder) -> Iterator[None]:
    """No dropout (a trained T5/BERT has some) and no autograd while evaluating; training modes restored."""
    text_was_training = exists(text_encoder) and text_encoder.training
    unet.eval()
    if exists(text_encoder):
        text_encoder.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        unet.train()
        if text_was_training:
            text_encoder.train()


def unet_as_fp32(unet, ema):
    """A UNet that already holds its EMA weights, in fp32 to save: itself, or an fp32 copy with the EMA's fp32
    weights put in unrounded (no EMA store/restore here: the caller's ema_weights holds the training weights)."""
    return unet if next(unet.parameters()).dtype == torch.float32 else fp32_copy_with_ema(unet, ema)


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
    """A captioned PNG grid, also appended to the run's animated GIF."""
    from pipeline_text_to_image import make_captioned_grid

    samples_dir.mkdir(parents=True, exist_ok=True)
    grid = make_captioned_grid(images, captions, columns=min(len(images), 8))
    path = samples_dir / f"epoch-{epoch:05d}-step-{step:07d}.png"
    grid.save(path)
    append_to_gif(samples_dir / "progress.gif", grid)
    return path


GIF_TRAILER = b";"


def gif_frame_bytes(image, delay_ms: int) -> bytes:
    """`image` as one GIF frame to append: its delay, then the image with its palette as a local colour table."""
    import io
    import struct

    encoded = io.BytesIO()
    image.save(encoded, format="GIF")
    single = encoded.getvalue()
    screen_flags = single[10]
    palette_bytes = 3 * 2 ** ((screen_flags & 0x07) + 1) if screen_flags & 0x80 else 0
    palette, position = single[13 : 13 + palette_bytes], 13 + palette_bytes
    while single[position] == 0x21:  # extension blocks: label, then data sub-blocks up to an empty one
        position += 2
        while single[position]:
            position += single[position] + 1
        position += 1
    descriptor = bytearray(single[position : position + 10])  # 0x2C, left, top, width, height, flags
    if not descriptor[9] & 0x80:  # no local table yet: the global one becomes it
        descriptor[9] |= 0x80 | (screen_flags & 0x07)
    else:
        palette = b""
    delay = b"\x21\xf9\x04\x00" + struct.pack("<H", delay_ms // 10) + b"\x00\x00"
    return delay + bytes(descriptor) + palette + single[position + 10 : -1]


def append_to_gif(path: Path, image, delay_ms: int = 500) -> None:
    """Append a frame in place: O(frame), not a re-encode of every earlier grid. A missing GIF, one of
    another frame size (another --eval_batch_size) or one cut short by a crash starts again from this frame."""
    import struct

    if path.is_file():
        with open(path, "r+b") as gif:
            header = gif.read(10)
            gif.seek(-1, os.SEEK_END)
            if header[:3] == b"GIF" and struct.unpack("<HH", header[6:10]) == image.size and gif.read(1) == GIF_TRAILER:
                gif.seek(-1, os.SEEK_END)
                gif.write(gif_frame_bytes(image, delay_ms) + GIF_TRAILER)
                return
    image.save(path, format="GIF", save_all=True, duration=delay_ms, loop=0)


def log_image(accelerator, tag: str, path: Path, step: int) -> None:
    from PIL import Image

    for tracker in accelerator.trackers:
        image = np.asarray(Image.open(path).convert("RGB"))
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, image[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=path.name)]}, step=step)


def all_finite(model) -> bool:
    return all(torch.isfinite(parameter).all() for parameter in model.parameters())


def save_pipeline(pipeline, output_dir: Path, card: str, step: int) -> None:
    """The diffusers pipeline at output_dir, its code as pipeline.py, and a model card."""
    from pipeline_text_to_image import copy_pipeline_code

    if not all_finite(pipeline.unet):
        raise UserError(f"the UNet weights hold NaN/inf at step {step}; not overwriting the pipeline in {output_dir}")
    staging = output_dir / PIPELINE_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    copy_pipeline_code(staging)
    (staging / "README.md").write_text(card)
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


def tracker_config(flags: dict) -> dict:
    """The public flags trackers accept as hyperparameters (scalars only)."""
    return {key: value for key, value in flags.items() if isinstance(value, (int, float, str, bool))}


def training_images_line(flags: dict) -> str:
    """How the training images were shown: what a user must match to sample or fine-tune alike."""
    background = flags.get("alpha_background", "white")
    transparency = "a random flat colour per showing" if background == "random" else background
    line = f"Images resized with the {flags.get('resize_filter', 'bicubic')} filter, transparency on {transparency}"
    augment = flags.get("augment_prob", 0.0)
    if augment:
        line += (
            f"; {augment:g} of them augmented (flip, quarter turn, rotation, scale, shift) with the transform fed to"
            " the UNet's class embedding, zeros at sampling (the pipeline passes them)"
        )
    return line + "."


def model_card(
    flags: dict,
    prompts: list[str],
    state: TrainState,
    grid: Path | None,
    output_dir: Path,
    evaluation: dict[str, tuple[int, float]] | None = None,
) -> str:
    data = flags["dataset_name"] or flags["train_data_dir"]
    grid_line = (
        f"![samples]({grid.relative_to(output_dir).as_posix()})\n"
        if exists(grid) and grid.is_relative_to(output_dir)
        else ""
    )
    repo = flags["hub_model_id"] or output_dir
    return f"""---
library_name: diffusers
tags: [text-to-image, diffusion, pixel-space, train_text_to_image]
---
# {output_dir.name}

A pixel-space text-to-image diffusion model ({flags["resolution"]} px) trained from scratch with
`train_text_to_image.py` on `{data}` for {state.step} optimizer steps
({flags["prediction_type"]} prediction, {flags["ddpm_beta_schedule"]} betas, text encoder
`{flags["text_encoder_name_or_path"]}`{", trained jointly" if flags["train_text_encoder"] else ", frozen"}).
{training_images_line(flags)}

{grid_line}{metrics_table(evaluation or {})}
## Use

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{repo}", custom_pipeline="{repo}", trust_remote_code=True)
image = pipe("{prompts[0] if prompts and prompts[0] else "a prompt"}", guidance_scale={flags["guidance_scale"]}).images[0]
```

## Training flags

```json
{json.dumps(flags, indent=2, default=str)}
```
"""


def push_to_hub(output: OutputConfig, step: int) -> str:
    from huggingface_hub import create_repo, upload_folder

    repo_id = output.hub_model_id or output.output_dir.name
    repo_id = create_repo(repo_id, private=output.hub_private_repo, token=output.hub_token, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output.output_dir),
        token=output.hub_token,
        commit_message=f"train_text_to_image.py: step {step}",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", ".pipeline.*", "caption_cache/*", f"{output.logging_dir}/*"],
    )
    return repo_id


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
class GridConfig:
    prompts: list[str]
    prompt_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # (prompts, "") when the encoder was freed
    count: int
    num_inference_steps: int
    guidance_scale: float
    seed: int


class Outputs:
    """What a run writes besides checkpoints: sample grids, evaluations and the pipeline, with the EMA weights."""

    def __init__(
        self,
        *,
        accelerator,
        unet,
        ema,
        text_encoder,
        text_encoder_source: tuple[str, str | None],
        tokenizer,
        noise_scheduler,
        text_max_length: int,
        grids: GridConfig,
        output_dir: Path,
        public_flags: dict,
        checks: Checks,
    ):
        self.accelerator, self.unet, self.ema = accelerator, unet, ema
        self.text_encoder, self.text_encoder_source, self.tokenizer = text_encoder, text_encoder_source, tokenizer
        self.noise_scheduler, self.text_max_length = noise_scheduler, text_max_length
        self.grids, self.output_dir, self.public_flags = grids, output_dir, public_flags
        self.checks = checks
        self.log = EvaluationLog(output_dir)
        self.latest: dict[str, tuple[int, float]] = {}  # each metric's newest (step, value), main process

    def resume_log(self, step: int) -> None:
        """evaluation.jsonl as it was at `step` (a resumed run evaluates the later steps again)."""
        self.log.keep_until(step)
        self.latest = newest_values(self.log.records())

    def pipeline(self, unet, text_encoder):
        return build_pipeline(unet, text_encoder, self.tokenizer, self.noise_scheduler, self.text_max_length)

    def live_text_encoder(self):
        """The text encoder in use, or None when it was freed after caching the captions."""
        return unwrap(self.accelerator, self.text_encoder) if exists(self.text_encoder) else None

    def evaluate(self, state: TrainState, epoch: int, due: Due) -> Path | None:
        """What is due at this step (grid, validation loss, FD/KID), with the EMA weights, on the main process:
        written, logged, recorded in evaluation.jsonl and, with --keep_best, kept when best. The grid's path."""
        grid = None
        with main_process_with_ema(self.accelerator, self.unet, self.ema) as unet:
            if exists(unet):
                text_encoder = self.live_text_encoder()
                with eval_mode(unet, text_encoder), self.accelerator.autocast():
                    metrics = self.checks.validate(unet, self.noise_scheduler) if due.validation else {}
                    if due.grid:
                        grid, grid_metrics = self.grid(unet, text_encoder, state, epoch)
                        metrics |= grid_metrics
                    if due.quality:
                        metrics |= self.sample_quality(unet, text_encoder)
                if metrics:
                    self.record(unet, state, epoch, metrics, grid)
        return grid

    def sample(self, unet, text_encoder, prompts: list[str], count: int, seed: int):
        embeddings = None
        if not exists(text_encoder):  # freed after caching: the prompts' cached embeddings stand in
            embeddings = self.grids.prompt_embeddings
            if prompts is not self.grids.prompts:
                embeddings = (self.checks.embed(prompts), embeddings[1])
        return sample_images(
            self.pipeline(unet, text_encoder),
            prompts,
            count,
            self.grids.num_inference_steps,
            self.grids.guidance_scale,
            seed,
            embeddings,
        )

    def grid(self, unet, text_encoder, state: TrainState, epoch: int) -> tuple[Path, dict]:
        """The fixed prompts' grid, written and logged; with a training reference, each sample's nearest image."""
        images, captions = self.sample(unet, text_encoder, self.grids.prompts, self.grids.count, self.grids.seed)
        grid = write_grid(images, captions, self.output_dir / "samples", state.step, epoch)
        log_image(self.accelerator, "samples", grid, state.step)
        reference, metrics = self.checks.reference, {}
        if exists(reference):
            metrics, distances, indices = reference.memorization(to_uint8_batch(images, reference.resolution))
            strip = self.output_dir / "samples" / f"nearest-{state.step:07d}.png"
            write_nearest_strip(images, captions, reference, distances, indices, strip)
            log_image(self.accelerator, "nearest", strip, state.step)
        return grid, metrics

    def sample_quality(self, unet, text_encoder) -> dict:
        """--eval_num_images generated in grid-sized chunks (fixed seeds): FD, KID, CLIP score, copy rate."""
        quality, images = self.checks.quality, []
        chunk = self.grids.count
        for index, start in enumerate(range(0, len(quality.prompts), chunk)):
            prompts = quality.prompts[start : start + chunk]
            images += self.sample(unet, text_encoder, prompts, len(prompts), self.grids.seed + 1 + index)[0]
        metrics = quality.measure(images)
        if exists(self.checks.reference):
            reference = self.checks.reference
            copies, _, _ = reference.memorization(to_uint8_batch(images, reference.resolution))
            metrics["eval/copy_rate"] = copies["memorization/copy_rate"]
        return metrics

    def record(self, unet, state: TrainState, epoch: int, metrics: dict, grid: Path | None) -> None:
        record = {"step": state.step, "epoch": epoch, **metrics}
        self.log.append(record)
        self.accelerator.log(metrics, step=state.step)
        self.latest |= newest_values([record])
        metric = self.checks.keep_best
        name = BEST_METRICS.get(metric)
        if exists(name) and name in metrics and (not exists(state.best) or metrics[name] < state.best["value"]):
            state.best = {"metric": metric, "value": metrics[name], "step": state.step}
            best = self.output_dir / BEST_DIR
            self.save(unet_as_fp32(unet, self.ema), state, grid, best, newest_values([record]))
            logger.info(
                "step %d has the best %s so far (%.6g): saved the pipeline to %s",
                state.step,
                metric,
                metrics[name],
                best,
            )

    def save(self, unet, state: TrainState, grid: Path | None, folder: Path, metrics: dict) -> None:
        text_encoder = self.live_text_encoder()
        if not exists(text_encoder):  # frozen and freed after caching: its weights are still the ones on disk
            text_encoder = build_text_encoder(*self.text_encoder_source)[1]
        card = model_card(self.public_flags, self.grids.prompts, state, grid, folder, metrics)
        folder.mkdir(parents=True, exist_ok=True)
        save_pipeline(self.pipeline(unet, text_encoder), folder, card, state.step)

    def export(self, state: TrainState, grid: Path | None) -> None:
        with main_process_with_ema(self.accelerator, self.unet, self.ema, fp32=True) as unet:
            if exists(unet):
                self.save(unet, state, grid, self.output_dir, self.latest)
                logger.info("saved the pipeline to %s", self.output_dir)


# ---------------------------------------------------------------------------------------------
# Stopping: signals, time limits, divergence


class StoppedDuringSetup(BaseException):
    """A SIGTERM/SIGINT before the first step (the signal's name). A BaseException, like KeyboardInterrupt:
    raised wherever the signal lands, no library's `except Exception` (logging's, for one) may swallow it."""


class StopRequest:
    """Set by SIGTERM/SIGINT or --max_train_time; the loop finishes its step (with several processes,
    up to STOP_CHECK_STEPS steps, so that all stop at the same one), checkpoints, exports and exits.

    The time limit is checked against the deadline less `reserve`, the measured (or estimated) time of
    that final checkpoint, grid and export, so the whole stop fits in --max_train_time.
    """

    def __init__(self, max_seconds: float | None):
        self.reason: str | None = None
        self.by_signal = False  # agreed by all processes: skip the final grid, a preemption may be short
        self.max_seconds, self.deadline = max_seconds, None
        self.reserve = 0.0
        self.previous = {}
        self.in_setup, self.start_step = True, 0

    def start(self, step: int) -> None:
        """Training begins at `step`: the time limit counts from now, and a signal now stops after a step."""
        self.in_setup, self.start_step = False, step
        if exists(self.max_seconds):
            self.deadline = time.monotonic() + self.max_seconds

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        if self.in_setup:  # nothing to save yet: abandon the setup where it is
            raise StoppedDuringSetup(signal.Signals(signum).name)
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


def check_finite_loss(loss_sum: torch.Tensor, step: int, since: int, output_dir: Path) -> None:
    if torch.isfinite(loss_sum).all():
        return
    hint = "try a lower --learning_rate, bf16 instead of fp16, or --max_grad_norm 1"
    raise UserError(
        f"loss became NaN/inf between steps {since} and {step}; {hint}. Nothing was saved from this point; resume from the last checkpoint in {output_dir}"
    )


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class Schedule:
    """Step arithmetic in one place: micro-batches per epoch, optimizer steps, epoch flags as steps."""

    batches_per_epoch: int  # micro-batches of batch size x processes
    accumulation: int
    max_steps: int

    def epoch_of(self, step: int) -> int:
        """Epochs completed after `step` optimizer steps."""
        return step * self.accumulation // self.batches_per_epoch

    def crosses(self, step: int, every_epochs: int) -> bool:
        """True when optimizer step `step` completes a multiple of `every_epochs` epochs."""
        return self.epoch_of(step) // every_epochs > self.epoch_of(step - 1) // every_epochs


def plan_schedule(
    num_rows: int, *, batch_size: int, num_processes: int, accumulation: int, max_steps: int | None, num_epochs: int
) -> Schedule:
    global_batch = batch_size * num_processes
    batches_per_epoch = num_rows // global_batch
    if batches_per_epoch == 0:
        raise UserError(
            f"the dataset has {num_rows} usable images, fewer than one batch of {global_batch} (--train_batch_size {batch_size} x {num_processes} processes); lower --train_batch_size"
        )
    max_steps = max_steps or math.ceil(num_epochs * batches_per_epoch / accumulation)
    return Schedule(batches_per_epoch, accumulation, max_steps)


def stream_schedule(*, checkpointing_steps: int, accumulation: int, max_steps: int) -> Schedule:
    """A stream has no length: --max_train_steps sets the run, and an 'epoch' is --checkpointing_steps steps."""
    return Schedule(checkpointing_steps * accumulation, accumulation, max_steps)


@dataclass(frozen=True, kw_only=True)
class Intervals:
    """When the loop logs, samples a grid, exports the pipeline and checkpoints, in optimizer steps."""

    schedule: Schedule
    logging_steps: int
    checkpointing_steps: int
    grid_epochs: int
    export_epochs: int
    validation_steps: int | None = None  # None: with every grid; validation and quality only when there is some
    quality_steps: int | None = None
    validates: bool = False
    measures_quality: bool = False

    def last(self, step: int) -> bool:
        return step >= self.schedule.max_steps

    def log(self, step: int) -> bool:
        return step % self.logging_steps == 0

    def grid(self, step: int) -> bool:
        return self.schedule.crosses(step, self.grid_epochs) or self.last(step)

    def export(self, step: int) -> bool:
        return self.schedule.crosses(step, self.export_epochs) or self.last(step)

    def checkpoint(self, step: int) -> bool:
        return step % self.checkpointing_steps == 0 or self.last(step)

    def every(self, step: int, steps: int | None) -> bool:
        return self.grid(step) if not exists(steps) else step % steps == 0 or self.last(step)

    def due(self, step: int) -> Due:
        return Due(
            grid=self.grid(step),
            validation=self.validates and self.every(step, self.validation_steps),
            quality=self.measures_quality and self.every(step, self.quality_steps),
        )


@dataclass(frozen=True, kw_only=True)
class LearningRates:
    """The peak rates AdamW trains at, and where the UNet's came from (for the run plan)."""

    unet: float
    text_encoder: float | None  # None: a trained encoder shares the UNet's parameter group
    why: str


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


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
    2022); measured at 32 and 128 images a step (docs/learning-rates.md).
    """
    if exists(optim.learning_rate):
        return LearningRates(unet=optim.learning_rate, text_encoder=optim.text_encoder_learning_rate, why="given")
    if exists(model.unet_config):
        parameters = count_parameters(unet)
        counts = preset_parameter_counts(unet.config.sample_size, unet.config.cross_attention_dim)
        base, source = interpolated_learning_rate(parameters, counts), f"{parameters / 1e6:.1f}M parameters"
    else:
        base, source = PRESET_LEARNING_RATES[model.model_size], f"--model_size {model.model_size}"
    scale = math.sqrt(images_per_step / LEARNING_RATE_REFERENCE_BATCH)
    rate = base * scale
    text_encoder = optim.text_encoder_learning_rate
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


class Trainer:
    """One optimizer step at a time: micro-batches in; weights, learning rate and EMA out."""

    def __init__(
        self,
        *,
        accelerator,
        unet,
        text_encoder,
        trains_text_encoder: bool,
        noise_scheduler,
        optimizer,
        lr_scheduler,
        ema,
        ema_offload: bool,
        batches: IndexedBatches | StreamedBatches,
        conditioner: CachedEmbeddings | LiveEncoder,
        data: DataConfig,
        diffusion: DiffusionConfig,
        max_grad_norm: float,
        channels_last: bool,
    ):
        self.accelerator, self.unet, self.text_encoder = accelerator, unet, text_encoder
        self.trained = (unet, text_encoder) if trains_text_encoder else (unet,)
        self.noise_scheduler, self.optimizer, self.lr_scheduler = noise_scheduler, optimizer, lr_scheduler
        self.ema, self.ema_offload = ema, ema_offload
        self.batches, self.conditioner, self.data, self.diffusion = batches, conditioner, data, diffusion
        self.max_grad_norm = max_grad_norm
        self.channels_last = channels_last
        self.shard = Shard(accelerator.process_index, accelerator.num_processes, data.batch_size)
        self.accumulation = accelerator.gradient_accumulation_steps

    def micro_batch(self, micro_index: int) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """Pixels in [-1, 1], one caption each and the augmentation labels (None without --augment_prob), for
        this process's share of one global micro-batch."""
        data = self.data
        examples = self.batches.examples(micro_index)
        draws = draw_batch(
            self.shard,
            dropout_prob=self.diffusion.conditioning_dropout_prob,
            center_crop=data.center_crop,
            random_flip=data.random_flip,
            caption_variants=exists(data.caption_variants),
            augment_prob=data.augment_prob,
            random_background=data.alpha_background == "random",
        )
        captions = choose_captions(examples.caption_options, draws, data.caption_variants)
        captions, draws = mind_the_sides(captions, draws, data.flip_sided_captions)
        device = self.accelerator.device
        pixels = crop_and_flip(examples.images, data.resolution, draws.crop_at, draws.flip, device, draws.background)
        labels = None
        if exists(draws.augment):
            pixels, labels = augment_pixels(pixels, draws.augment)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return pixels, captions, labels

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Optimizer step `step` + 1: its micro-batches forward and backward, clip, update, LR and EMA.
        Returns the mean loss, the gradient norm (None when not clipping) and the loss per timestep bucket
        ([2, VALIDATION_BUCKETS]: sums, counts), all on the device: no sync."""
        accelerator, losses, grad_norm = self.accelerator, [], None
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        buckets = torch.zeros(2, VALIDATION_BUCKETS, device=accelerator.device)
        for micro_index in range(step * self.accumulation, (step + 1) * self.accumulation):
            pixels, captions, labels = self.micro_batch(micro_index)
            with accelerator.accumulate(*self.trained):
                with accelerator.autocast():
                    text = self.conditioner.embed(captions)
                    per_sample, timesteps = diffusion_losses(
                        self.unet,
                        self.noise_scheduler,
                        pixels,
                        text,
                        self.diffusion.snr_gamma,
                        self.diffusion.noise_offset,
                        self.shard,
                        augment_labels=labels,
                        input_perturbation=self.diffusion.input_perturbation,
                    )
                    loss = per_sample.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.max_grad_norm > 0:
                    parameters = [parameter for model in self.trained for parameter in model.parameters()]
                    grad_norm = accelerator.clip_grad_norm_(parameters, self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            bucket = timestep_buckets(timesteps, num_timesteps)
            buckets[0].index_add_(0, bucket, per_sample.detach().float())
            buckets[1].index_add_(0, bucket, torch.ones_like(per_sample, dtype=torch.float))
        self.lr_scheduler.step()
        self.update_ema()
        return torch.stack(losses).mean(), grad_norm, buckets

    def update_ema(self) -> None:
        if not exists(self.ema):
            return
        if self.ema_offload:
            self.ema.to(self.accelerator.device, non_blocking=True)
        self.ema.step(unwrap(self.accelerator, self.unet).parameters())
        if self.ema_offload:
            self.ema.to("cpu", non_blocking=True)

    def images_per_step(self) -> int:
        return self.shard.total * self.accumulation


def make_accelerator(optim: OptimConfig, output: OutputConfig):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    project = ProjectConfiguration(
        project_dir=str(output.output_dir), logging_dir=str(output.output_dir / output.logging_dir)
    )
    # non-main processes wait at a barrier while the main one samples grids and saves: allow it time
    timeout = InitProcessGroupKwargs(timeout=timedelta(hours=2))
    try:
        return Accelerator(
            gradient_accumulation_steps=optim.gradient_accumulation_steps,
            mixed_precision=optim.mixed_precision,
            log_with=None if output.logger == "none" else output.logger,
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


def check_distributed_type(accelerator, config: RunConfig) -> None:
    """Refuse the accelerate setups the trainer cannot run correctly, and tell DeepSpeed the batch size."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # EMA, the sample grids and the saved pipeline all read whole weights, which FSDP shards
        raise UserError(
            "FSDP is not supported: the trainer's EMA, grids and saved pipeline need whole weights; use DDP "
            "(examples/accelerate/multi_gpu.yaml) or DeepSpeed ZeRO-2 (examples/accelerate/deepspeed_zero2.yaml)"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if config.model.train_text_encoder:
            raise UserError("--train_text_encoder with DeepSpeed is not supported (one engine per model); use DDP")
        # no DataLoader goes through accelerator.prepare(), so DeepSpeed cannot read the batch size from one;
        # the flags win over the config file, so the step arithmetic and clipping are the ones asked for
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=config.data.batch_size,
            gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
            gradient_clipping=config.optim.max_grad_norm,
        )


def configure_unet(unet, model: ModelConfig) -> None:
    if model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if model.xformers:
        unet.enable_xformers_memory_efficient_attention()
    if model.channels_last:
        unet.to(memory_format=torch.channels_last)
    if model.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True, kw_only=True)
class TrainingData:
    """What the loop draws batches from, and what the captions need."""

    batches: IndexedBatches | StreamedBatches
    conditioner: CachedEmbeddings | LiveEncoder
    captions: list[str]  # the dataset's distinct captions (a sample of them when streaming), "" first
    text_max_length: int
    schedule: Schedule
    validation: ValidationSet | None  # held-out images, out of the batches


def prepare_data(config: RunConfig, accelerator, state: TrainState, tokenizer, text_encoder) -> TrainingData:
    """The batch source of the dataset's kind and the conditioner that embeds its captions."""
    data, optim = config.data, config.optim
    shard_start = state.step * optim.gradient_accumulation_steps
    validation = None
    if data.streaming:
        batches = open_stream(data, accelerator.process_index, accelerator.num_processes, state.seed, shard_start)
        captions = batches.sample_captions(STREAM_CAPTION_SAMPLE)
        shown = captions  # a stream's captions are encoded per batch: variants are made there
        warn_fractional_nearest(batches.first_sources(NEAREST_SCALE_PROBES), data.decoding)
        text_max_length = caption_max_length(tokenizer, None, data.caption_max_length)
        schedule = stream_schedule(
            checkpointing_steps=config.output.checkpointing_steps,
            accumulation=optim.gradient_accumulation_steps,
            max_steps=optim.max_train_steps,
        )
    else:
        known = state.unreadable_rows if state.step > 0 else None
        table = read_image_table(data, known, accelerator.is_local_main_process)
        state.unreadable_rows, state.skipped_images = table.unreadable_rows, len(table.unreadable_rows)
        captions = table.captions
        if config.evaluation.validation_split > 0:
            held_out = hold_out_rows(table.usable_rows, config.evaluation.validation_split)
            validation = ValidationSet.from_table(table, held_out.tolist(), data.resolution) if len(held_out) else None
            table = without_rows(table, held_out)
        # every text a caption is shown as (variants, sides swapped): the cache holds them all, and a variant
        # can tokenize longer than its caption (tags rejoined), so captions are padded to the longest
        shown = list(dict.fromkeys(captions + training_texts(captions, data)))
        text_max_length = caption_max_length(tokenizer, shown, data.caption_max_length)
        schedule = plan_schedule(
            len(table.usable_rows),
            batch_size=data.batch_size,
            num_processes=accelerator.num_processes,
            accumulation=optim.gradient_accumulation_steps,
            max_steps=optim.max_train_steps,
            num_epochs=optim.num_epochs,
        )
        shard = Shard(accelerator.process_index, accelerator.num_processes, data.batch_size)
        batches = IndexedBatches(
            table,
            seed=state.seed,
            shard=shard,
            batches_per_epoch=schedule.batches_per_epoch,
            num_workers=data.num_workers,
        )
    if exists(config.evaluation.validation_data_dir):
        validation = read_validation_folder(
            data, config.evaluation.validation_data_dir, accelerator.is_local_main_process
        )
    if data.streaming or config.model.train_text_encoder or not data.caption_cache:
        conditioner = LiveEncoder(
            tokenizer=tokenizer,
            encoder=text_encoder,
            max_length=text_max_length,
            trains=config.model.train_text_encoder,
            device=accelerator.device,
        )
    else:
        cached = list(dict.fromkeys(shown + (validation.captions if exists(validation) else [])))
        cache_file = caption_cache_path(
            config.output.output_dir, config.model.text_encoder, text_encoder, cached, text_max_length
        )
        with accelerator.main_process_first():  # the others then read the main process's cache file
            embeddings = encode_captions_once(
                tokenizer, text_encoder, cached, text_max_length, cache_file, accelerator.device
            )
        conditioner = CachedEmbeddings(cached, embeddings, accelerator.device)
    return TrainingData(
        batches=batches,
        conditioner=conditioner,
        captions=captions,
        text_max_length=text_max_length,
        schedule=schedule,
        validation=validation,
    )


def read_validation_folder(data: DataConfig, folder: str, show_progress: bool) -> ValidationSet:
    """--validation_data_dir: every readable image of another imagefolder, with the training columns."""
    config = dataclasses.replace(
        data, train_data_dir=folder, dataset_name=None, dataset_config_name=None, streaming=False, num_workers=0
    )
    table = read_image_table(config, None, show_progress)
    return ValidationSet.from_table(table, table.usable_rows.tolist(), data.resolution)


def evaluation_embedder(conditioner: CachedEmbeddings | LiveEncoder, accelerator) -> Callable:
    """Captions -> embeddings for evaluating on one process: a trained encoder is called unwrapped (its DDP
    wrapper would wait for the other processes)."""
    if isinstance(conditioner, CachedEmbeddings):
        return conditioner.embed
    from pipeline_text_to_image import encode_text

    return lambda texts: encode_text(
        conditioner.tokenizer,
        unwrap(accelerator, conditioner.encoder),
        texts,
        conditioner.max_length,
        conditioner.device,
    )


def build_checks(config: RunConfig, accelerator, data: TrainingData) -> Checks:
    """The evaluation material, built on the main process only (it alone evaluates)."""
    evaluation, resolution = config.evaluation, config.data.resolution
    table = data.batches.table if isinstance(data.batches, IndexedBatches) else None
    reference = quality = None
    if accelerator.is_main_process and evaluation.memorization_check:
        if exists(table) and exists(table.cache):
            reference = TrainingReference.from_table(table, resolution)
        else:
            logger.info(
                "no memorization check: it compares with the decoded training images, which this run does not keep in memory (--streaming or --image_cache_max_gb)"
            )
    if accelerator.is_main_process and evaluation.measures_quality:
        quality = SampleQuality(
            table=table,
            config=evaluation,
            resolution=resolution,
            device=accelerator.device,
            cache_dir=config.data.cache_dir,
        )
    return Checks(
        validation=data.validation if accelerator.is_main_process else None,
        reference=reference,
        quality=quality,
        embed=evaluation_embedder(data.conditioner, accelerator),
        snr_gamma=config.diffusion.snr_gamma,
        keep_best=evaluation.keep_best,
    )


def open_state(config: RunConfig, accelerator) -> tuple[Path | None, TrainState]:
    """The checkpoint to resume from (or None) and the loop state: the checkpoint's, or a fresh one."""
    resume = resolve_resume_checkpoint(config.output.resume_from_checkpoint, config.output.output_dir)
    if not exists(resume):
        seed = config.optim.seed if exists(config.optim.seed) else random.randrange(2**31)
        return None, TrainState(
            seed=seed, num_processes=accelerator.num_processes, torch_compile=config.model.torch_compile
        )
    state = read_train_state(resume)
    if exists(state.torch_compile) and state.torch_compile != config.model.torch_compile:
        have, want = ("with", "add") if state.torch_compile else ("without", "drop")
        raise UserError(
            f"{resume} was written {have} --torch_compile (its weights are saved under other names); {want} --torch_compile to resume it"
        )
    if state.num_processes != accelerator.num_processes:
        raise UserError(
            f"{resume} was written by {state.num_processes} processes; resume it with the same --num_processes {state.num_processes} (this launch has {accelerator.num_processes})"
        )
    return resume, state


@dataclass(kw_only=True)
class Run:
    """A run ready to train: the trainer, what it writes, when, and the loop state."""

    accelerator: object
    trainer: Trainer
    outputs: Outputs
    intervals: Intervals
    state: TrainState
    text_max_length: int
    plan: str  # the run plan, logged once


@dataclass(frozen=True, kw_only=True)
class PreparedModels:
    """The models, optimizer and schedules as accelerate prepared them, restored when resuming."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    ema: object | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    learning_rates: LearningRates


def check_checkpoint_augmentation(checkpoint: Path, augmentation: bool) -> None:
    """--augment_prob adds the UNet's class embedding: a checkpoint made with it cannot resume without it, nor
    the other way round; say so instead of a state-dict error."""
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        return
    with safe_open(str(weights), "pt") as opened:
        trained_with = any("class_embedding." in key for key in opened.keys())
    if trained_with != augmentation:
        was, now = ("with", "0") if trained_with else ("without", "> 0")
        raise UserError(
            f"--resume_from_checkpoint {checkpoint}: that run trained {was} --augment_prob (its UNet's class embedding"
            f" {'is' if trained_with else 'is not'} there), this one has --augment_prob {now}; resume with the first run's"
            " --augment_prob, or start a new --output_dir"
        )


def check_checkpoint_ema(checkpoint: Path, use_ema: bool) -> None:
    """The EMA is the second object registered for checkpointing (after the LR schedule): a run trained without it
    (the default before --use_ema was) cannot resume with it."""
    if use_ema and not (checkpoint / "custom_checkpoint_1.pkl").is_file():
        raise UserError(
            f"--resume_from_checkpoint {checkpoint}: that run trained without an EMA and --use_ema is on (the default"
            " since 2026-12-04); pass --no-use_ema to resume it, or start a new --output_dir"
        )


def load_checkpoint(accelerator, checkpoint: Path) -> None:
    try:
        accelerator.load_state(str(checkpoint))
    except ValueError as error:
        if "parameter group" not in str(error):  # torch's words for an optimizer over other parameters
            raise
        raise UserError(
            f"--resume_from_checkpoint {checkpoint}: its optimizer trained other parameters than this run would"
            " (--train_text_encoder, or an encoder rate of its own or not: with --train_text_encoder a run that gives"
            " no --learning_rate trains the encoder in a group of its own since 2026-12-04); resume with the first"
            " run's flags (for such an older run: its --learning_rate, 1e-4 by default then), or start a new --output_dir"
        ) from error


def prepare_models(config: RunConfig, accelerator, text_encoder, data: TrainingData, state, resume) -> PreparedModels:
    """UNet, EMA, optimizer and LR schedule, handed to accelerate and loaded from `resume` when given."""
    from diffusers.optimization import get_scheduler

    model, optim = config.model, config.optim
    unet = build_unet(
        model.unet_config,
        config.data.resolution,
        text_hidden_size(text_encoder),
        model.model_size,
        augmentation=config.data.augment_prob > 0,
    )
    configure_unet(unet, model)
    ema = build_ema(unet, optim)  # from the CPU copy: with --ema_offload the EMA never touches the GPU
    # on the device before the optimizer: torch 2.1-2.3 refuse fused AdamW over CPU parameters at construction
    unet.to(accelerator.device)
    images_per_step = config.data.batch_size * accelerator.num_processes * optim.gradient_accumulation_steps
    rates = choose_learning_rates(optim, model, unet, images_per_step)
    parameters = trained_parameters(unet, text_encoder, model, rates)
    optimizer = build_optimizer(parameters, optim, rates.unet, accelerator.device)
    lr_scheduler = get_scheduler(
        optim.lr_scheduler,
        optimizer,
        num_warmup_steps=optim.lr_warmup_steps,
        num_training_steps=data.schedule.max_steps,
    )
    if model.torch_compile:
        unet = torch.compile(unet)
    if model.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
        data.conditioner.encoder = text_encoder  # the prepared (DDP) one: its gradients are synced
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    # stepped by hand once per optimizer step: accelerate would step a prepared one per process
    accelerator.register_for_checkpointing(lr_scheduler)
    if exists(ema):
        accelerator.register_for_checkpointing(ema)
    if exists(resume):
        check_checkpoint_augmentation(resume, config.data.augment_prob > 0)
        check_checkpoint_ema(resume, optim.use_ema)
        load_checkpoint(accelerator, resume)
        logger.info("resumed from %s at step %d", resume, state.step)
    if exists(ema):
        # after load_state: accelerate loads custom objects with map_location="cpu" and EMAModel.load_state_dict
        # replaces its shadow tensors, so placing it before would leave a resumed EMA on the CPU
        ema.to(accelerator.device if not optim.ema_offload else "cpu")
    return PreparedModels(
        unet=unet,
        text_encoder=text_encoder,
        ema=ema,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        learning_rates=rates,
    )


def setup_run(config: RunConfig) -> Run:
    """Data, models, optimizer, EMA and accelerate, restored from a checkpoint when resuming."""
    from accelerate.utils import set_seed

    model, output = config.model, config.output
    # the Rust tokenizers' thread pool, once woken by a batch encode, kept competing with torch's threads:
    # training steps ran 2x slower on a 2-core CPU after the captions were encoded (measured)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    accelerator = make_accelerator(config.optim, output)
    check_launch(accelerator)
    check_distributed_type(accelerator, config)
    resume, state = open_state(config, accelerator)
    set_seed(state.seed)

    logger.info("preparing %s and the text encoder %s", config.data.name, model.text_encoder)
    tokenizer, text_encoder = build_text_encoder(model.text_encoder, config.data.cache_dir)
    text_encoder.requires_grad_(model.train_text_encoder)
    freeze_what_last_hidden_state_skips(text_encoder)
    text_encoder.to(accelerator.device)
    data = prepare_data(config, accelerator, state, tokenizer, text_encoder)
    models = prepare_models(config, accelerator, text_encoder, data, state, resume)
    text_encoder = models.text_encoder
    prompts = choose_validation_prompts(output.validation_prompts, data.captions, output.eval_batch_size, state.seed)
    prompt_embeddings = None
    if isinstance(data.conditioner, CachedEmbeddings):
        prompt_embeddings = encode_grid_prompts(tokenizer, text_encoder, prompts, data)
        # training reads the cached table only: free the frozen encoder (~0.5 GB for CLIP-L), reloaded to save
        text_encoder = None
    noise_scheduler = build_noise_scheduler(config.diffusion)
    trainer = Trainer(
        accelerator=accelerator,
        unet=models.unet,
        text_encoder=text_encoder,
        trains_text_encoder=model.train_text_encoder,
        noise_scheduler=noise_scheduler,
        optimizer=models.optimizer,
        lr_scheduler=models.lr_scheduler,
        ema=models.ema,
        ema_offload=config.optim.ema_offload,
        batches=data.batches,
        conditioner=data.conditioner,
        data=config.data,
        diffusion=config.diffusion,
        max_grad_norm=config.optim.max_grad_norm,
        channels_last=model.channels_last,
    )
    outputs = Outputs(
        accelerator=accelerator,
        unet=models.unet,
        ema=models.ema,
        text_encoder=text_encoder,
        text_encoder_source=(model.text_encoder, config.data.cache_dir),
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        text_max_length=data.text_max_length,
        grids=GridConfig(
            prompts=prompts,
            prompt_embeddings=prompt_embeddings,
            count=output.eval_batch_size,
            num_inference_steps=output.num_inference_steps,
            guidance_scale=output.guidance_scale,
            seed=state.seed,
        ),
        output_dir=output.output_dir,
        public_flags=config.public_flags | rates_used(models.learning_rates),
        checks=build_checks(config, accelerator, data),
    )
    intervals = Intervals(
        schedule=data.schedule,
        logging_steps=output.logging_steps,
        checkpointing_steps=output.checkpointing_steps,
        grid_epochs=output.save_images_epochs,
        export_epochs=output.save_model_epochs,
        validation_steps=config.evaluation.validation_steps,
        quality_steps=config.evaluation.eval_steps,
        validates=exists(data.validation),
        measures_quality=config.evaluation.measures_quality,
    )
    return Run(
        accelerator=accelerator,
        trainer=trainer,
        outputs=outputs,
        intervals=intervals,
        state=state,
        text_max_length=data.text_max_length,
        plan=run_plan(data, trainer, models, streaming=config.data.streaming),
    )


def encode_grid_prompts(tokenizer, text_encoder, prompts: list[str], data: TrainingData):
    """The grids' fixed prompts and the empty caption, encoded now so the frozen encoder can be freed."""
    from pipeline_text_to_image import encode_text

    with torch.no_grad():
        prompt_embeddings = encode_text(tokenizer, text_encoder, prompts, data.text_max_length).float()
    return prompt_embeddings, data.conditioner.embed([""])


def run_plan(data: TrainingData, trainer: Trainer, models: PreparedModels, *, streaming: bool) -> str:
    schedule, accelerator = data.schedule, trainer.accelerator
    unet_params = count_parameters(models.unet) / 1e6
    if streaming:
        length = f" (with --streaming an 'epoch' is --checkpointing_steps = {schedule.batches_per_epoch // schedule.accumulation} steps)"
    else:
        length = f" ({schedule.max_steps * schedule.accumulation / schedule.batches_per_epoch:.1f} epochs)"
    held_out = f" ({len(data.validation.captions)} more held out for the validation loss)" if data.validation else ""
    variants = trainer.data.caption_variants
    each = f", {variants.count} variants each" if exists(variants) else ""
    return (
        f"{data.batches.describe()}{held_out}{each} padded to {data.text_max_length} tokens; batch {trainer.data.batch_size} x "
        f"{accelerator.num_processes} processes x {schedule.accumulation} accumulation = {trainer.images_per_step()} per step; "
        f"{schedule.max_steps} steps{length}; UNet {unet_params:.1f}M parameters; {describe_rates(models.learning_rates)}"
    )


def rates_used(rates: LearningRates) -> dict:
    """The rates the run trained at, given or chosen, as the model card and the trackers show the flags."""
    return {"learning_rate": rates.unet, "text_encoder_learning_rate": rates.text_encoder}


def describe_rates(rates: LearningRates) -> str:
    encoder = f", text encoder {rates.text_encoder:.2g}" if exists(rates.text_encoder) else ""
    return f"learning rate {rates.unet:.2g} ({rates.why}){encoder}"


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Meter:
    """Loss and throughput between log lines; .item() only here, once per logging interval.

    The loss is averaged over all processes (`mean_over_processes`) before it is logged or checked,
    so every process sees a NaN any one of them had and all stop together, at the same step, rather
    than one aborting while the others wait in a collective until a timeout.
    """

    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
    num_train_timesteps: int = 1000
    loss_sum: torch.Tensor | None = None
    bucket_sums: torch.Tensor | None = None  # [2, VALIDATION_BUCKETS]: loss sums and counts per timestep bucket
    steps: int = 0
    images: int = 0
    since_step: int = 0
    since_time: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, images: int, buckets: torch.Tensor | None = None) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        if exists(buckets):
            self.bucket_sums = buckets if self.bucket_sums is None else self.bucket_sums + buckets
        self.steps += 1
        self.images += images

    def check_finite(self, step: int, output_dir: Path) -> torch.Tensor | None:
        """The loss summed since the last log line, averaged over processes; an error if it is NaN/inf anywhere."""
        if not exists(self.loss_sum):
            return None
        loss_sum = self.mean_over_processes(self.loss_sum)
        check_finite_loss(loss_sum, step, self.since_step, output_dir)
        return loss_sum

    def flush(self, step: int, output_dir: Path) -> dict:
        loss_sum = self.check_finite(step, output_dir)
        now = time.perf_counter()
        logs = {
            "loss": loss_sum.item() / self.steps,
            "images_per_second": self.images / max(now - self.since_time, 1e-9),
        }
        if exists(self.bucket_sums):  # a mean of sums over a mean of counts: the processes' shared ratio
            sums, counts = self.mean_over_processes(self.bucket_sums).tolist()
            names = bucket_names("train", self.num_train_timesteps)
            logs |= {name: total / count for name, total, count in zip(names, sums, counts, strict=True) if count}
        self.loss_sum, self.bucket_sums, self.steps, self.images, self.since_step, self.since_time = (
            None,
            None,
            0,
            0,
            step,
            now,
        )
        return logs


def mean_over_processes(accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    if accelerator.num_processes == 1:
        return lambda tensor: tensor
    return lambda tensor: accelerator.reduce(tensor.detach().clone(), reduction="mean")


def log_step(run: Run, meter: Meter, grad_norm, progress) -> None:
    trainer = run.trainer
    logs = meter.flush(run.state.step, run.outputs.output_dir)
    rates = trainer.lr_scheduler.get_last_lr()
    logs["lr"] = rates[0]
    if len(rates) > 1:  # --text_encoder_learning_rate: the encoder's group
        logs["lr_text_encoder"] = rates[1]
    if exists(grad_norm):
        logs["grad_norm"] = float(grad_norm)
    if exists(trainer.ema):
        logs["ema_decay"] = trainer.ema.cur_decay_value or 0.0
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
    grids, unet = run.outputs.grids, unwrap(run.accelerator, run.trainer.unet)
    model_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    grid_passes = (2 if grids.guidance_scale > 1 else 1) * grids.num_inference_steps * grids.count
    return StopCost(model_bytes=model_bytes, grid_passes_per_step=grid_passes / (3 * run.trainer.images_per_step()))


def train(run: Run, stop: StopRequest, checkpoints_total_limit: int | None) -> str:
    """The loop. Returns why it ended: 'done' or the stop reason."""
    from tqdm.auto import tqdm

    trainer, outputs, intervals, state = run.trainer, run.outputs, run.intervals, run.state
    schedule, output_dir = intervals.schedule, outputs.output_dir
    meter = Meter(
        mean_over_processes=mean_over_processes(run.accelerator),
        num_train_timesteps=trainer.noise_scheduler.config.num_train_timesteps,
        since_step=state.step,
    )
    grad_norm, grid = None, None
    cost, started, start_step = stop_cost(run), time.monotonic(), state.step
    progress = tqdm(
        total=schedule.max_steps,
        initial=state.step,
        desc="training",
        unit="step",
        disable=not run.accelerator.is_local_main_process,
    )
    trainer.unet.train()
    if exists(trainer.text_encoder):
        trainer.text_encoder.train(len(trainer.trained) > 1)
    while state.step < schedule.max_steps:
        loss, norm, buckets = trainer.step(state.step)
        state.step += 1
        meter.add(loss, trainer.images_per_step(), buckets)
        grad_norm = norm if exists(norm) else grad_norm
        progress.update(1)
        if intervals.log(state.step):
            log_step(run, meter, grad_norm, progress)
        if due := intervals.due(state.step):
            with cost.timed("grid"):
                grid = outputs.evaluate(state, schedule.epoch_of(state.step), due) or grid
        if intervals.export(state.step):
            meter.check_finite(state.step, output_dir)
            with cost.timed("export"):
                outputs.export(state, grid)
        stop.reserve = cost.seconds((time.monotonic() - started) / (state.step - start_step))
        stopping = stop.requested(run.accelerator, state.step)
        if intervals.checkpoint(state.step) or stopping:
            meter.check_finite(state.step, output_dir)
            with cost.timed("checkpoint"):
                path = save_checkpoint(run.accelerator, output_dir, state, checkpoints_total_limit)
            logger.info("saved checkpoint %s", path)
        if stopping:
            progress.close()
            if not intervals.last(state.step):  # the last step has exported already
                if not stop.by_signal:  # a preemption's grace period may be short: no last grid then
                    due = Due(grid=True, validation=intervals.validates)
                    grid = outputs.evaluate(state, schedule.epoch_of(state.step), due)
                outputs.export(state, grid)
            return stop.reason
    progress.close()
    return "done"


def summary_line(run: Run, images: int, seconds: float, reason: str) -> str:
    rate = images / max(seconds, 1e-9)
    skipped = run.trainer.batches.skipped
    skipped = f", skipped {skipped} unreadable images" if skipped else ""
    line = f"{'finished' if reason == 'done' else 'stopped'} at step {run.state.step}/{run.intervals.schedule.max_steps}: {images} images in {seconds:.1f} s, {rate:.2f} img/s{skipped}"
    return line + evaluation_summary(run.outputs.latest, run.state.best)


def evaluation_summary(latest: dict[str, tuple[int, float]], best: dict | None) -> str:
    """'; last evaluated: val/loss 0.1 (step S), ...; best val_loss 0.09 at step T (saved in best/)'."""
    shown = [name for name in SUMMARY_METRICS if name in latest]
    if not shown:
        return ""
    text = "; last evaluated: " + ", ".join(f"{name} {latest[name][1]:.4g} (step {latest[name][0]})" for name in shown)
    if exists(best):
        text += f"; best {best['metric']} {best['value']:.4g} at step {best['step']} (saved in {BEST_DIR}/)"
    return text


def run_training(args: argparse.Namespace) -> int:
    config = RunConfig.from_args(args)
    output = config.output
    check_output_dir(output)
    output.output_dir.mkdir(parents=True, exist_ok=True)
    stop = StopRequest(config.optim.max_train_seconds)
    stop.install()  # from here a SIGTERM/SIGINT ends the run cleanly, during setup too
    try:
        run = setup_run(config)
        stop.start(run.state.step)
        if run.accelerator.is_main_process:
            for stale in output.output_dir.glob(".checkpoint-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            finish_interrupted_export(output.output_dir)
            if (output.output_dir / BEST_DIR).is_dir():
                finish_interrupted_export(output.output_dir / BEST_DIR)
            run.outputs.resume_log(run.state.step)
            run.accelerator.init_trackers("train_text_to_image", config=tracker_config(run.outputs.public_flags))
        logger.info("%s", run.plan)
        started = time.perf_counter()
        try:
            reason = train(run, stop, output.checkpoints_total_limit)
        finally:
            run.accelerator.end_training()
    except StoppedDuringSetup as stopped:
        if is_main_process():
            print(f"stopped by {stopped} during setup, before the first step: nothing was saved", file=sys.stderr)
        return 0
    finally:
        stop.uninstall()
    images = (run.state.step - stop.start_step) * run.trainer.images_per_step()
    if run.accelerator.is_main_process:
        print(summary_line(run, images, time.perf_counter() - started, reason), flush=True)
    if reason != "done":
        if run.accelerator.is_main_process:
            print(
                f"stopped by {reason} at step {run.state.step}; the pipeline in {output.output_dir} holds that step's weights; resume with the same command plus --resume_from_checkpoint latest",
                file=sys.stderr,
                flush=True,
            )
        return 0
    if output.push_to_hub and run.accelerator.is_main_process:
        print(f"uploaded to https://huggingface.co/{push_to_hub(output, run.state.step)}")
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
