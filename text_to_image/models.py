"""The text encoder (and the caption-embedding cache that lets a frozen one be freed), the UNet and the noise scheduler."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline_text_to_image import FLOW_MATCHING, encode_text
from text_to_image.batches import AUGMENT_LABELS
from text_to_image.common import UserError, exists, is_main_process, to_device
from text_to_image.config import DEFAULT_MODEL_SIZE, MODEL_SIZES, DiffusionConfig

logger = logging.getLogger(__name__)

ATTENTION_MAX_RESOLUTION = 16  # cross-attention only where the feature map is at most this wide
MIN_USEFUL_LEVEL_SIZE = 4  # px: below it a UNet level sees (almost) one pixel


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


def caption_tokens(tokenizer, captions: list[str]) -> list[list[int]]:
    """Each caption's tokens, not cut and without the start/end tokens: one tokenization serves the padding
    length and what the limit cuts (verbose=False: a caption past the limit is counted, not warned about)."""
    return tokenizer(captions, add_special_tokens=False, verbose=False)["input_ids"]


def caption_max_length(tokenizer, tokens: list[list[int]] | None, requested: int | None) -> int:
    """--caption_max_length if given (checked against the tokenizer), else the longest caption's length (with
    start/end tokens) up to the tokenizer's maximum. `tokens`: caption_tokens of the captions, None for a stream."""
    limit = token_limit(tokenizer)
    if exists(requested) and requested > limit:
        raise UserError(f"--caption_max_length {requested} is more than the tokenizer's maximum; use at most {limit}")
    if exists(requested):
        return requested
    if not exists(tokens):  # a stream: its captions are not known ahead
        return limit
    return min(limit, max(map(len, tokens)) + tokenizer.num_special_tokens_to_add())


@dataclass(frozen=True, kw_only=True)
class CaptionCut:
    """What padding to `limit` tokens does to the distinct captions: `cut` of the `captions` lose tokens, and
    `merged` of those become token-for-token identical to another caption (the words that told them apart are
    gone). `longest` is the longest caption's length; `requested` says the limit is --caption_max_length."""

    cut: int
    merged: int
    limit: int
    captions: int
    longest: int
    requested: bool

    def describe(self) -> str:
        """For the run plan: nothing when no caption is cut."""
        if not self.cut:
            return ""
        return (
            f", which cuts {self.cut} of {self.captions} distinct captions"
            f" ({self.merged} become token-for-token identical to another caption)"
        )

    def warning(self) -> str:
        """One line: what the limit cuts, and what to do about it."""
        if self.requested:
            limit = f"--caption_max_length {self.limit}"
            fix = f"raise --caption_max_length ({self.longest} fits every caption)"
        else:
            limit = f"the tokenizer's {self.limit}-token limit"
            fix = (
                "for a caption-vocabulary encoder, rebuild it with examples/make_text_encoder.py and a larger"
                f" --max_length (at least {self.longest}, or none: it then fits the longest caption); else shorten"
                " the captions"
            )
        return (
            f"{limit} cuts {self.cut} of {self.captions} distinct captions, and {self.merged} of them become"
            f" token-for-token identical to another caption once cut (the longest has {self.longest} tokens): {fix}"
        )


def caption_cut(tokenizer, tokens: list[list[int]], limit: int, *, requested: bool) -> CaptionCut:
    """How many captions (caption_tokens of distinct captions) padding to `limit` tokens cuts, and how many of
    those it makes identical to another caption: cut as the tokenizer cuts (its start/end tokens kept, its side)."""
    special = tokenizer.num_special_tokens_to_add()
    keep = max(limit - special, 0)

    def kept(ids: list[int]) -> tuple[int, ...]:
        return tuple(ids[max(len(ids) - keep, 0) :] if tokenizer.truncation_side == "left" else ids[:keep])

    whole_by_kept: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    for ids in tokens:
        whole_by_kept.setdefault(kept(ids), set()).add(tuple(ids))
    cut = [ids for ids in tokens if len(ids) > keep]
    return CaptionCut(
        cut=len(cut),
        merged=sum(len(whole_by_kept[kept(ids)]) > 1 for ids in cut),
        limit=limit,
        captions=len(tokens),
        longest=max(map(len, tokens), default=0) + special,
        requested=requested,
    )


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
        # [captions, tokens, hidden], in CPU memory, or with --data_on_device on the device (setup.py)
        self.table, self.device = table, torch.device(device)

    def embed(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        """The texts' rows, gathered where the table is and on the device without waiting for it; `texts` may
        be the rows themselves, a tensor on the table's device (--data_on_device chooses captions as rows)."""
        if isinstance(texts, torch.Tensor):
            return self.table[texts]
        return to_device(self.table[[self.row_of[text] for text in texts]], self.device)


class LiveEncoder:
    """Captions through the encoder every batch: when it trains, or when the captions are not cached
    (a stream, --no_caption_cache). A frozen encoder runs without autograd, once per distinct caption."""

    def __init__(self, *, tokenizer, encoder, max_length: int, trains: bool, device):
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder, max_length
        self.trains, self.device = trains, device

    def embed(self, texts: list[str]) -> torch.Tensor:
        if self.trains:
            return encode_text(self.tokenizer, self.encoder, texts, self.max_length, self.device)
        # No cache across batches: on data big enough to stream, captions rarely repeat, and an embedding
        # would then depend on the batch that first encoded it, so a resumed run could differ in the last bits.
        distinct = list(dict.fromkeys(texts))
        with torch.no_grad():
            embeddings = encode_text(self.tokenizer, self.encoder, distinct, self.max_length, self.device)
        return embeddings[torch.tensor([distinct.index(text) for text in texts], device=embeddings.device)]


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
        return json.loads(file.read_text("utf-8-sig"))
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
    pooled_text: bool = False,
):
    """UNet2DConditionModel for pixel space; sample_size and cross_attention_dim follow the data and encoder."""
    from diffusers import UNet2DConditionModel

    config = load_unet_config(config_path, resolution, model_size)
    if augmentation:
        condition_on_augmentation(config)
    if pooled_text and config.get("addition_embed_type") is None:
        config["addition_embed_type"] = "text"
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
        unet = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError) as error:
        raise UserError(f"--model_config_name_or_path: the UNet config is not valid: {error}") from error
    zero_the_pooled_key_bias_gradient(unet)
    return unet


def zero_the_pooled_key_bias_gradient(unet) -> None:
    """The pooled caption's attention pooling (diffusers' AttentionPooling) adds its key bias to every key alike,
    which the softmax ignores: its gradient is 0 in exact arithmetic and rounding noise in practice, which AdamW
    scales up to a full learning-rate step, different with each process count and memory layout. Made exactly 0,
    the bias moves by weight decay alone, the same everywhere (the model's output never depended on it)."""
    pooling = getattr(getattr(unet, "add_embedding", None), "pool", None)
    if pooling is not None and pooling.k_proj.bias is not None:
        pooling.k_proj.bias.register_hook(torch.zeros_like)


def build_noise_scheduler(diffusion: DiffusionConfig):
    """The training scheduler, saved (as the sampler's config) with the pipeline: DDPM's betas and prediction type,
    or for flow matching FlowMatchEulerDiscreteScheduler with --timestep_shift, which then samples the same t'."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if diffusion.prediction_type == FLOW_MATCHING:
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=diffusion.ddpm_num_steps, shift=diffusion.timestep_shift
        )
    return DDPMScheduler(
        num_train_timesteps=diffusion.ddpm_num_steps,
        beta_schedule=diffusion.ddpm_beta_schedule,
        prediction_type=diffusion.prediction_type,
        rescale_betas_zero_snr=diffusion.rescale_betas_zero_snr,
        clip_sample=False,
    )
