"""Building a run from its configuration: accelerator, data, models, optimizer, resume state, checks and the run plan."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline_text_to_image import encode_text
from text_to_image.batches import HostBatches, MicroBatches, training_texts
from text_to_image.captured import (
    EAGER_STEPS_BEFORE_CAPTURE,
    CapturedStep,
    device_step_for,
    why_not_captured,
)
from text_to_image.checkpoints import TrainState, read_train_state, resolve_resume_checkpoint
from text_to_image.common import UserError, exists, is_main_process, unwrap
from text_to_image.config import (
    SCHEDULES_PLANNED_BY_TIME,
    VALIDATION_MAX_HELD_OUT,
    WARMUP_STABLE_DECAY,
    DataConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RunConfig,
)
from text_to_image.data import (
    NEAREST_SCALE_PROBES,
    STREAM_CAPTION_SAMPLE,
    BatchSource,
    ImageTable,
    IndexedBatches,
    Shard,
    open_stream,
    read_image_table,
    warn_fractional_nearest,
)
from text_to_image.evaluation import VALIDATION_SPLIT_SEED, Checks, SampleQuality, TrainingReference, ValidationSet
from text_to_image.loss import DiffusionObjective, objective_for
from text_to_image.models import (
    CachedEmbeddings,
    CaptionCut,
    LiveEncoder,
    build_noise_scheduler,
    build_text_encoder,
    build_unet,
    caption_cache_path,
    caption_cut,
    caption_max_length,
    caption_tokens,
    encode_captions_once,
    freeze_what_last_hidden_state_skips,
    text_hidden_size,
)
from text_to_image.optimization import (
    LearningRates,
    WarmupStableDecay,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    choose_learning_rates,
    count_parameters,
    describe_rates,
    rates_used,
    trained_parameters,
)
from text_to_image.outputs import GridConfig, Outputs, choose_validation_prompts
from text_to_image.resident import ResidentBatches, choose_on_device, resident_batches, why_not_on_device
from text_to_image.run_config import (
    Choice,
    caption_length_choice,
    learning_rate_choices,
    on_device_choice,
    precision_choice,
    seed_choice,
)
from text_to_image.training import (
    PLAN_SKIPPED_STEPS,
    PLAN_TIMED_SECONDS,
    Intervals,
    LengthPlan,
    Run,
    Schedule,
    TimePlanner,
    Trainer,
    describe_length,
    starting_length,
)

logger = logging.getLogger(__name__)


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
            train_micro_batch_size_per_gpu=config.data.train_batch_size,
            gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
            gradient_clipping=config.optim.max_grad_norm,
        )


def configure_unet(unet, model: ModelConfig) -> None:
    if model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if model.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if model.channels_last:
        unet.to(memory_format=torch.channels_last)
    if model.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------
# The data: an indexed dataset or a stream, its micro-batches, its captions' embeddings, its schedule


@dataclass(frozen=True, kw_only=True)
class TrainingData:
    """What the loop draws batches from, and what the captions need."""

    source: BatchSource
    batches: MicroBatches  # the source's micro-batches, drawn on the host, or on the device (--data_on_device)
    embeddings: CachedEmbeddings | None  # every caption's embedding, cached; None: encoded per batch (LiveEncoder)
    captions: list[str]  # the dataset's distinct captions (a sample of them when streaming), "" first
    text_max_length: int
    schedule: Schedule
    validation: ValidationSet | None  # held-out images, out of the batches
    caption_cut: CaptionCut | None = None  # what padding to text_max_length cuts; None for a stream (not known)
    unreadable_rows: list[int] | None = None  # the rows that do not decode; None for a stream (met per batch)
    on_device_choice: Choice | None = None  # what --data_on_device auto chose and why (run_config.yaml)


def prepare_indexed_data(config: RunConfig, accelerator, saved: TrainState, tokenizer, text_encoder) -> TrainingData:
    """A dataset read into a table (every row checked, or decoded, once), some rows held out for the validation
    loss, every caption's embedding cached unless the encoder trains or --no_caption_cache, and the
    micro-batches drawn on the host or on the device."""
    data, device = config.data, accelerator.device
    known = saved.unreadable_rows if saved.step > 0 else None
    table = read_image_table(data, known, accelerator.is_local_main_process)
    captions, unreadable = table.captions, table.unreadable_rows
    table, validation = hold_out(table, config.evaluation.held_out_share, data.resolution)
    # every text a caption is shown as (variants, sides swapped): the cache holds them all, and a variant
    # can tokenize longer than its caption (tags rejoined), so captions are padded to the longest
    shown = list(dict.fromkeys(captions + training_texts(captions, data)))
    text_max_length, cut = fit_captions(tokenizer, shown, data.caption_max_length)
    schedule = plan_schedule(
        len(table.usable_rows),
        batch_size=data.train_batch_size,
        num_processes=accelerator.num_processes,
        accumulation=config.optim.gradient_accumulation_steps,
        max_steps=config.optim.max_train_steps,
        num_epochs=config.optim.num_epochs,
    )
    source = IndexedBatches(
        table,
        seed=saved.seed,
        shard=process_shard(accelerator, data),
        batches_per_epoch=schedule.batches_per_epoch,
        num_workers=data.dataloader_num_workers,
    )
    validation = validation_set(config, accelerator, validation)
    texts = list(dict.fromkeys(shown + (validation.captions if exists(validation) else [])))
    embeddings = None
    if data.caption_cache and not config.model.train_text_encoder:
        embeddings = encode_captions(config, accelerator, tokenizer, text_encoder, texts, text_max_length)
    why_not = why_not_on_device(table, embeddings, data.resolution, device)
    on_device, on_device_choice = agreed_on_device(config.data.data_on_device, saved, why_not, accelerator)
    cached = None
    if exists(embeddings):  # --data_on_device: batches choose captions as rows of the table, on the device
        cached = CachedEmbeddings(texts, embeddings.to(device) if on_device else embeddings, device)
    if on_device:
        dropout_prob, channels_last = config.diffusion.conditioning_dropout_prob, config.model.channels_last
        batches = resident_batches(table, cached, source, data, dropout_prob, channels_last)
    else:
        batches = host_batches(config, source, source.shard, device)
    return TrainingData(
        source=source,
        batches=batches,
        embeddings=cached,
        captions=captions,
        text_max_length=text_max_length,
        schedule=schedule,
        validation=validation,
        caption_cut=cut,
        unreadable_rows=unreadable,
        on_device_choice=on_device_choice,
    )


def prepare_streamed_data(config: RunConfig, accelerator, saved: TrainState, tokenizer) -> TrainingData:
    """--streaming: a dataset read as it streams, resumed where the step says; its images decoded and its
    captions encoded per batch, its micro-batches drawn on the host."""
    data, optim = config.data, config.optim
    start = saved.step * optim.gradient_accumulation_steps
    source = open_stream(data, accelerator.process_index, accelerator.num_processes, saved.seed, start)
    captions = source.sample_captions(STREAM_CAPTION_SAMPLE)
    warn_fractional_nearest(source.first_sources(NEAREST_SCALE_PROBES), data.decoding)
    text_max_length = caption_max_length(tokenizer, None, data.caption_max_length)
    schedule = stream_schedule(
        checkpointing_steps=config.output.checkpointing_steps,
        accumulation=optim.gradient_accumulation_steps,
        max_steps=optim.max_train_steps,
    )
    validation = validation_set(config, accelerator, None)
    # no table to keep on the device: this refuses --data_on_device yes, and says why auto draws on the host
    why_not = why_not_on_device(None, None, data.resolution, accelerator.device)
    _, on_device_choice = agreed_on_device(config.data.data_on_device, saved, why_not, accelerator)
    return TrainingData(
        source=source,
        batches=host_batches(config, source, process_shard(accelerator, data), accelerator.device),
        embeddings=None,
        captions=captions,
        text_max_length=text_max_length,
        schedule=schedule,
        validation=validation,
        on_device_choice=on_device_choice,
    )


def process_shard(accelerator, data: DataConfig) -> Shard:
    return Shard(accelerator.process_index, accelerator.num_processes, data.train_batch_size)


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


def hold_out(table: ImageTable, split: float, resolution: int) -> tuple[ImageTable, ValidationSet | None]:
    """The table without the rows --validation_split holds out, and those rows' validation set (None: none)."""
    if split <= 0:
        return table, None
    held_out = hold_out_rows(table.usable_rows, split)
    validation = ValidationSet.from_table(table, held_out.tolist(), resolution) if len(held_out) else None
    return without_rows(table, held_out), validation


def fit_captions(tokenizer, shown: list[str], requested: int | None) -> tuple[int, CaptionCut]:
    """The length captions are padded to, and what it cuts: said in one warning line when it cuts any."""
    tokens = caption_tokens(tokenizer, shown)
    max_length = caption_max_length(tokenizer, tokens, requested)
    cut = caption_cut(tokenizer, tokens, max_length, requested=exists(requested))
    if cut.cut and is_main_process():
        logger.warning("%s", cut.warning())
    return max_length, cut


def encode_captions(config: RunConfig, accelerator, tokenizer, text_encoder, texts: list[str], max_length: int):
    """The texts' embeddings [texts, max_length, hidden] on the CPU, from the output folder's cache file when
    an earlier run (or the main process) wrote it."""
    model = config.model
    cache_file = caption_cache_path(
        config.output.output_dir, model.text_encoder_name_or_path, text_encoder, texts, max_length
    )
    with accelerator.main_process_first():  # the others then read the main process's cache file
        return encode_captions_once(tokenizer, text_encoder, texts, max_length, cache_file, accelerator.device)


def agreed_on_device(choice: str, saved: TrainState, why_not: str | None, accelerator) -> tuple[bool, Choice]:
    """--data_on_device's answer (resident.choose_on_device), the same on every process: every process must
    draw on the same generator, so all fit, or none goes; a resumed run draws where it started. With what
    chose it, for run_config.yaml."""
    device = accelerator.device
    if accelerator.num_processes > 1:
        fits = accelerator.gather(torch.tensor([int(not exists(why_not))], device=device))
        why_not = why_not or (None if bool(fits.all()) else "it does not fit on another process's GPU")
    recorded = saved.data_on_device if saved.step > 0 else None
    on_device = choose_on_device(choice, recorded, why_not, device)
    return on_device, on_device_choice(choice, on_device, why_not, recorded, device.type)


def host_batches(config: RunConfig, source: BatchSource, shard: Shard, device: torch.device) -> HostBatches:
    return HostBatches(
        source=source,
        shard=shard,
        data=config.data,
        dropout_prob=config.diffusion.conditioning_dropout_prob,
        device=device,
        channels_last=config.model.channels_last,
    )


def validation_set(config: RunConfig, accelerator, held_out: ValidationSet | None) -> ValidationSet | None:
    """--validation_data_dir's images when it is given, else the held-out ones."""
    folder = config.evaluation.validation_data_dir
    if not exists(folder):
        return held_out
    return read_validation_folder(config.data, folder, accelerator.is_local_main_process)


def read_validation_folder(data: DataConfig, folder: str, show_progress: bool) -> ValidationSet:
    """--validation_data_dir: every readable image of another imagefolder, with the training columns."""
    config = dataclasses.replace(
        data,
        train_data_dir=folder,
        dataset_name=None,
        dataset_config_name=None,
        streaming=False,
        dataloader_num_workers=0,
    )
    table = read_image_table(config, None, show_progress)
    return ValidationSet.from_table(table, table.usable_rows.tolist(), data.resolution)


def evaluation_embedder(conditioner: CachedEmbeddings | LiveEncoder, accelerator) -> Callable:
    """Captions -> embeddings for evaluating on one process: a trained encoder is called unwrapped (its DDP
    wrapper would wait for the other processes)."""
    if isinstance(conditioner, CachedEmbeddings):
        return conditioner.embed
    return lambda texts: encode_text(
        conditioner.tokenizer,
        unwrap(accelerator, conditioner.encoder),
        texts,
        conditioner.max_length,
        conditioner.device,
    )


def build_checks(
    config: RunConfig, accelerator, data: TrainingData, conditioner: CachedEmbeddings | LiveEncoder
) -> Checks:
    """The evaluation material, built on the main process only (it alone evaluates)."""
    evaluation, resolution = config.evaluation, config.data.resolution
    table = data.source.table if isinstance(data.source, IndexedBatches) else None
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
        embed=evaluation_embedder(conditioner, accelerator),
        weighting=objective_for(config.diffusion).weighting,
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


@dataclass(frozen=True, kw_only=True)
class PreparedModels:
    """The models, optimizer and schedules as accelerate prepared them, restored when resuming."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    ema: object | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    lr_factor: WarmupStableDecay | None  # warmup_stable_decay's factor, which a plan by time is set in
    learning_rates: LearningRates


def checkpoint_has_weights(checkpoint: Path, name_part: str) -> bool | None:
    """Whether the checkpoint's UNet has a weight whose name holds `name_part` (None: no model.safetensors)."""
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as opened:
        return any(name_part in key for key in opened.keys())


def check_checkpoint_augmentation(checkpoint: Path, augmentation: bool) -> None:
    """--augment_prob adds the UNet's class embedding: a checkpoint made with it cannot resume without it, nor
    the other way round; say so instead of a state-dict error."""
    trained_with = checkpoint_has_weights(checkpoint, "class_embedding.")
    if trained_with is not None and trained_with != augmentation:
        was, now = ("with", "0") if trained_with else ("without", "> 0")
        raise UserError(
            f"--resume_from_checkpoint {checkpoint}: that run trained {was} --augment_prob (its UNet's class embedding"
            f" {'is' if trained_with else 'is not'} there), this one has --augment_prob {now}; resume with the first run's"
            " --augment_prob, or start a new --output_dir"
        )


# a run from before both defaults changed resumes as it trained only with both old values
SINCE_POOLED_DEFAULT = " (on by default since 2026-12-07; a run started before then also needs --min_snr_variant snr)"


def check_checkpoint_pooled_text(checkpoint: Path, pooled_text: bool) -> None:
    """--pooled_text adds the UNet's pooled-caption embedding: resume with the setting the run was trained with."""
    trained_with = checkpoint_has_weights(checkpoint, "add_embedding.")
    if trained_with is not None and trained_with != pooled_text:
        flag = "--pooled_text" if trained_with else "--no-pooled_text"
        raise UserError(
            f"--resume_from_checkpoint {checkpoint}: that run trained {'with' if trained_with else 'without'}"
            f" --pooled_text (its UNet's pooled-caption embedding {'is' if trained_with else 'is not'} there);"
            f" pass {flag} to resume it{SINCE_POOLED_DEFAULT if not trained_with else ''}, or start a new --output_dir"
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


def prepare_models(config: RunConfig, accelerator, text_encoder, length: LengthPlan, state, resume) -> PreparedModels:
    """UNet, EMA, optimizer and the LR schedule over `length`, handed to accelerate and loaded from `resume` when
    given."""
    model, optim = config.model, config.optim
    unet = build_unet(
        model.model_config_name_or_path,
        config.data.resolution,
        text_hidden_size(text_encoder),
        model.model_size,
        augmentation=config.data.augment_prob > 0,
        pooled_text=model.pooled_text,
    )
    configure_unet(unet, model)
    ema = build_ema(unet, optim)  # from the CPU copy: with --ema_offload the EMA never touches the GPU
    # on the device before the optimizer: torch 2.1-2.3 refuse fused AdamW over CPU parameters at construction
    unet.to(accelerator.device)
    images_per_step = config.data.train_batch_size * accelerator.num_processes * optim.gradient_accumulation_steps
    rates = choose_learning_rates(optim, model, unet, images_per_step)
    parameters = trained_parameters(unet, text_encoder, model, rates)
    optimizer = build_optimizer(parameters, optim, rates.unet, accelerator.device)
    lr_scheduler, lr_factor = build_lr_scheduler(optimizer, optim, length.steps, length.decay_start)
    if model.torch_compile:
        unet = torch.compile(unet)
    if model.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)  # the encoder: DDP's
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    # stepped by hand once per optimizer step: accelerate would step a prepared one per process
    accelerator.register_for_checkpointing(lr_scheduler)
    if exists(ema):
        accelerator.register_for_checkpointing(ema)
    if exists(resume):
        check_checkpoint_augmentation(resume, config.data.augment_prob > 0)
        check_checkpoint_pooled_text(resume, config.model.pooled_text)
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
        lr_factor=lr_factor,
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
    resume, saved = open_state(config, accelerator)
    set_seed(saved.seed)

    logger.info("preparing %s and the text encoder %s", config.data.name, model.text_encoder_name_or_path)
    tokenizer, text_encoder = build_text_encoder(model.text_encoder_name_or_path, config.data.cache_dir)
    text_encoder.requires_grad_(model.train_text_encoder)
    freeze_what_last_hidden_state_skips(text_encoder)
    text_encoder.to(accelerator.device)
    if config.data.streaming:
        data = prepare_streamed_data(config, accelerator, saved, tokenizer)
    else:
        data = prepare_indexed_data(config, accelerator, saved, tokenizer, text_encoder)
    state = starting_state(saved, data)
    length, plans_by_time = starting_length(config.optim, state, data.schedule.max_steps)
    warn_unplanned_schedule(config.optim)
    models = prepare_models(config, accelerator, text_encoder, length, state, resume)
    conditioner = conditioner_for(config, data, tokenizer, models.text_encoder, accelerator.device)
    prompts = choose_validation_prompts(output.validation_prompts, data.captions, output.eval_batch_size, state.seed)
    prompt_embeddings, text_encoder = None, models.text_encoder
    if isinstance(conditioner, CachedEmbeddings):
        prompt_embeddings = encode_grid_prompts(tokenizer, text_encoder, prompts, data.text_max_length, conditioner)
        # training reads the cached table only: free the frozen encoder (~0.5 GB for CLIP-L), reloaded to save
        text_encoder = None
    noise_scheduler = build_noise_scheduler(config.diffusion)
    trainer = build_trainer(config, accelerator, models, text_encoder, noise_scheduler, data.batches, conditioner)
    outputs = Outputs(
        accelerator=accelerator,
        unet=models.unet,
        ema=models.ema,
        text_encoder=text_encoder,
        text_encoder_source=(model.text_encoder_name_or_path, config.data.cache_dir),
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        text_max_length=data.text_max_length,
        grids=GridConfig(
            prompts=prompts,
            prompt_embeddings=prompt_embeddings,
            count=output.eval_batch_size,
            num_inference_steps=output.ddpm_num_inference_steps,
            guidance_scale=output.guidance_scale,
            seed=state.seed,
        ),
        output_dir=output.output_dir,
        public_flags=config.public_flags | rates_used(models.learning_rates),
        checks=build_checks(config, accelerator, data, conditioner),
    )
    planner = time_planner(config.optim, state, data.schedule, length, models, trainer) if plans_by_time else None
    intervals = intervals_for(config, data, length, plans_by_time)
    return Run(
        accelerator=accelerator,
        trainer=trainer,
        outputs=outputs,
        intervals=intervals,
        state=state,
        text_max_length=data.text_max_length,
        plan=run_plan(
            config.data,
            data,
            trainer,
            models,
            describe_steps(intervals.schedule, length, planner, config.data.streaming),
        ),
        length=length,
        planner=planner,
        choices=automatic_choices(config, accelerator, resume, state, data, models.learning_rates),
    )


def starting_state(saved: TrainState, data: TrainingData) -> TrainState:
    """The loop state this session starts from: the saved one (or a fresh one), with what preparing the data
    found: the rows that do not decode (a resumed run need not check them again), and whether the batches are
    drawn on the device (a resumed run draws where it started)."""
    found = {"data_on_device": isinstance(data.batches, ResidentBatches)}
    if exists(data.unreadable_rows):
        found |= {"unreadable_rows": data.unreadable_rows, "skipped_images": len(data.unreadable_rows)}
    return dataclasses.replace(saved, **found)


def conditioner_for(
    config: RunConfig, data: TrainingData, tokenizer, text_encoder, device: torch.device
) -> CachedEmbeddings | LiveEncoder:
    """The captions' cached embeddings, or the encoder run per batch: as accelerate prepared it, when it trains
    (its gradients are synced then)."""
    if exists(data.embeddings):
        return data.embeddings
    return LiveEncoder(
        tokenizer=tokenizer,
        encoder=text_encoder,
        max_length=data.text_max_length,
        trains=config.model.train_text_encoder,
        device=device,
    )


def build_trainer(
    config: RunConfig,
    accelerator,
    models: PreparedModels,
    text_encoder,
    noise_scheduler,
    batches: MicroBatches,
    conditioner: CachedEmbeddings | LiveEncoder,
) -> Trainer:
    """The Trainer over the prepared models and the data's micro-batches, with its --cuda_graphs step if any."""
    objective = objective_for(config.diffusion)
    return Trainer(
        accelerator=accelerator,
        unet=models.unet,
        text_encoder=text_encoder,
        trains_text_encoder=config.model.train_text_encoder,
        noise_scheduler=noise_scheduler,
        optimizer=models.optimizer,
        lr_scheduler=models.lr_scheduler,
        ema=models.ema,
        ema_offload=config.optim.ema_offload,
        batches=batches,
        conditioner=conditioner,
        objective=objective,
        max_grad_norm=config.optim.max_grad_norm,
        captured=captured_step(config, accelerator, models, noise_scheduler, objective, batches, conditioner),
    )


def intervals_for(config: RunConfig, data: TrainingData, length: LengthPlan, plans_by_time: bool) -> Intervals:
    output = config.output
    return Intervals(
        # until a plan by time is fixed, --num_epochs' count bounds the run
        schedule=data.schedule if plans_by_time else dataclasses.replace(data.schedule, max_steps=length.steps),
        logging_steps=output.logging_steps,
        checkpointing_steps=output.checkpointing_steps,
        grid_epochs=output.save_images_epochs,
        export_epochs=output.save_model_epochs,
        validation_steps=config.evaluation.validation_steps,
        quality_steps=config.evaluation.eval_steps,
        validates=exists(data.validation),
        measures_quality=config.evaluation.measures_quality,
    )


def automatic_choices(
    config: RunConfig, accelerator, resume: Path | None, state: TrainState, data: TrainingData, rates: LearningRates
) -> dict[str, Choice]:
    """The flags this run chose itself, by name: its choice and what made it (for run_config.yaml)."""
    optim = config.optim
    choices = {
        "seed": seed_choice(optim.seed, state.seed, resume),
        "mixed_precision": precision_choice(optim.mixed_precision, accelerator.mixed_precision),
        "data_on_device": data.on_device_choice,
        "caption_max_length": caption_length_choice(
            config.data.caption_max_length, data.text_max_length, config.data.streaming
        ),
    }
    encoder_rate = optim.text_encoder_learning_rate if config.model.train_text_encoder else None
    rate_choices = learning_rate_choices(optim.learning_rate, encoder_rate, rates.unet, rates.text_encoder, rates.why)
    return {name: choice for name, choice in choices.items() if exists(choice)} | rate_choices


def warn_unplanned_schedule(optim: OptimConfig) -> None:
    """--max_train_time plans the length of the schedules that leave it open until their decay (config.py)."""
    if not exists(optim.max_train_time) or exists(optim.max_train_steps) or not is_main_process():
        return
    if optim.lr_scheduler not in SCHEDULES_PLANNED_BY_TIME:
        logger.warning(
            "--lr_scheduler %s reads the run's length from the first step on, before any step is timed: it stays planned over --num_epochs, and --max_train_time only stops the run; --lr_scheduler %s decays to 0 at the time limit",
            optim.lr_scheduler,
            WARMUP_STABLE_DECAY,
        )


def time_planner(
    optim: OptimConfig, state: TrainState, bound: Schedule, length: LengthPlan, models: PreparedModels, trainer: Trainer
) -> TimePlanner:
    """The planner that times this session's first steps (after the eager ones of --cuda_graphs: its capture is
    no step time either) and fixes the run's length."""
    skipped = PLAN_SKIPPED_STEPS + (EAGER_STEPS_BEFORE_CAPTURE if exists(trainer.captured) else 0)
    return TimePlanner(
        budget=optim.max_train_time,
        bound=bound.max_steps,
        provisional=length,
        decay_share=optim.lr_decay_share if exists(models.lr_factor) else None,
        factor=models.lr_factor,
        first_step=state.step + skipped,
    )


def describe_steps(schedule: Schedule, length: LengthPlan, planner: TimePlanner | None, streaming: bool) -> str:
    """The run plan's words for its length: steps, epochs, how they were chosen, where the rate decays."""
    if streaming:
        return f"{schedule.max_steps} steps (with --streaming an 'epoch' is --checkpointing_steps = {schedule.batches_per_epoch // schedule.accumulation} steps)"
    epochs = f"{schedule.max_steps * schedule.accumulation / schedule.batches_per_epoch:.1f} epochs"
    if exists(planner):
        timed = f"steps {planner.first_step + 1}-{planner.last_step()} (or {PLAN_TIMED_SECONDS:.0f} s of them)"
        return f"at most {schedule.max_steps} steps ({epochs}), the length planned from --max_train_time {planner.budget} once {timed} are timed"
    return describe_length(
        dataclasses.replace(length, how=f"{epochs}{'; planned: ' + length.how if length.how else ''}")
    )


def captured_step(
    config: RunConfig,
    accelerator,
    models: PreparedModels,
    noise_scheduler,
    objective: DiffusionObjective,
    batches: MicroBatches,
    conditioner: CachedEmbeddings | LiveEncoder,
) -> CapturedStep | None:
    """--cuda_graphs: the trainer's step as one CUDA graph, or None (eager) with the reason in one line."""
    if not config.model.cuda_graphs:
        return None
    why_not = why_not_captured(config, accelerator)
    if exists(why_not):
        logger.warning("--cuda_graphs: training eagerly, because %s", why_not)
        return None
    logger.info("--cuda_graphs: each step is one CUDA graph, captured after %d eager steps", EAGER_STEPS_BEFORE_CAPTURE)
    device_step = device_step_for(
        unet=models.unet,
        noise_scheduler=noise_scheduler,
        objective=objective,
        optimizer=models.optimizer,
        ema=models.ema,
        max_grad_norm=config.optim.max_grad_norm,
        mixed_precision=accelerator.mixed_precision,
        batches=batches,
        embed=conditioner.embed,
    )
    return CapturedStep(device_step)


def encode_grid_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int, conditioner: CachedEmbeddings):
    """The grids' fixed prompts and the empty caption, encoded now so the frozen encoder can be freed."""
    with torch.no_grad():
        prompt_embeddings = encode_text(tokenizer, text_encoder, prompts, max_length).float()
    return prompt_embeddings, conditioner.embed([""])


def run_plan(flags: DataConfig, data: TrainingData, trainer: Trainer, models: PreparedModels, steps: str) -> str:
    schedule, accelerator = data.schedule, trainer.accelerator
    unet_params = count_parameters(models.unet) / 1e6
    held_out = f" ({len(data.validation.captions)} more held out for the validation loss)" if data.validation else ""
    variants = flags.tag_variants
    each = f", {variants.count} variants each" if exists(variants) else ""
    cut = data.caption_cut.describe() if exists(data.caption_cut) else ""
    return (
        f"{data.source.describe()}{held_out}{each} padded to {data.text_max_length} tokens{cut}; batch {flags.train_batch_size} x "
        f"{accelerator.num_processes} processes x {schedule.accumulation} accumulation = {trainer.images_per_step()} per step; "
        f"{steps}; UNet {unet_params:.1f}M parameters; {describe_rates(models.learning_rates)}"
    )
