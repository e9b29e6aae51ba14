"""How soon does a recipe follow the prompt? Adherence against images seen, with a FROZEN text encoder.

The frozen-encoder variant of the quickstart: the shapes dataset (16 px), the caption-vocabulary
CLIP of `make_text_encoder.py` left random and frozen (so the UNet alone must learn what the
words mean, as with any frozen pretrained encoder), the quickstart's UNet, batch 32, AdamW 5e-4
after 100 warm-up steps (unless a recipe says otherwise), EMA. Each recipe is trained once per seed
with a checkpoint every `--eval_every` steps; every checkpoint's EMA weights then draw every prompt
of the dataset and `evaluate_shapes.py` scores them. The table gives "all three" (colour, shape and
size right) against images seen, and the images seen to first reach 50% and 90%; a summary below it
gives the same crossings for each recipe's seeds' mean curve, read between points (less noisy than
one run's grid step); `--plot` draws the curves as a PNG (PIL only).

    python examples/adherence_curve.py --recipes before after --seeds 0 1 --output_dir out/adherence
    python examples/adherence_curve.py --recipes after --max_train_steps 400 --eval_every 200   # a quick look

Runs go `--jobs` at a time (each with its share of the CPU threads). A finished run is not
trained again: its scores are read back from `scores.json`, so an interrupted sweep can be
re-run with the same command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from evaluate_shapes import read_image, score  # noqa: E402
from make_shapes_dataset import all_prompts, caption  # noqa: E402

SHAPES_UNET = HERE / "shapes_unet.json"
THRESHOLDS = (0.5, 0.9)

# the loss weighting and UNet of the trainer's defaults until 2026-12-07 (min-SNR as the paper has it, no pooled
# caption): what the recipes measured before then pin, so that their tables repeat
DEFAULTS_UNTIL_2026_12_07 = ("--min_snr_variant", "snr", "--no-pooled_text")

# Flags shared by every recipe: the quickstart's run with its encoder frozen.
COMMON_FLAGS = [
    "--resolution", "16",
    "--train_batch_size", "32",
    "--use_ema", "--ema_max_decay", "0.999",
    "--conditioning_dropout_prob", "0.1",
    "--logger", "none",
    "--save_images_epochs", "100000", "--save_model_epochs", "100000",
    "--validation_split", "0",  # every shape trains, as in the runs before held-out images existed
    *DEFAULTS_UNTIL_2026_12_07,  # a recipe's UNet config still brings its own pooled caption (recipe(pooled=True))
]  # fmt: skip


def recipe(
    *,
    lr_schedule: str = "constant_with_warmup",
    prediction: str = "v_prediction",
    betas: str = "linear",
    pooled: bool = True,
    learning_rate: str = "5e-4",
    extra_flags: tuple[str, ...] = (),
) -> dict:
    """Trainer flags and UNet-config changes of one recipe; every setting is explicit, whatever the defaults."""
    flags = ["--lr_scheduler", lr_schedule, "--lr_warmup_steps", "100", "--learning_rate", learning_rate]
    flags += ["--prediction_type", prediction, "--ddpm_beta_schedule", betas, *extra_flags]
    return {"flags": flags, "unet": {"addition_embed_type": "text"} if pooled else {}}


def shipped(learning_rate: str, *extra_flags: str, warmup: str = "100", unet: dict | None = None) -> dict:
    """The trainer's defaults of the day and the quickstart's UNet (unless `unet` changes it), with a few flags."""
    return {"flags": ["--lr_warmup_steps", warmup, "--learning_rate", learning_rate, *extra_flags], "unet": unet}


def defaults(model_size: str, *extra_flags: str, batch: int = 32, length: int = 1) -> dict:
    """The trainer's TRUE defaults at a --model_size: only data, encoder, size, batch and step flags reach it
    (plus `extra_flags`, the one thing a sweep changes). `length` times the images of the other runs."""
    flags = ["--model_size", model_size, "--train_batch_size", str(batch), *extra_flags]
    return {"flags": flags, "unet": "preset", "batch": batch, "length": length}


# the seed's EMA warm-up (inv_gamma 1, power 3/4: ~20% of the run averaged)
SEED_EMA = ("--ema_inv_gamma", "1", "--ema_power", "0.75")

# "pooled": the prompt pooled by attention and added to the timestep embedding (addition_embed_type "text")
RECIPES = {
    # the trainer's defaults before issue 11: epsilon prediction, linear betas, cosine decay to zero, and its
    # EMA warm-up, pinned since the EMA defaults changed
    "before": recipe(lr_schedule="cosine", prediction="epsilon", pooled=False, extra_flags=SEED_EMA),
    # what "before" ran as on 2026-11-26 22:00 (the 3.2k grid), after the EMA defaults had changed under it
    "before, new EMA": recipe(lr_schedule="cosine", prediction="epsilon", pooled=False),
    "constant": recipe(prediction="epsilon", pooled=False),
    "pooled": recipe(lr_schedule="cosine", prediction="epsilon"),
    "constant+pooled": recipe(prediction="epsilon"),
    # cosine betas spend more of the schedule at the mid noise levels where a 16-32 px image's content is decided
    "cosine-betas": recipe(prediction="epsilon", betas="squaredcos_cap_v2"),
    "cosine-betas+v": recipe(betas="squaredcos_cap_v2"),
    "v": recipe(),
    "cosine-betas+v, cosine lr": recipe(lr_schedule="cosine", betas="squaredcos_cap_v2"),
    "cosine-betas+v, not pooled": recipe(betas="squaredcos_cap_v2", pooled=False),
    "cosine-betas+v, not pooled, lr 1e-3": recipe(betas="squaredcos_cap_v2", pooled=False, learning_rate="1e-3"),
    # a faster EMA warm-up (decay 1 - (1 + step)^-0.5): ~25 steps averaged at step 600 instead of ~120
    "cosine-betas+v, not pooled, lr 1e-3, ema power 0.5": recipe(
        betas="squaredcos_cap_v2", pooled=False, learning_rate="1e-3", extra_flags=("--ema_power", "0.5")
    ),
    # the trainer's defaults after issue 11 on the quickstart's UNet as shipped (LR and warm-up held as above)
    "after": shipped("5e-4"),
    # the shipped defaults with only the two levers that moved the curve beyond v: 2x LR, faster EMA warm-up
    "after, lr 1e-3, ema power 0.5": shipped("1e-3", "--ema_power", "0.5"),
    # which half of the 19.2k recipe matters, each on top of the line above
    "after, lr 1e-3, ema power 0.5, constant lr": shipped(
        "1e-3", "--ema_power", "0.5", "--lr_scheduler", "constant_with_warmup"
    ),
    # the trainer's defaults after this issue (v, cosine betas, constant LR, EMA over ~5% of the steps) at lr 1e-3
    "new defaults": shipped("1e-3"),
    # twice the learning rate: more learned per image seen, if the small UNet stays stable
    "new defaults, lr 2e-3": shipped("2e-3"),
    # the plain v loss: min-SNR-5 weights the x0 error of the noisiest steps, where content is decided, by SNR ~ 0
    "new defaults, no min-SNR": shipped("1e-3", "--snr_gamma", "0"),
    # cross-attention at every level of the quickstart's UNet, 16 px too (the --model_size UNets have it there)
    "new defaults, cross-attention at 16 px": shipped(
        "1e-3",
        unet={"down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3},
    ),
    # a shorter warm-up: 100 steps at a rising LR are ~1.6k images learned at half speed
    "new defaults, warm-up 20": shipped("1e-3", warmup="20"),
    # AdamW's second moment over ~100 steps instead of ~1000: step sizes follow the gradients' scale sooner
    "new defaults, adam beta2 0.99": shipped("1e-3", "--adam_beta2", "0.99"),
    "new defaults, lr 2e-3, adam beta2 0.99": shipped("2e-3", "--adam_beta2", "0.99"),
    "new defaults, warm-up 20, adam beta2 0.99": shipped("1e-3", "--adam_beta2", "0.99", warmup="20"),
    # past 2e-3: does the small UNet still gain per image, or turn unsteady?
    "new defaults, lr 3e-3": shipped("3e-3"),
    # half the caption dropout: more of each batch teaches the prompt (guidance still has an unconditional model)
    "new defaults, lr 2e-3, dropout 0.05": shipped("2e-3", "--conditioning_dropout_prob", "0.05"),
    "after, lr 1e-3, ema power 0.5, cosine betas": shipped(
        "1e-3", "--ema_power", "0.5", "--ddpm_beta_schedule", "squaredcos_cap_v2"
    ),
    # issue 25: the --model_size UNets on the trainer's true defaults, at their chosen rates and around them
    **{f"{size} defaults": defaults(size) for size in ("tiny", "small", "base", "large")},
    "tiny defaults, batch 128": defaults("tiny", batch=128),  # the batch rule's own choice: 2e-3 x sqrt(128 / 32)
    **{
        f"{size} lr {rate}": defaults(size, "--learning_rate", rate)
        for size in ("tiny", "small", "base")
        for rate in ("1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "4e-3")
    },
    # the batch rule: 4x the batch at the reference rate, x sqrt(4) and x 4 (the same images seen)
    **{
        f"tiny batch 128 lr {rate}": defaults("tiny", "--learning_rate", rate, batch=128)
        for rate in ("2e-3", "4e-3", "8e-3")
    },
    # stability: three times the images at the chosen rate and at twice it
    **{
        f"{size} lr {rate} x3": defaults(size, "--learning_rate", rate, length=3)
        for size, rate in (
            ("tiny", "2e-3"),
            ("tiny", "4e-3"),
            ("small", "2e-3"),
            ("small", "4e-3"),
            ("base", "1e-3"),
            ("base", "2e-3"),
        )
    },
    # the other defaults a frozen-encoder user meets, each turned back to what it was
    "tiny defaults, no EMA": defaults("tiny", "--no-use_ema"),
    "tiny defaults, warm-up 500": defaults("tiny", "--lr_warmup_steps", "500"),
    "tiny defaults, dropout 0.2": defaults("tiny", "--conditioning_dropout_prob", "0.2"),
    "base defaults, no EMA": defaults("base", "--no-use_ema"),
    # issue 36: the levers that made the UNet use its caption on real sets with one name per image
    # (docs/results/real-images.md), checked on the shapes task
    "tiny defaults, no min-SNR, pooled": defaults("tiny", "--snr_gamma", "0", "--pooled_text"),
    "tiny defaults, min-SNR+1": defaults("tiny", "--min_snr_variant", "snr_plus_one"),
    "tiny defaults, min-SNR+1, pooled": defaults("tiny", "--min_snr_variant", "snr_plus_one", "--pooled_text"),
    # the true defaults before min-SNR+1 and the pooled caption became them (learning-rates.md's "tiny defaults")
    **{
        f"{size} defaults until 2026-12-07": defaults(size, *DEFAULTS_UNTIL_2026_12_07)
        for size in ("tiny", "small", "base")
    },
    "tiny defaults, flow matching, logit-normal": defaults(
        "tiny", "--prediction_type", "flow_matching", "--timestep_sampling", "logit_normal"
    ),
    "base defaults, warm-up 500": defaults("base", "--lr_warmup_steps", "500"),
}


def prepare_inputs(work: Path, count: int) -> tuple[Path, Path]:
    """The shapes dataset and a random caption-vocabulary encoder, made once."""
    data, encoder = work / "shapes", work / "shapes-text-encoder"
    if not (data / "metadata.jsonl").is_file():
        command = [sys.executable, HERE / "make_shapes_dataset.py", "--output_dir", data, "--resolution", "16"]
        subprocess.run([str(part) for part in command + ["--count", str(count)]], check=True)
    if not (encoder / "config.json").is_file():
        command = [sys.executable, HERE / "make_text_encoder.py", "--captions", data / "metadata.jsonl"]
        command += ["--output_dir", encoder, "--hidden_size", "128", "--num_layers", "2", "--num_heads", "4"]
        subprocess.run([str(part) for part in command + ["--max_length", "16"]], check=True)
    return data, encoder


def unet_config_for(recipe: str, folder: Path) -> Path:
    """The quickstart's UNet config with the recipe's changes, written beside the run."""
    changes = RECIPES[recipe]["unet"]
    if changes is None:
        return SHAPES_UNET
    config = json.loads(SHAPES_UNET.read_text())
    for key in ("addition_embed_type", "addition_embed_type_num_heads"):
        config.pop(key, None)  # "before"-style recipes start from the plain cross-attention UNet
    config.update(changes)
    path = folder / "unet.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def batch_of(recipe: str) -> int:
    return RECIPES[recipe].get("batch", 32)


def train_command(recipe: str, seed: int, args, data: Path, encoder: Path, run_dir: Path) -> list[str]:
    """The trainer's command line: the recipe's flags over COMMON_FLAGS, or over nothing for a true-defaults recipe.

    A true-defaults run also exports its pipeline every epoch (the scorer loads the first export while it trains)
    and computes the held-out loss at every checkpoint: neither changes what it trains.
    """
    settings = RECIPES[recipe]
    steps = args.max_train_steps * 32 * settings.get("length", 1) // batch_of(recipe)
    every = args.eval_every * 32 // batch_of(recipe)
    command = [sys.executable, str(ROOT / "train_text_to_image.py")]
    if settings["unet"] == "preset":
        command += ["--resolution", "16", "--logger", "none", *settings["flags"]]
        command += ["--save_images_epochs", "100000", "--save_model_epochs", "1", "--validation_steps", str(every)]
    else:
        command += [*COMMON_FLAGS, *settings["flags"]]
        command += ["--model_config_name_or_path", str(unet_config_for(recipe, run_dir))]
    command += ["--train_data_dir", str(data), "--text_encoder_name_or_path", str(encoder)]
    command += ["--output_dir", str(run_dir / "model"), "--overwrite_output_dir", "--seed", str(seed)]
    return command + ["--max_train_steps", str(steps), "--checkpointing_steps", str(every)]


def checkpoint_ema(checkpoint: Path) -> list | None:
    """The EMA's shadow parameters saved in an accelerate checkpoint (the one custom object holding them), if any."""
    import torch

    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "shadow_params" in state:
            return state["shadow_params"]
    return None


def load_raw_state(checkpoint: Path) -> dict:
    """The trained (not averaged) UNet weights of an accelerate checkpoint."""
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def complete_checkpoints(model: Path) -> list[Path]:
    """Checkpoints in step order; an unfinished one is still a hidden .checkpoint-STEP.tmp folder."""
    return sorted(model.glob("checkpoint-*"), key=checkpoint_step)


def load_checkpoint_weights(unet, checkpoint: Path, weights: str = "ema") -> None:
    """The checkpoint's EMA weights into `unet` (its trained ones with weights "raw", or when it has no EMA)."""
    import torch

    shadow = checkpoint_ema(checkpoint) if weights == "ema" else None
    if shadow is None:
        unet.load_state_dict(load_raw_state(checkpoint))
        return
    with torch.no_grad():
        for parameter, saved in zip(unet.parameters(), shadow, strict=True):
            parameter.copy_(saved)


class Scorer:
    """Scores checkpoints with one pipeline (the run's first export) on the GPU when there is one."""

    def __init__(self, model: Path, images_per_prompt: int, guidance: float, weights: str, steps: int):
        import torch

        sys.path.insert(0, str(ROOT))
        from pipeline_text_to_image import TextToImagePipeline

        self.pipeline = TextToImagePipeline.from_pretrained(model)
        self.pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
        self.pipeline.set_progress_bar_config(disable=True)
        self.images_per_prompt, self.guidance, self.weights, self.steps = images_per_prompt, guidance, weights, steps

    def load(self, checkpoint: Path) -> None:
        load_checkpoint_weights(self.pipeline.unet, checkpoint, self.weights)

    def __call__(self, checkpoint: Path) -> float:
        """'all three' share: every prompt of the dataset drawn with the checkpoint's weights."""
        import torch

        self.load(checkpoint)
        prompts = all_prompts()
        labels = [prompt for prompt in prompts for _ in range(self.images_per_prompt)]
        images = self.pipeline(
            [caption(*prompt) for prompt in prompts],
            num_images_per_prompt=self.images_per_prompt,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return score([(read_image(image), label) for image, label in zip(pixels, labels, strict=True)])["all"]


def score_checkpoints(
    model: Path, images_per_prompt: int, guidance: float, weights: str = "ema", steps: int = 25
) -> dict[int, float]:
    """'all three' share per checkpoint step of a finished run."""
    scorer = Scorer(model, images_per_prompt, guidance, weights, steps)
    return {checkpoint_step(checkpoint): scorer(checkpoint) for checkpoint in complete_checkpoints(model)}


def pipeline_exported(model: Path) -> bool:
    """A whole export: model_index.json there and no swap of a newer one under way."""
    swapping = (model / ".pipeline.tmp").exists() or (model / ".pipeline.old").exists()
    return (model / "model_index.json").is_file() and not swapping


def train_and_score(command: list[str], model: Path, args, threads: int, log: Path) -> dict[int, float]:
    """Trains, scoring and deleting each checkpoint as it appears (a base UNet's run would otherwise hold GBs)."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    torch_threads(threads)
    by_step, scorer = {}, None
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
        while True:
            finished = process.poll() is not None
            if scorer is None and pipeline_exported(model):
                scorer = Scorer(
                    model, args.images_per_prompt, args.guidance_scale, args.weights, args.num_inference_steps
                )
            for checkpoint in complete_checkpoints(model) if scorer else []:
                if checkpoint_step(checkpoint) in by_step:  # kept (--keep_checkpoints) and scored already
                    continue
                by_step[checkpoint_step(checkpoint)] = scorer(checkpoint)
                if not args.keep_checkpoints:
                    shutil.rmtree(checkpoint)
                # a sweep cut short keeps what was scored (--report_only reads it)
                log.with_name("scores.partial.json").write_text(json.dumps(by_step, indent=2))
            if finished:
                break
            time.sleep(2)
    if process.returncode != 0:  # e.g. a NaN at too high a rate: the points scored so far stand, the table says so
        tail = log.read_text().strip().splitlines()[-1:]
        log.with_name("failed.txt").write_text(f"exit {process.returncode}: {' '.join(tail)}\n")
    return by_step


def held_out_losses(model: Path) -> dict[int, float]:
    """val/loss by step, from the run's evaluation.jsonl."""
    sys.path.insert(0, str(ROOT))
    from text_to_image.metrics import VAL_LOSS

    path = model / "evaluation.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {line["step"]: line[VAL_LOSS.logged] for line in lines if VAL_LOSS.logged in line}


def train(recipe: str, seed: int, args, data: Path, encoder: Path, threads: int) -> Path:
    run_dir = args.output_dir / f"{recipe}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(recipe, seed, args, data, encoder, run_dir)
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    with open(run_dir / "train.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=environment)
    return run_dir / "model"


def run_recipe(recipe: str, seed: int, args, data: Path, encoder: Path, threads: int) -> dict[int, float]:
    """Images seen -> 'all three' share for one recipe and seed (cached in a scores file).

    A true-defaults recipe is scored while it trains. A finished run whose checkpoints were kept
    (--keep_checkpoints) is rescored without training, e.g. with other --weights or --guidance_scale.
    """
    run_dir = args.output_dir / f"{recipe}-seed{seed}"
    variant = "" if (args.weights, args.guidance_scale) == ("ema", 3.0) else f"-{args.weights}-g{args.guidance_scale:g}"
    scores_file = run_dir / f"scores{variant}.json"
    if scores_file.is_file():
        return {int(images): share for images, share in json.loads(scores_file.read_text()).items()}
    model = run_dir / "model"
    if RECIPES[recipe]["unet"] == "preset" and not any(model.glob("checkpoint-*")):
        run_dir.mkdir(parents=True, exist_ok=True)
        command = train_command(recipe, seed, args, data, encoder, run_dir)
        by_step = train_and_score(command, model, args, threads, run_dir / "train.log")
        (run_dir / "val_loss.json").write_text(json.dumps(held_out_losses(model), indent=2))
    else:
        if not ((model / "model_index.json").is_file() and any(model.glob("checkpoint-*"))):
            model = train(recipe, seed, args, data, encoder, threads)
        torch_threads(threads)
        by_step = score_checkpoints(
            model, args.images_per_prompt, args.guidance_scale, args.weights, args.num_inference_steps
        )
    by_images = {step * batch_of(recipe): share for step, share in by_step.items()}
    scores_file.write_text(json.dumps(by_images, indent=2))
    if not args.keep_checkpoints:
        for checkpoint in model.glob("checkpoint-*"):  # ~50 MB each: the scores are what we keep
            shutil.rmtree(checkpoint)
    return by_images


def torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def images_to_reach(curve: dict[int, float], threshold: float) -> int | None:
    return next((images for images, share in sorted(curve.items()) if share >= threshold), None)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def crossing_cell(images: float | None, curve: dict[int, float]) -> str:
    """Where a curve reached a threshold, or '> ' the last point it was scored at."""
    return f"{images / 1000:.1f}k" if images is not None else f"> {max(curve) / 1000:.1f}k"


def format_table(curves: dict[tuple[str, int], dict[int, float]]) -> str:
    points = sorted({images for curve in curves.values() for images in curve})
    header = ["recipe", "seed", *[f"{images / 1000:g}k" for images in points]]
    header += [f"to {threshold:.0%}" for threshold in THRESHOLDS]
    rows = [
        [recipe, str(seed), *[f"{curve[p]:.0%}" if p in curve else "" for p in points]]
        + [crossing_cell(images_to_reach(curve, threshold), curve) for threshold in THRESHOLDS]
        for (recipe, seed), curve in curves.items()
    ]
    return markdown_table(header, rows)


def mean_curves(curves: dict[tuple[str, int], dict[int, float]]) -> dict[str, tuple[int, dict[int, float]]]:
    """Per recipe: (seeds, the seeds' mean share at every point all of them scored)."""
    by_recipe: dict[str, list[dict[int, float]]] = {}
    for (recipe, _), curve in curves.items():
        by_recipe.setdefault(recipe, []).append(curve)
    means = {}
    for recipe, runs in by_recipe.items():
        points = sorted(set.intersection(*(set(curve) for curve in runs)))
        means[recipe] = (len(runs), {p: sum(curve[p] for curve in runs) / len(runs) for p in points})
    return means


def interpolated_crossing(curve: dict[int, float], threshold: float) -> float | None:
    """Images seen where the curve (0 at 0 images, straight between points) first reaches the threshold.

    A single run's crossing moves a whole grid step with one sample more or less right; the seeds' mean
    curve, read between points, ranks recipes with less of that noise.
    """
    before_images, before_share = 0, 0.0
    for images, share in sorted(curve.items()):
        if share >= threshold:
            rise = (threshold - before_share) / (share - before_share) if share > before_share else 1.0
            return before_images + rise * (images - before_images)
        before_images, before_share = images, share
    return None


def format_summary(curves: dict[tuple[str, int], dict[int, float]]) -> str:
    """One row per recipe: its seeds' mean curve, and where that crosses each threshold (interpolated)."""
    header = ["recipe", "seeds", *[f"to {threshold:.0%} (mean)" for threshold in THRESHOLDS]]
    rows = [
        [recipe, str(seeds)]
        + [crossing_cell(interpolated_crossing(curve, threshold), curve) for threshold in THRESHOLDS]
        for recipe, (seeds, curve) in mean_curves(curves).items()
    ]
    return markdown_table(header, rows)


def plot(
    curves: dict[tuple[str, int], dict[float, float]],
    path: Path,
    *,
    title: str = "'all three' right (colour, shape, size), frozen text encoder",
    x_label: str = "images seen",
    levels: tuple[float, ...] = THRESHOLDS,
    top: float = 1.0,
    start: float = 0.0,
) -> None:
    """A share against images seen (or minutes), colour per recipe: each run thin and pale, the seeds' mean thick
    (PIL only); `top` is the share at the top of the plot, `levels` the shares ruled across it, `start` the share
    every curve starts from at 0."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    most = max(max(curve) for curve in curves.values())
    x_of = lambda x: margin + (width - 2 * margin) * x / most  # noqa: E731
    y_of = lambda share: height - margin - (height - 2 * margin) * min(share, top) / top  # noqa: E731
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    for share in (level for level in levels if level <= top):  # a level above the top would be drawn on it
        draw.line([(margin, y_of(share)), (width - margin, y_of(share))], fill=(200, 200, 200))
        draw.text((4, y_of(share) - 6), f"{share:.0%}", fill="black")
    right_end = f"{most / 1000:g}k" if most >= 1000 else f"{most:g}"
    draw.text((width - margin - 30, height - margin + 6), right_end, fill="black")
    draw.text((width // 2 - 40, height - 20), x_label, fill="black")
    draw.text((margin, 8), title, fill="black")
    palette = [(200, 40, 40), (40, 90, 220), (30, 150, 60), (230, 140, 20), (140, 50, 170), (90, 90, 90)]
    recipes = list(dict.fromkeys(recipe for recipe, _ in curves))
    line = lambda curve: [(x_of(0), y_of(start))] + [(x_of(x), y_of(curve[x])) for x in sorted(curve)]  # noqa: E731
    colour_of = {recipe: palette[index % len(palette)] for index, recipe in enumerate(recipes)}
    for (recipe, _), curve in curves.items():
        pale = tuple(channel + (255 - channel) * 3 // 5 for channel in colour_of[recipe])
        draw.line(line(curve), fill=pale, width=1)
    means = mean_curves(curves)
    for recipe, (_, mean) in means.items():
        if mean:
            draw.line(line(mean), fill=colour_of[recipe], width=3)
    for index, recipe in enumerate(recipes):
        seeds = means[recipe][0]
        label = f"{recipe} ({seeds} seeds: thin; mean: thick)" if seeds > 1 else recipe
        # top left: the curves rise from the bottom left
        draw.text((margin + 8, margin + 14 * index), label, fill=colour_of[recipe])
    image.save(path)


def scored_so_far(run_dir: Path, batch: int) -> dict[int, float]:
    """A finished run's scores, or those of a run cut short (scores.partial.json, by step), by images seen."""
    if (run_dir / "scores.json").is_file():
        return {int(images): share for images, share in json.loads((run_dir / "scores.json").read_text()).items()}
    if (run_dir / "scores.partial.json").is_file():
        partial = json.loads((run_dir / "scores.partial.json").read_text())
        return {int(step) * batch: share for step, share in partial.items()}
    return {}


def write_report(curves: dict[tuple[str, int], dict[int, float]], args) -> dict:
    """The per-run table and the summary, printed and written to table.md; the plot with --plot."""
    table = format_table(curves) + "\n\n" + format_summary(curves)
    print(table)
    (args.output_dir / "table.md").write_text(table + "\n")
    if args.plot:
        plot(curves, args.plot)
    return curves


def report_only(runs: list[tuple[str, int]], args) -> dict:
    """The tables of whatever runs have scores, training nothing."""
    curves = {run: scored_so_far(args.output_dir / f"{run[0]}-seed{run[1]}", batch_of(run[0])) for run in runs}
    curves = {run: curve for run, curve in curves.items() if curve}
    return write_report(curves, args)


def recipe_seeds(text: str) -> tuple[str, list[int]]:
    recipe, _, seeds = text.rpartition("@")
    if recipe not in RECIPES:
        raise argparse.ArgumentTypeError(f"{recipe!r} is not a recipe; see RECIPES in {Path(__file__).name}")
    return recipe, [int(seed) for seed in seeds.split(",")]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["before", "after"], choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--max_train_steps", type=int, default=1600, help="Optimizer steps per run (batch 32).")
    parser.add_argument("--eval_every", type=int, default=200, help="Score the EMA weights every N steps.")
    parser.add_argument("--images_per_prompt", type=int, default=2, help="Images per prompt at each score.")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_inference_steps", type=int, default=25, help="Sampler steps when scoring.")
    parser.add_argument("--dataset_size", type=int, default=3600, help="Shapes drawn for training (made once).")
    parser.add_argument(
        "--weights", default="ema", choices=["ema", "raw"], help="Score the EMA or the trained weights."
    )
    parser.add_argument("--jobs", type=int, default=2, help="Runs trained at once (CPU threads are shared).")
    parser.add_argument("--output_dir", type=Path, default=Path("out/adherence"))
    parser.add_argument("--plot", type=Path, help="Also draw the curves into this PNG.")
    parser.add_argument("--keep_checkpoints", action="store_true", help="Keep each run's checkpoints (rescoring).")
    parser.add_argument(
        "--runs",
        nargs="+",
        type=recipe_seeds,
        help="'RECIPE@SEED,SEED' each, started in this order (longest first fills --jobs best); instead of"
        " --recipes x --seeds.",
    )
    parser.add_argument(
        "--report_only", action="store_true", help="Table the runs that have scores; train nothing (a cut sweep)."
    )
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.runs:
        runs = [(recipe, seed) for recipe, seeds in args.runs for seed in seeds]
    else:
        runs = [(recipe, seed) for recipe in args.recipes for seed in args.seeds]
    if args.report_only:
        return report_only(runs, args)
    data, encoder = prepare_inputs(args.output_dir, args.dataset_size)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.jobs == 1:
        curves = {run: run_recipe(*run, args, data, encoder, threads) for run in runs}
    else:
        # processes, not threads: pipeline loading and torch's thread count are process-wide; spawned, not
        # forked: a fork of a process whose torch thread pool has run can hang in the child
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {run: pool.submit(run_recipe, *run, args, data, encoder, threads) for run in runs}
            curves = {run: future.result() for run, future in futures.items()}
    failed = {run: args.output_dir / f"{run[0]}-seed{run[1]}" / "failed.txt" for run in runs}
    for (recipe, seed), path in failed.items():
        if path.is_file():
            print(f"{recipe} seed {seed} stopped early: {path.read_text().strip()}")
    return write_report(curves, args)


if __name__ == "__main__":
    main()
