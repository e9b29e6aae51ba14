"""Flags and the run's configuration: the argparse parser, the --config YAML, and one frozen config per
flag group (data, model, diffusion, optimizer, outputs, evaluation), each checked where it is built.

The presets (--model_size, its default learning rate) live here too, because the flags' help shows them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from text_to_image.common import UserError, exists

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
DEFAULT_MODEL_SIZE = "base"
LEARNING_RATE_REFERENCE_BATCH = 32
TEXT_ENCODER_RATE_SHARE = 0.5  # a jointly trained encoder's default rate, of the chosen UNet rate
RESIZE_FILTERS = ("nearest", "box", "bilinear", "bicubic", "lanczos")
ALPHA_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
VALIDATION_MAX_HELD_OUT = 256  # a --validation_split share holds out at most this many images
VALIDATION_BUCKETS = 10  # the validation loss is read at this many fixed timestep ranges
COPY_PERCENTILE = 5.0  # copy threshold: this percentile of the training images' leave-one-out NN distances
SECRET_FLAGS = ("hub_token",)  # never written: not to the model card, the trackers or anywhere else


# --model_size presets: channels per level (cut to the resolution's levels) and ResNet layers per level
MODEL_SIZES = {
    "tiny": ((32, 64, 128, 128, 256, 256), 1),
    "small": ((64, 128, 128, 256, 256, 256), 1),
    "base": ((128, 128, 256, 256, 512, 512), 2),
    "large": ((192, 192, 384, 384, 768, 768), 2),
}


# --learning_rate's default per --model_size at LEARNING_RATE_REFERENCE_BATCH images per optimizer step, frozen encoder,
# shapes task (docs/results/learning-rates.md): base 1e-3 collapsed in 1 seed of 3 and 2e-3 in 3 of 3, 5e-4 reached 90% prompt
# adherence at 19.2k images in 3 of 3; large is extrapolated (rate ~ 1 / parameters from small to base), not measured
PRESET_LEARNING_RATES = {"tiny": 2e-3, "small": 2e-3, "base": 5e-4, "large": 2.5e-4}


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
        help="Noise schedule (cosine by default: with v-prediction it follows prompts sooner, docs/results/adherence.md; the seed's was linear).",
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
        " steadier below its rate, docs/results/adherence.md).",
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
        " did as well in the one run that compared them, docs/results/learning-rates.md).",
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


def flags_markdown(parser: argparse.ArgumentParser) -> str:
    """docs/flags.md: every flag of `parser`, by group, with its default and help (regenerated, never edited)."""
    lines = [
        "# Flags of train_text_to_image.py",
        "",
        "Generated from the parser by `python -m text_to_image.config > docs/flags.md`; a test fails when it is stale.",
        "A `--config` YAML or JSON file takes the same names as keys (without the dashes); command-line flags win.",
    ]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if action.option_strings and action.dest != "help"]
        if not actions:
            continue
        lines += ["", f"## {group.title}", ""]
        if group.description:
            lines += [group.description, ""]
        lines += ["| flag | default | what it does |", "|---|---|---|"]
        lines += [flag_row(action) for action in actions]
    return "\n".join(lines) + "\n"


def flag_row(action: argparse.Action) -> str:
    names = " ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        default = "on" if action.default else "off"
    else:
        default = "" if action.default is None else f"`{action.default}`"
    text = action.help or ""
    if action.choices:
        text += " One of: " + ", ".join(f"`{choice}`" for choice in action.choices) + "."
    cell = text.replace("|", "\\|")  # a bar inside a help text would end the table cell
    return f"| {names} | {default} | {cell} |"


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


if __name__ == "__main__":
    print(flags_markdown(build_parser()), end="")
