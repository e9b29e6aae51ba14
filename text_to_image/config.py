"""Flags and the run's configuration. Each flag is declared once, as a field of the config it belongs to:
its name is the flag's name, with its type, default and help beside it, and the config checks it when it is
built. The argparse parser (transformers' HfArgumentParser), the --config YAML and docs/flags.md all come
from these declarations.

The presets (--model_size, its default learning rate) live here too, because the flags' help shows them."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from text_to_image.common import UserError, exists
from text_to_image.metrics import FD, KEEP_BEST, KID, VAL_LOSS

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
DEFAULT_MODEL_SIZE = "base"
LEARNING_RATE_REFERENCE_BATCH = 32
TEXT_ENCODER_RATE_SHARE = 0.5  # a jointly trained encoder's default rate, of the chosen UNet rate
RESIZE_FILTERS = ("nearest", "box", "bilinear", "bicubic", "lanczos")
ALPHA_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
DEFAULT_CAPTION_TEMPLATE = "{}"  # a class folder's caption is its name as written
VALIDATION_MAX_HELD_OUT = 256  # a --validation_split share holds out at most this many images
VALIDATION_BUCKETS = 10  # the validation loss is read at this many fixed timestep ranges
COPY_PERCENTILE = 5.0  # copy threshold: this percentile of the training images' leave-one-out NN distances
WARMUP_STABLE_DECAY = "warmup_stable_decay"
YAML_NULLS = ("", "~", "null", "Null", "NULL")  # a --config YAML value that means "not set"
YAML_ON_OFF = {"on": "yes", "off": "no"}  # YAML 1.1 yes/no spellings argparse's true/false does not know
# schedules whose rate before any decay does not depend on the run's length: --max_train_time can plan it after
# measuring the first steps. diffusers' linear, cosine and polynomial read the total from the first step on.
SCHEDULES_PLANNED_BY_TIME = ("constant", "constant_with_warmup", WARMUP_STABLE_DECAY)


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


def flag(default, help: str, *, secret: bool = False, **argparse_options) -> dataclasses.Field:
    """A flag declared as a config field: `help` and `argparse_options` (choices, aliases) go to the parser;
    a `secret` flag (a token) is left out of the config's repr and of everything the run writes."""
    return field(default=default, repr=not secret, metadata={"help": help, **argparse_options})


class ExtendList(argparse.Action):
    """A list flag given either way, `--NAME a b` or `--NAME a --NAME b`: each use adds to the list, except that
    the first on the command line replaces the default (a --config file's list: the command line wins)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        given = [] if current is self.default or current is None else list(current)
        setattr(namespace, self.dest, given + list(values))


class FlagGroup:
    """A config whose fields are flags: built from the parsed flags, checked in `__post_init__`."""

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls(**{item.name: getattr(args, item.name) for item in dataclasses.fields(cls)})


def names_a_folder_or_shards(name: str) -> bool:
    """A folder, a .tar file or a glob (of WebDataset shards: layouts.shard_files reads which)."""
    path = Path(name).expanduser()
    return path.is_dir() or (path.is_file() and path.suffix == ".tar") or glob.has_magic(name)


def require_at_least(minimum: int, **flags: int) -> None:
    for name, value in flags.items():
        if value < minimum:
            raise UserError(f"--{name} must be at least {minimum}, got {value}")


def require_share(name: str, value: float, *, upper_inclusive: bool = False) -> None:
    if not (0 <= value <= 1 if upper_inclusive else 0 <= value < 1):
        raise UserError(f"--{name} must be in [0, 1{']' if upper_inclusive else ')'}, got {value}")


# ---------------------------------------------------------------------------------------------
# The flags, one config per group


@dataclass(frozen=True, kw_only=True)
class DataConfig(FlagGroup):
    """Where the captioned images are and how they become training batches."""

    _argument_group_name = "data"

    dataset_name: str | None = flag(
        None,
        "Hub dataset id, a local folder load_dataset understands (parquet/csv/json/arrow files, a save_to_disk"
        ' folder), or WebDataset .tar shards: one file, a glob in quotes ("shards/train-*.tar") or a folder of them,'
        " each sample an image (.png/.jpg/.webp) with a .txt caption or a .json holding one (--caption_column, else"
        ' its "caption" or "text" key).',
    )
    dataset_config_name: str | None = flag(
        None,
        "Dataset configuration name, if the dataset has several.",
    )
    train_data_dir: str | None = flag(
        None,
        "A folder of images with their captions: in a metadata.jsonl or metadata.csv (an imagefolder), in a .txt"
        " of the same name beside each image (nested folders too), or, with neither, the name of the folder each"
        " image sits in (class folders: cat/0001.png, dog/0002.png; see --caption_template). WebDataset .tar shards"
        " work too: one, a glob in quotes or a folder of them (see --dataset_name).",
    )
    caption_template: str = flag(
        DEFAULT_CAPTION_TEMPLATE,
        "Class folders only: the caption of an image in folder NAME, with {} standing for NAME (underscores become"
        ' spaces), e.g. "a pixel-art {}".',
    )
    cache_dir: str | None = flag(
        None,
        "Where downloaded datasets and models are cached.",
    )
    image_column: str = flag(
        "image",
        "Column holding the images.",
    )
    caption_column: str = flag(
        "text",
        "Column holding the captions (a string, a list of strings, or empty).",
    )
    resolution: int = flag(
        64,
        "Training images are resized (shorter side) and cropped to this size.",
    )
    center_crop: bool = flag(
        False,
        "Crop the centre instead of a random square.",
    )
    random_flip: bool = flag(
        False,
        "Flip images horizontally at random; a caption that says left or right gets them swapped (--flip_sided_captions).",
    )
    train_batch_size: int = flag(
        16,
        "Images per process per micro-step.",
    )
    dataloader_num_workers: int = flag(
        0,
        "Worker processes that decode images: all of them once before training, or, when they are decoded per batch (--streaming, or more than --image_cache_max_gb), each batch ahead of the step.",
    )
    streaming: bool = flag(
        False,
        "Read the dataset as a stream (datasets IterableDataset) for data larger than memory or disk: each process"
        " reads its own shards, images are decoded and captions encoded per batch. Needs --max_train_steps; an 'epoch'"
        " for --save_images_epochs/--save_model_epochs is then --checkpointing_steps steps.",
    )
    shuffle_buffer_size: int = flag(
        1000,
        "With --streaming: examples held and drawn from at random (more mixes better and costs memory); the"
        " shard order and the draws change every pass.",
    )
    caption_max_length: int | None = flag(
        None,
        "Tokens every caption is padded or truncated to; the grids and the saved pipeline use the same. Default:"
        " the longest tokenized caption in the dataset (with --streaming: the tokenizer's maximum). Raise it (e.g. 77"
        " for CLIP) to sample with prompts longer than the training captions.",
    )
    caption_cache: bool = flag(
        True,
        "Encode each caption once with the frozen text encoder and free it; --no_caption_cache runs the encoder in"
        " every step instead (for benchmarks).",
    )
    data_on_device: str = flag(
        "auto",
        "Keep the decoded images and the caption embeddings on the GPU and draw each batch there (no per-image work"
        " or copies on the host; --cuda_graphs then captures the batch with the step). auto: on a GPU when the"
        " images are decoded once, all one size at --resolution (square images, or --center_crop), the captions cached, and both"
        " take at most a quarter of the GPU's free memory. The draws then come from the GPU's generator, so the"
        " batches differ from the host path's (a resumed run keeps the path it started with).",
        choices=["auto", "yes", "no"],
    )
    image_cache_max_gb: float = flag(
        4.0,
        "Decode all images once into memory when they fit in this many GiB at the training resolution; 0 decodes every epoch.",
    )
    augment_prob: float = flag(
        0.0,
        "Share of training images geometrically augmented without leaking into samples (EDM, Karras et al. 2022):"
        " an augmented image gets each of x-flip, a quarter turn, a small rotation (up to 15 degrees), an isotropic"
        " scale (log2 ~ N(0, 0.2)) and a whole-pixel shift (up to 1/8 of the side) with probability 1/2, and the"
        " transform's parameters reach the UNet through its class embedding (zeros for an untouched image; samples"
        " always get zeros, so they look un-augmented). 0.2-0.5 for a few hundred images.",
    )
    flip_sided_captions: str = flag(
        "swap",
        "A mirrored image (--random_flip, or the x-flip of --augment_prob) whose caption says left or right:"
        " swap the words in its caption, or do not mirror it.",
        choices=["swap", "no_flip"],
    )
    caption_shuffle_separator: str | None = flag(
        None,
        'Split captions into tags at this separator (e.g. ",") and shuffle the tags after'
        " --caption_keep_tokens: --caption_variants orders per caption, one picked each time it is shown.",
    )
    caption_keep_tokens: int = flag(
        0,
        "Tags at the start of a caption that stay in place and are never dropped (e.g. 1 for 'a sprite of X').",
    )
    caption_tag_dropout: float = flag(
        0.0,
        "Drop each tag (after --caption_keep_tokens; split at --caption_shuffle_separator, else at ',') with this"
        " probability; one tag always stays.",
    )
    caption_variants: int = flag(
        8,
        "With shuffling or tag dropout: variants of each caption, fixed by its text, one picked at random each"
        " time it is shown; a frozen encoder's cache holds all of them (K x the captions' memory).",
    )
    resize_filter: str = flag(
        "bicubic",
        "How images are resized to --resolution: nearest keeps pixel art's hard edges (at whole-number scales).",
        choices=list(RESIZE_FILTERS),
    )
    alpha_background: str = flag(
        "white",
        "What transparent pixels of RGBA images become: a fixed colour, or random = a random flat colour per"
        " image each time it is shown, so the model does not learn one background (evaluation uses white).",
        choices=["white", "black", "gray", "random"],
    )

    def __post_init__(self):
        if not exists(self.dataset_name) and not exists(self.train_data_dir):
            raise UserError("no data: pass --train_data_dir FOLDER (imagefolder) or --dataset_name NAME_OR_PATH")
        if exists(self.train_data_dir) and not names_a_folder_or_shards(self.train_data_dir):
            raise UserError(f"--train_data_dir {self.train_data_dir} is not a folder, a .tar shard or a glob of them")
        require_at_least(1, resolution=self.resolution, train_batch_size=self.train_batch_size)
        require_at_least(0, dataloader_num_workers=self.dataloader_num_workers)
        if self.streaming:
            require_at_least(1, shuffle_buffer_size=self.shuffle_buffer_size)
        if exists(self.caption_max_length) and self.caption_max_length < 2:
            raise UserError(
                f"--caption_max_length must be at least 2 (the start and end tokens), got {self.caption_max_length}"
            )
        require_share("augment_prob", self.augment_prob, upper_inclusive=True)
        require_share("caption_tag_dropout", self.caption_tag_dropout)
        require_at_least(0, caption_keep_tokens=self.caption_keep_tokens)
        require_at_least(1, caption_variants=self.caption_variants)
        if "{}" not in self.caption_template:
            raise UserError(
                f'--caption_template {self.caption_template!r} has no {{}} for the folder name; e.g. "a pixel-art {{}}"'
            )
        if self.caption_shuffle_separator == "":
            raise UserError('--caption_shuffle_separator is empty; pass the text between tags, e.g. ","')

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

    @functools.cached_property
    def tag_variants(self) -> CaptionVariants | None:
        """How captions' tags are shuffled and dropped; None when they are shown as written."""
        if not exists(self.caption_shuffle_separator) and self.caption_tag_dropout == 0:
            return None
        return CaptionVariants(
            separator=self.caption_shuffle_separator or ",",
            shuffle=exists(self.caption_shuffle_separator),
            keep_tokens=self.caption_keep_tokens,
            tag_dropout=self.caption_tag_dropout,
            count=self.caption_variants,
        )


@dataclass(frozen=True, kw_only=True)
class CaptionVariants:
    """--caption_shuffle_separator / --caption_tag_dropout: how a caption's tags are reordered and dropped."""

    separator: str
    shuffle: bool
    keep_tokens: int
    tag_dropout: float
    count: int


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


@dataclass(frozen=True, kw_only=True)
class ModelConfig(FlagGroup):
    """The text encoder, the UNet and how they run."""

    _argument_group_name = "model"

    text_encoder_name_or_path: str = flag(
        DEFAULT_TEXT_ENCODER,
        "Hub id or local folder of a transformers text encoder (CLIP, T5, BERT-like) with its tokenizer; a diffusers folder with text_encoder/ and tokenizer/ works too.",
    )
    train_text_encoder: bool = flag(
        False,
        "Fine-tune the text encoder with the UNet (otherwise it is frozen and captions are encoded once).",
    )
    model_config_name_or_path: str | None = flag(
        None,
        "UNet2DConditionModel config.json (or a folder with one); wins over --model_size. Default: the --model_size UNet, log2(resolution)-1 levels (2 to 6), cross-attention at 16 px and below.",
    )
    model_size: str = flag(
        DEFAULT_MODEL_SIZE,
        "Size of the default UNet (README 'Model sizes' lists parameters and speed): tiny 32-256 channels and small 64-256 with 1 layer per level, base 128-512 and large 192-768 with 2.",
        choices=list(MODEL_SIZES),
    )
    pooled_text: bool = flag(
        True,
        "Also add the caption, pooled by attention, to the UNet's timestep embedding (diffusers' addition_embed_type"
        " 'text', as Imagen and SDXL do): every ResNet block then sees which caption it draws, not only the"
        " cross-attention layers. For the --model_size UNet and a --model_config_name_or_path config alike, except one"
        " that has an addition_embed_type of its own (kept). On by default since 2026-12-07 (with --min_snr_variant"
        " snr_plus_one a frozen encoder's UNet follows one-name-per-image captions 2-4x as often as without,"
        " docs/results/real-images.md); --no-pooled_text for the UNet without it.",
    )
    gradient_checkpointing: bool = flag(
        False,
        "Trade compute for memory in the UNet.",
    )
    enable_xformers_memory_efficient_attention: bool = flag(
        False,
        "Use xformers attention (GPU, pip install xformers). PyTorch SDPA is used otherwise.",
    )
    allow_tf32: bool = flag(
        False,
        "Allow TF32 matmuls on Ampere+ GPUs.",
    )
    torch_compile: bool = flag(
        False,
        "Compile the UNet with torch.compile.",
    )
    cuda_graphs: bool = flag(
        False,
        "Run each optimizer step (forward and backward of its micro-batches, clipping, AdamW, EMA) as one captured"
        " CUDA graph, replayed every step: for small UNets, whose steps otherwise wait on Python and kernel"
        " launches. Captured after 3 eager steps; where it cannot run (no CUDA, DeepSpeed, more than one process,"
        " fp16, xformers, --train_text_encoder, --ema_offload, --gradient_checkpointing) the run says why in one"
        " line and trains eagerly.",
    )
    channels_last: bool = flag(
        False,
        "Use channels-last memory format for the UNet (faster convolutions on many GPUs).",
    )

    def __post_init__(self):
        if self.enable_xformers_memory_efficient_attention:
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise UserError(
                    "--enable_xformers_memory_efficient_attention: xformers is not installed; pip install xformers (GPU only) or drop the flag (PyTorch SDPA attention is used)"
                )
        if self.torch_compile and torch.cuda.is_available() and torch.cuda.get_device_capability() < (7, 0):
            major, minor = torch.cuda.get_device_capability()
            raise UserError(
                f"--torch_compile needs a GPU of compute capability 7.0 or newer (Triton); {torch.cuda.get_device_name()} is {major}.{minor}: drop --torch_compile"
            )
        if exists(self.model_config_name_or_path) and not Path(self.model_config_name_or_path).exists():
            raise UserError(
                f"--model_config_name_or_path {self.model_config_name_or_path} does not exist; pass a UNet config.json or a folder with one"
            )


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig(FlagGroup):
    """The noise schedule, what the UNet predicts and how its loss is weighted."""

    _argument_group_name = "diffusion"

    ddpm_num_steps: int = flag(
        1000,
        "Number of diffusion timesteps in training.",
    )
    ddpm_beta_schedule: str = flag(
        "squaredcos_cap_v2",
        "Noise schedule (cosine by default: with v-prediction it follows prompts sooner, docs/results/adherence.md; the original script's was linear).",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
    )
    prediction_type: str = flag(
        "v_prediction",
        "What the UNet predicts. v_prediction (the default since it made a frozen-encoder model follow prompts in ~40%% fewer images than epsilon, examples/adherence_curve.py) or the original script's epsilon/sample;"
        " or flow_matching: rectified flow, x_t = (1 - t) x0 + t noise with t in [0, 1], the UNet predicting the velocity noise - x0 from t * --ddpm_num_steps as its timestep,"
        " plain MSE (--snr_gamma and the betas unused), sampled with FlowMatchEulerDiscreteScheduler.",
        choices=["epsilon", "sample", "v_prediction", "flow_matching"],
    )
    snr_gamma: float = flag(
        5.0,
        "Min-SNR-gamma loss weighting (arXiv:2303.09556); 0 turns it off. Ignored with --prediction_type flow_matching (plain MSE on the velocity).",
    )
    min_snr_variant: str = flag(
        "snr_plus_one",
        "What --snr_gamma caps: snr, the paper's min(SNR, gamma) weight on the x0 error (with v_prediction the noisiest"
        " steps, where the caption decides what is drawn, weigh ~0), or snr_plus_one, min(SNR + 1, gamma): with"
        " v_prediction the noisy steps keep plain v-MSE's weight 1 and only the cleaner steps (SNR > gamma - 1) are"
        " capped (the default since 2026-12-07; snr before). v_prediction only: epsilon's min-SNR already keeps its noisy"
        " steps at 1, and sample weighs as snr.",
        choices=["snr", "snr_plus_one"],
    )
    timestep_sampling: str = flag(
        "uniform",
        "With --prediction_type flow_matching: how t is drawn, uniform in [0, 1] or logit_normal (t = sigmoid(N(--logit_mean, --logit_std)), SD3's: more of the middle noise levels).",
        choices=["uniform", "logit_normal"],
    )
    logit_mean: float = flag(
        0.0,
        "--timestep_sampling logit_normal: the mean of logit(t); above 0 draws noisier t.",
    )
    logit_std: float = flag(
        1.0,
        "--timestep_sampling logit_normal: the standard deviation of logit(t).",
    )
    timestep_shift: float = flag(
        1.0,
        "With --prediction_type flow_matching: shift each drawn t to shift t / (1 + (shift - 1) t), and the sampler's schedule alike"
        " (SD3 uses 3 at 1024 px; above 1 spends more of training and sampling at high noise); 1 leaves t as drawn.",
    )
    noise_offset: float = flag(
        0.0,
        "Add this much per-channel offset noise (helps very dark/bright images).",
    )
    rescale_betas_zero_snr: bool = flag(
        False,
        "Rescale betas to zero terminal SNR (use with v_prediction).",
    )
    conditioning_dropout_prob: float = flag(
        0.1,
        "Share of training captions replaced by the empty caption, for classifier-free guidance.",
    )
    input_perturbation: float = flag(
        0.0,
        "DDPM-IP (Ning et al. 2023): the UNet's noisy input gets this much extra noise that the target does not"
        " (0.1 in the paper); counters the gap between training and sampling inputs.",
    )

    def __post_init__(self):
        require_at_least(1, ddpm_num_steps=self.ddpm_num_steps)
        if self.input_perturbation < 0:
            raise UserError(f"--input_perturbation must be at least 0, got {self.input_perturbation}")
        require_share("conditioning_dropout_prob", self.conditioning_dropout_prob)
        for name in ("logit_std", "timestep_shift"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be above 0, got {getattr(self, name)}")
        self.check_flow_matching_flags()

    def check_flow_matching_flags(self) -> None:
        """t's sampling and shift are flow matching's; zero-terminal-SNR betas are DDPM's."""
        flow = self.prediction_type == "flow_matching"
        if not flow and (self.timestep_sampling != "uniform" or self.timestep_shift != 1.0):
            raise UserError(
                "--timestep_sampling and --timestep_shift apply to --prediction_type flow_matching only; pass it or drop them"
            )
        if flow and self.rescale_betas_zero_snr:
            raise UserError(
                "--rescale_betas_zero_snr rescales DDPM betas; flow matching has none (t = 1 is pure noise already): drop it"
            )


@dataclass(frozen=True, kw_only=True)
class OptimConfig(FlagGroup):
    """How long, how fast and in what precision the weights are trained, and their EMA."""

    _argument_group_name = "optimisation"

    num_epochs: int = flag(
        100,
        "Passes over the data (ignored when --max_train_steps is set).",
    )
    max_train_steps: int | None = flag(
        None,
        "Optimizer steps to train; overrides --num_epochs.",
    )
    max_train_time: str | None = flag(
        None,
        "Stop after this long, e.g. 8h30m, 90m, 3600s (Kaggle/Colab limits): checkpoint, a last grid and the pipeline (EMA weights) are written within it; training stops early by their time, as last measured (estimated from the step time and model size before they first ran)."
        " Without --max_train_steps it also plans the run's length: the step time is measured over the first steps (2-21, or 30 s) and the run trains the steps the time left allows (at most --num_epochs' count), so that a warmup_stable_decay schedule's decay ends at the limit; the plan is saved in each checkpoint. The limit is this session's: a resumed run plans anew from it while the decay has not begun, and finishes the saved plan's decay once it has. For --lr_scheduler constant/constant_with_warmup it sets only where the run ends; linear, cosine, cosine_with_restarts and polynomial stay planned over --num_epochs.",
    )
    gradient_accumulation_steps: int = flag(
        1,
        "Micro-steps per optimizer step.",
    )
    learning_rate: float | None = flag(
        None,
        "Peak learning rate. Default: chosen for the UNet and the batch (README 'Model sizes'): the --model_size"
        " preset's rate, or for a --model_config_name_or_path UNet the presets' rates log-interpolated by parameter"
        f" count, times sqrt(images per optimizer step / {LEARNING_RATE_REFERENCE_BATCH}); the run plan says which.",
    )
    text_encoder_learning_rate: float | None = flag(
        None,
        "Peak learning rate of the text encoder with --train_text_encoder. Default: --learning_rate when that is"
        f" given, else {TEXT_ENCODER_RATE_SHARE:g} x the chosen UNet rate (the encoder learning with a small UNet is"
        " steadier below its rate, docs/results/adherence.md).",
    )
    lr_scheduler: str = flag(
        "constant_with_warmup",
        "Learning-rate schedule after warm-up (constant by default: a decay to zero over a short --max_train_steps starves the late phase in which prompts are learned). warmup_stable_decay: warm-up, constant, then a linear decay to 0 over the last --lr_decay_share of the steps (--max_train_steps, --num_epochs' count, or the steps planned from --max_train_time).",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", *SCHEDULES_PLANNED_BY_TIME],
    )
    lr_decay_share: float = flag(
        0.2,
        "--lr_scheduler warmup_stable_decay: the last share of the run's steps over which the rate decays linearly to 0.",
    )
    lr_warmup_steps: int = flag(
        100,
        "Warm-up in optimizer steps (100: what every measured run of the default rates used; the earlier 500"
        " did as well in the one run that compared them, docs/results/learning-rates.md).",
    )
    adam_beta1: float = flag(
        0.95,
        "AdamW beta1 (the original script's 0.95).",
    )
    adam_beta2: float = flag(
        0.999,
        "AdamW beta2.",
    )
    adam_weight_decay: float = flag(
        1e-6,
        "AdamW weight decay.",
    )
    adam_epsilon: float = flag(
        1e-8,
        "AdamW epsilon.",
    )
    max_grad_norm: float = flag(
        1.0,
        "Clip gradients to this norm; 0 turns clipping off.",
    )
    use_ema: bool = flag(
        True,
        "Keep an exponential moving average of the UNet; samples and the saved pipeline use it (--no_use_ema:"
        " the trained weights, one UNet copy less in memory).",
    )
    ema_inv_gamma: float = flag(
        20.0,
        "EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power, up to --ema_max_decay. The defaults (20, 1)"
        " average about the last 5%% of the steps at any point of a run, so a short run's EMA is not behind it. It"
        " depends on the step alone, not on the run's length, so a length planned from --max_train_time leaves it as is.",
    )
    ema_power: float = flag(
        1.0,
        "EMA warm-up power (see --ema_inv_gamma).",
    )
    ema_max_decay: float = flag(
        0.9999,
        "EMA decay ceiling.",
    )
    ema_offload: bool = flag(
        False,
        "Keep the EMA weights in CPU memory (saves GPU memory, costs a copy per step).",
    )
    mixed_precision: str | None = flag(
        None,
        "Mixed precision (default: what `accelerate config` says, else no). fp16 needs a CUDA GPU.",
        choices=["no", "fp16", "bf16"],
    )
    seed: int | None = flag(
        None,
        "Random seed (a resumed run keeps the first run's seed).",
    )

    def __post_init__(self):
        require_at_least(1, gradient_accumulation_steps=self.gradient_accumulation_steps)
        if exists(self.max_train_steps):
            require_at_least(1, max_train_steps=self.max_train_steps)
        for name in ("learning_rate", "text_encoder_learning_rate"):
            if exists(getattr(self, name)) and not getattr(self, name) > 0:
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}")
        if exists(self.max_train_time):
            parse_duration(self.max_train_time)
        if not 0 < self.lr_decay_share <= 1:
            raise UserError(f"--lr_decay_share must be in (0, 1], got {self.lr_decay_share}")
        self.check_precision()

    def check_precision(self) -> None:
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError(
                "--mixed_precision fp16 needs a CUDA GPU and none is visible; use --mixed_precision bf16 or no on CPU"
            )
        if self.mixed_precision == "bf16" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
            logger.warning(
                "--mixed_precision bf16: %s has no native bf16 (compute capability below 8.0, e.g. T4, V100, P100), so it is emulated and slow; use --mixed_precision fp16",
                torch.cuda.get_device_name(),
            )
        if self.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
            logger.warning(
                "--mixed_precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is slower than fp32 here; --mixed_precision no is faster"
            )

    @property
    def max_train_seconds(self) -> float | None:
        return parse_duration(self.max_train_time) if exists(self.max_train_time) else None

    @property
    def adam_betas(self) -> tuple[float, float]:
        return (self.adam_beta1, self.adam_beta2)


@dataclass(frozen=True, kw_only=True)
class OutputConfig(FlagGroup):
    """What the run writes, when, and where: checkpoints, grids, the pipeline, logs, the Hub."""

    _argument_group_name = "outputs: checkpoints, sample grids, logs, the Hub"

    output_dir: Path = flag(
        "text2image-model",
        "Where the pipeline, checkpoints, samples and logs go.",
    )
    overwrite_output_dir: bool = flag(
        False,
        "Start over in an --output_dir that holds an earlier run (its checkpoints and samples are deleted).",
    )
    resume_from_checkpoint: str | None = flag(
        None,
        "A checkpoint folder, or 'latest' (starts fresh when there is none).",
    )
    checkpointing_steps: int = flag(
        500,
        "Save a resumable checkpoint every N optimizer steps.",
    )
    checkpoints_total_limit: int | None = flag(
        None,
        "Keep at most this many checkpoints (oldest deleted after a new one is complete).",
    )
    save_model_epochs: int = flag(
        10,
        "Save the pipeline every N epochs (and at the end); with --streaming, an epoch is --checkpointing_steps steps.",
    )
    save_images_epochs: int = flag(
        10,
        "Sample a grid every N epochs (and at the end); with --streaming, an epoch is --checkpointing_steps steps.",
        aliases=["--save_images_epoch"],
    )
    validation_prompts: list[str] | None = flag(
        None,
        "Prompts for the grids (--validation_prompts 'a cat' 'a dog', or the flag once per prompt), or one text"
        " file with a prompt a line (default: captions drawn from the dataset).",
        action=ExtendList,
    )
    eval_batch_size: int = flag(
        16,
        "Images in each grid.",
    )
    ddpm_num_inference_steps: int = flag(
        25,
        "Sampling steps for the sample grids (DPM-Solver++).",
    )
    guidance_scale: float = flag(
        5.0,
        "Classifier-free guidance scale for the grids and the caption effect (1 turns it off; 3.0 until 2026-12-07).",
    )
    logger: str = flag(
        "tensorboard",
        "Experiment tracker.",
        choices=["tensorboard", "wandb", "none"],
    )
    logging_dir: str = flag(
        "logs",
        "Tracker folder, relative to --output_dir.",
    )
    logging_steps: int = flag(
        10,
        "Log loss, lr, grad norm and speed every N optimizer steps.",
    )
    push_to_hub: bool = flag(
        False,
        "Upload the final pipeline to the Hugging Face Hub.",
    )
    hub_model_id: str | None = flag(
        None,
        "Hub repo id (default: the --output_dir name).",
    )
    hub_token: str | None = flag(
        None,
        "Hub token (default: the logged-in token).",
        secret=True,
    )
    hub_private_repo: bool = flag(
        False,
        "Create the Hub repo as private.",
    )

    def __post_init__(self):
        require_at_least(
            1,
            checkpointing_steps=self.checkpointing_steps,
            save_model_epochs=self.save_model_epochs,
            save_images_epochs=self.save_images_epochs,
            eval_batch_size=self.eval_batch_size,
            ddpm_num_inference_steps=self.ddpm_num_inference_steps,
            logging_steps=self.logging_steps,
        )
        resume = self.resume_from_checkpoint
        if exists(resume) and resume != "latest" and not Path(resume).is_dir():
            raise UserError(
                f"--resume_from_checkpoint {resume} does not exist; pass a checkpoint-STEP folder or 'latest'"
            )
        if self.logger == "wandb" and os.environ.get("WANDB_MODE") == "disabled":
            logger.warning("--logger wandb with WANDB_MODE=disabled logs nothing")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(FlagGroup):
    """What tells the user whether the model learns or copies: held-out loss, nearest neighbours, FD/KID."""

    _argument_group_name = "evaluation: is it learning, has it stopped improving, is it copying?"

    validation_split: float = flag(
        0.02,
        f"Images held out of training for the validation loss: a share (below 1; at most {VALIDATION_MAX_HELD_OUT} images, none when it rounds down to 0) or a count (1 or more). The same rows whatever --seed, so runs compare. 0 turns it off.",
    )
    validation_data_dir: str | None = flag(
        None,
        "An imagefolder of held-out images for the validation loss, instead of --validation_split.",
    )
    validation_steps: int | None = flag(
        None,
        f"Compute the validation loss (EMA weights, fixed noise, {VALIDATION_BUCKETS} fixed timestep buckets) every N optimizer steps (default: with every grid).",
    )
    memorization_check: bool = flag(
        True,
        f"With every grid, find each sample's nearest training image (pixel RMS distance at the training resolution) and write samples/nearest-STEP.png. Copy rate = share of samples nearer to a training image than {100 - COPY_PERCENTILE:.0f}%% of training images are to their own nearest neighbour (leave-one-out): about {COPY_PERCENTILE:.0f}%% for a model that makes new images, towards 100%% for one that copies. Needs the decoded images in memory (--image_cache_max_gb).",
    )
    eval_feature_model: str | None = flag(
        None,
        "A transformers image model (Hub id or local folder, e.g. facebook/dinov2-small) whose features give the Frechet distance (FD) and KID between generated and training images. Default: off.",
    )
    eval_clip_model: str | None = flag(
        None,
        "A transformers CLIP model (e.g. openai/clip-vit-base-patch32) for the prompt alignment score (CLIP score) of generated images. Default: off.",
    )
    eval_num_images: int = flag(
        256,
        "Images generated (fixed seeds, prompts = captions of as many fixed training images) for FD, KID, CLIP score and the copy rate.",
    )
    eval_steps: int | None = flag(
        None,
        "Compute FD/KID/CLIP score every N optimizer steps (default: with every grid, when a model above is given).",
    )
    keep_best: str | None = flag(
        None,
        "Keep the pipeline of the best evaluation so far (lowest value) in OUTPUT_DIR/best, with its metrics in its model card.",
        choices=list(KEEP_BEST),
    )

    def __post_init__(self):
        split = self.validation_split
        if split < 0 or (split >= 1 and split != int(split)):
            raise UserError(f"--validation_split must be a share below 1, a whole count, or 0; got {split}")
        if exists(self.validation_data_dir) and not Path(self.validation_data_dir).is_dir():
            raise UserError(f"--validation_data_dir {self.validation_data_dir} is not a folder")
        for name in ("validation_steps", "eval_steps"):
            if exists(getattr(self, name)):
                require_at_least(1, **{name: getattr(self, name)})
        require_at_least(2, eval_num_images=self.eval_num_images)
        measured = {
            VAL_LOSS: split > 0 or exists(self.validation_data_dir),
            FD: exists(self.eval_feature_model),
            KID: exists(self.eval_feature_model),
        }
        best = KEEP_BEST.get(self.keep_best)
        if exists(best) and not measured[best]:
            raise UserError(f"--keep_best {self.keep_best} needs {best.needs}")

    @property
    def held_out_share(self) -> float:
        """--validation_split, or 0 when --validation_data_dir holds the held-out images instead."""
        return 0.0 if exists(self.validation_data_dir) else self.validation_split

    @property
    def measures_quality(self) -> bool:
        return exists(self.eval_feature_model) or exists(self.eval_clip_model)


@dataclass(frozen=True, kw_only=True)
class LaunchConfig(FlagGroup):
    """Flags for the launcher, not the run."""

    _argument_group_name = "launch"

    local_rank: int = flag(
        -1,
        "Set by old launchers; accelerate reads LOCAL_RANK itself.",
    )


FLAG_GROUPS = (DataConfig, ModelConfig, DiffusionConfig, OptimConfig, OutputConfig, EvalConfig, LaunchConfig)
# argparse.BooleanOptionalAction's spelling, accepted since these flags had it; HfArgumentParser adds --no_NAME
EXTRA_NEGATIONS = {
    "use_ema": "--no-use_ema",
    "memorization_check": "--no-memorization_check",
    "pooled_text": "--no-pooled_text",  # what a refused resume of a run trained without it says to pass
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
        config = cls(
            data=DataConfig.from_args(args),
            model=ModelConfig.from_args(args),
            diffusion=DiffusionConfig.from_args(args),
            optim=OptimConfig.from_args(args),
            output=OutputConfig.from_args(args),
            evaluation=EvalConfig.from_args(args),
            public_flags=public_flags(args),
        )
        config.check_across_groups()
        return config

    def check_across_groups(self) -> None:
        if self.data.streaming and self.evaluation.measures_quality:
            raise UserError(
                "--eval_feature_model/--eval_clip_model compare with training images, which a stream cannot index; drop them or --streaming"
            )
        if exists(self.optim.text_encoder_learning_rate) and not self.model.train_text_encoder:
            logger.warning(
                "--text_encoder_learning_rate is ignored: the text encoder is frozen (no --train_text_encoder)"
            )


def secret_flags() -> set[str]:
    """Flags never written: not to the model card, the trackers or anywhere else."""
    return {item.name for group in FLAG_GROUPS for item in dataclasses.fields(group) if not item.repr}


def public_flags(args: argparse.Namespace) -> dict:
    """The run's flags as anything the run writes may show them: secrets left out, paths as text."""
    secret = secret_flags()
    return {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in sorted(vars(args).items())
        if key not in secret
    }


# ---------------------------------------------------------------------------------------------
# The parser, --config files and docs/flags.md, all from the declarations above


def build_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        FLAG_GROUPS,
        description="Train a text-to-image diffusion model (diffusers UNet2DConditionModel, pixel space).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML or JSON file of flag values (keys are flag names); command-line flags win. A run's own"
        " OUTPUT_DIR/run_config.yaml repeats it: --config OUTPUT_DIR/run_config.yaml --output_dir ANOTHER_DIR.",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="Set the run up (data, captions, models), print its plan and its run_config.yaml, and stop before the"
        " first step: nothing trained, no checkpoint or pipeline written.",
    )
    for name, spelling in EXTRA_NEGATIONS.items():
        parser.add_argument(spelling, dest=name, action="store_false", help=argparse.SUPPRESS)
    return parser


def documented_actions(parser: argparse.ArgumentParser, group) -> list[list[argparse.Action]]:
    """A group's flags for the docs: a flag with its --no_ complement, hidden spellings left out."""
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in group._group_actions:
        if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS:
            by_dest.setdefault(action.dest, []).append(action)
    return list(by_dest.values())


def flags_markdown(parser: argparse.ArgumentParser) -> str:
    """docs/flags.md: every flag of `parser`, by group, with its default and help (regenerated, never edited)."""
    lines = [
        "# Flags of train_text_to_image.py",
        "",
        "Generated from the flag declarations (text_to_image/config.py) by `python -m text_to_image.config > docs/flags.md`;",
        "a test fails when it is stale. A `--config` YAML or JSON file takes the same names as keys; command-line flags win.",
        "Each flag also answers to its dashed spelling (`--train-batch-size`); a yes/no flag takes `--NAME`, `--NAME false`",
        "or `--no_NAME`.",
    ]
    for group in parser._action_groups:
        flags = documented_actions(parser, group)
        if not flags:
            continue
        lines += ["", f"## {group.title}", ""]
        lines += ["| flag | default | what it does |", "|---|---|---|"]
        lines += [flag_row(actions) for actions in flags]
    return "\n".join(lines) + "\n"


def flag_row(actions: list[argparse.Action]) -> str:
    main = actions[0]
    names = [name for action in actions for name in action.option_strings if "-" not in name[2:]]
    if isinstance(main.default, bool):
        default = "on" if main.default else "off"
    else:
        default = "" if main.default is None else f"`{main.default}`"
    text = (main.help or "").replace("%%", "%")  # argparse formats help with %
    if main.choices:
        text += " One of: " + ", ".join(f"`{choice}`" for choice in main.choices) + "."
    cell = text.replace("|", "\\|")  # a bar inside a help text would end the table cell
    return f"| {' '.join(f'`{name}`' for name in names)} | {default} | {cell} |"


def read_config_file(path: Path, parser: argparse.ArgumentParser) -> dict:
    """Flag values from a YAML/JSON file, checked against the parser's flags and converted as each flag converts
    its command-line text."""
    values = load_config_file(path)
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    values = {key.lstrip("-").replace("-", "_"): value for key, value in values.items()}
    if unknown := sorted(set(values) - known):
        raise UserError(f"--config {path}: unknown flags {unknown}; see --help for the flag names")
    flags = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
    return {key: config_value(path, key, value, flags[key]) if key in flags else value for key, value in values.items()}


def load_config_file(path: Path):
    """The file's values: JSON's as typed; YAML's scalars as the text written (no YAML 1.1 guessing: `no` stays
    "no" for --mixed_precision, `8:30` stays "8:30" rather than 510), its nulls as None."""
    if not path.is_file():
        raise UserError(f"--config {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a Windows editor's byte-order mark is not part of the text
    except UnicodeDecodeError as error:
        raise UserError(
            f"--config {path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(
                f"--config {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); correct"
                " it there"
            ) from None
    import yaml

    try:
        values = yaml.load(text, Loader=yaml.BaseLoader) or {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        raise UserError(
            f"--config {path} is not valid YAML (line {mark.line + 1}, column {mark.column + 1}: {error.problem});"
            " correct it there"
        ) from None
    if not isinstance(values, dict):
        return values
    return {key: None if value in YAML_NULLS else value for key, value in values.items()}


def config_value(path: Path, key: str, value, action: argparse.Action):
    """A --config value as its flag takes it: the text it is (YAML) or stands for (JSON), converted as the
    command line converts it; a single text for a list flag (--validation_prompts) is a list of one."""
    try:
        if action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            return None if value is None else [flag_text_value(item, action) for item in items]
        return flag_text_value(value, action)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        shown = "empty" if value is None else json.dumps(value)
        raise UserError(f"--config {path}: {key} is {shown}, but --{key} takes {what_flag_takes(action)}") from None


def flag_text_value(value, action: argparse.Action):
    """One value converted as argparse converts the text of `action`'s flag (raises ValueError/TypeError)."""
    if value is None:
        if action.default is None:
            return None
        raise ValueError("empty")
    text = as_flag_text(value, action)
    if is_yes_no_flag(action):
        return action.type(YAML_ON_OFF.get(text.lower(), text))
    if action.choices:
        if text not in action.choices:
            raise ValueError(text)
        return text
    if action.type is int:
        return whole_number(text)
    return action.type(text) if exists(action.type) else text


def whole_number(text: str) -> int:
    """ "1e4" and "32.0" are whole numbers too, as YAML writers mean them (argparse's int takes neither)."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


def as_flag_text(value, action: argparse.Action) -> str:
    """A JSON value as the text it stands for: a number as written; true/false for a yes/no flag, and yes/no
    where that is a choice (false: --mixed_precision no). Refused: true/false for other flags, lists, mappings."""
    if isinstance(value, bool):
        if is_yes_no_flag(action):
            return str(value).lower()
        if action.choices and ("yes" if value else "no") in action.choices:
            return "yes" if value else "no"
        raise ValueError(value)
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def is_yes_no_flag(action: argparse.Action) -> bool:
    from transformers.hf_argparser import string_to_bool

    return action.type is string_to_bool


def what_flag_takes(action: argparse.Action) -> str:
    if action.nargs in ("+", "*"):
        return "a text or a list of texts"
    if is_yes_no_flag(action):
        return "true or false"
    if action.choices:
        return "one of " + ", ".join(map(str, action.choices))
    return {int: "a whole number", float: "a number"}.get(action.type, "a text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    config_path = parser.parse_known_args(argv)[0].config
    if exists(config_path):
        parser.set_defaults(**read_config_file(config_path, parser))
    return parser.parse_args(argv)


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


if __name__ == "__main__":
    print(flags_markdown(build_parser()), end="")
