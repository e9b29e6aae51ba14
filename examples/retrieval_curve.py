"""Does the model draw the thing named? Caption retrieval on a real set with one image per caption.

For a dataset where each image has its own name ("an emoji of dog face", "a pixel-art icon of oak
log"), each recipe is trained per seed with a checkpoint every `--eval_every` images; each
checkpoint's EMA weights then draw 4 samples of each of 64 fixed captions (the same 4 noises for
every caption), and each sample's own training image is ranked among ALL the training images by
pixel distance at the training resolution. The table gives top-1 and top-10 (the own image is the
nearest, or among the 10 nearest; chance is 1 / N and 10 / N) and the median rank, against images
seen and against wall time; beside it `text/caption_effect` (samples of different captions from one
noise, against samples of one caption from different noises: ~0 when the UNet ignores its text).
Each point also saves the grid of the first 8 captions x 4 noises (`grid-IMAGES.png`).

The encoder is the caption-vocabulary CLIP of `make_text_encoder.py`, random and frozen unless a
recipe trains it; "defaults" runs the trainer's TRUE defaults (data, encoder, --model_size, batch,
steps and checkpoint flags only).

    python ../shared/datasets/make_minecraft_dataset.py data/minecraft
    python examples/retrieval_curve.py --data ../shared/datasets/emoji-noto-32 --resolution 16 \\
        --recipes defaults "no min-SNR" --seeds 0 1 2 --images 25600 --output_dir out/retrieval-emoji16

Runs go `--jobs` at a time, each with its share of the CPU threads; a run is trained, then scored,
and its scores kept in `scores.json` (an interrupted sweep re-run with the same command trains only
what is missing; `--report_only` tables what there is). Wall time is the trainer's own: the time from
its start to each checkpoint's completion, with the run's thread share.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from adherence_curve import (  # noqa: E402
    DEFAULTS_UNTIL_2026_12_07,
    checkpoint_step,
    complete_checkpoints,
    interpolated_crossing,
    load_checkpoint_weights,
    markdown_table,
    mean_curves,
    plot,
    torch_threads,
)

CAPTIONS, NOISES, GRID_CAPTIONS = 64, 4, 8
SAMPLE_SEED = 20261207  # which captions are scored and their noises: the same for every recipe and seed
TOP_LEVELS = (0.05, 0.10, 0.25)  # top-10 shares whose crossing the summary reports
DEFAULT_BATCH = 32


def recipe(*flags: str, batch: int = DEFAULT_BATCH, unet: dict | None = None) -> dict:
    """Trainer flags on top of the true defaults; `unet` changes the --model_size preset's UNet config."""
    return {"flags": list(flags), "batch": batch, "unet": unet}


RECIPES = {
    # what a user gets who passes only data, encoder, size, batch and steps
    "defaults": recipe(),
    # the defaults this file's tables measured before min-SNR+1 and the pooled caption became them (2026-12-07)
    "defaults until 2026-12-07": recipe(*DEFAULTS_UNTIL_2026_12_07),
    # the quickstart's way: the caption-vocabulary encoder trained with the UNet
    "joint encoder": recipe("--train_text_encoder"),
    # min-SNR-5 weights the x0 error of the noisiest steps, where the named thing is decided, by SNR ~ 0
    "no min-SNR": recipe("--snr_gamma", "0"),
    # min-SNR on SNR + 1: the noisy steps weigh 1 as without min-SNR, the clean steps stay capped
    "min-SNR+1": recipe("--min_snr_variant", "snr_plus_one"),
    "min-SNR+1, pooled": recipe("--min_snr_variant", "snr_plus_one", "--pooled_text"),
    "flow matching": recipe("--prediction_type", "flow_matching"),
    "flow matching, logit-normal": recipe("--prediction_type", "flow_matching", "--timestep_sampling", "logit_normal"),
    # the caption pooled by attention and added to the timestep embedding (Imagen, SDXL)
    "pooled": recipe("--pooled_text"),
    "no min-SNR, pooled": recipe("--snr_gamma", "0", "--pooled_text"),
    "flow matching, logit-normal, pooled": recipe(
        "--prediction_type", "flow_matching", "--timestep_sampling", "logit_normal", "--pooled_text"
    ),
    "small": recipe("--model_size", "small"),
    "batch 64": recipe(batch=64),
    "no caption dropout": recipe("--conditioning_dropout_prob", "0"),
}


# ----------------------------------------------------------------------------------------------------------------
# Inputs: the encoder, the training images as the trainer sees them, the scored captions


def prepare_encoder(data: Path, work: Path) -> Path:
    """The caption-vocabulary CLIP of the dataset's captions (random; frozen unless a recipe trains it), made once."""
    encoder = work / "text-encoder"
    if not (encoder / "config.json").is_file():
        command = [sys.executable, HERE / "make_text_encoder.py", "--captions", data / "metadata.jsonl"]
        command += ["--output_dir", encoder, "--hidden_size", "128", "--num_layers", "2", "--num_heads", "4"]
        subprocess.run([str(part) for part in command], check=True)
    return encoder


class Reference:
    """All the training images at the training resolution (the trainer's own decoding and centre crop), and the
    fixed sample of captions that are scored: drawn from the rows that train (not the validation split's)."""

    def __init__(self, data: Path, resolution: int, encoder: Path):
        import torch

        from text_to_image.config import DataConfig, EvalConfig, parse_args
        from text_to_image.data import read_image_table
        from text_to_image.evaluation import centre_crops
        from text_to_image.setup import hold_out_rows

        flags = parse_args(["--train_data_dir", str(data), "--resolution", str(resolution)])
        flags.text_encoder_name_or_path = str(encoder)
        table = read_image_table(DataConfig.from_args(flags), None, show_progress=False)
        rows = table.usable_rows.tolist()
        self.images, _ = centre_crops(table, rows, resolution)
        share = EvalConfig.from_args(flags).held_out_share
        held_out = set(hold_out_rows(table.usable_rows, share).tolist()) if share > 0 else set()
        trained = [index for index, row in enumerate(rows) if row not in held_out]
        order = torch.randperm(len(trained), generator=torch.Generator().manual_seed(SAMPLE_SEED))
        self.own = torch.tensor([trained[i] for i in order[:CAPTIONS].tolist()])
        self.captions = [table.caption_options[rows[index]][0] for index in self.own.tolist()]

    def __len__(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------------------------------------------
# Training and scoring one run


def write_unet_config(changes: dict, resolution: int, model_size: str, folder: Path) -> Path:
    from text_to_image.models import default_unet_config

    path = folder / "unet.json"
    path.write_text(json.dumps(default_unet_config(resolution, model_size) | changes, indent=2))
    return path


def train_command(name: str, seed: int, args, encoder: Path, run_dir: Path) -> list[str]:
    """The trainer with only data, encoder, size, batch, steps and checkpoints, plus the recipe's flags."""
    settings = RECIPES[name]
    batch = settings["batch"]
    steps, every = args.images // batch, args.eval_every // batch
    command = [sys.executable, str(ROOT / "train_text_to_image.py"), "--train_data_dir", str(args.data)]
    command += ["--text_encoder_name_or_path", str(encoder), "--resolution", str(args.resolution)]
    command += ["--model_size", args.model_size, "--train_batch_size", str(batch), *settings["flags"]]
    if settings["unet"]:
        unet = write_unet_config(settings["unet"], args.resolution, args.model_size, run_dir)
        command += ["--model_config_name_or_path", str(unet)]
    command += ["--output_dir", str(run_dir / "model"), "--overwrite_output_dir", "--seed", str(seed)]
    command += ["--max_train_steps", str(steps), "--checkpointing_steps", str(every), "--logger", "none"]
    return command + ["--save_images_epochs", "100000", "--save_model_epochs", "100000"]


def train(command: list[str], run_dir: Path, threads: int) -> dict[int, float]:
    """Trains; seconds from the start to each checkpoint's completion, by step (the trainer's own wall time)."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    started = time.time()
    with open(run_dir / "train.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=environment)
    checkpoints = complete_checkpoints(run_dir / "model")
    markers = {checkpoint_step(c): (c / "train_state.json").stat().st_mtime for c in checkpoints}
    return {step: finished - started for step, finished in markers.items()}


class Scorer:
    """Draws the reference's captions with a checkpoint's EMA weights and ranks each sample's own image."""

    def __init__(self, model: Path, reference: Reference, guidance: float, steps: int):

        from pipeline_text_to_image import TextToImagePipeline
        from text_to_image.outputs import shared_noise

        self.pipeline = TextToImagePipeline.from_pretrained(model)
        self.pipeline.set_progress_bar_config(disable=True)
        self.reference, self.guidance, self.steps = reference, guidance, steps
        resolution = self.pipeline.unet.config.sample_size
        self.latents = shared_noise(CAPTIONS, NOISES, resolution, SAMPLE_SEED)  # sample j of every caption: noise j

    def __call__(self, checkpoint: Path, grid: Path) -> dict[str, float]:
        import torch

        from text_to_image.evaluation import caption_effect, retrieval_ranks, to_uint8_batch

        load_checkpoint_weights(self.pipeline.unet, checkpoint)
        images = self.pipeline(
            self.reference.captions,
            num_images_per_prompt=NOISES,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            latents=self.latents,
        ).images
        samples = to_uint8_batch(images, self.reference.images.shape[-1])
        ranks = retrieval_ranks(samples, self.reference.images, self.reference.own.repeat_interleave(NOISES))
        self.grid(images, grid)
        return {
            "top1": (ranks <= 1).float().mean().item(),
            "top10": (ranks <= 10).float().mean().item(),
            "median_rank": float(torch.median(ranks.float()).item()),
            "caption_effect": caption_effect(samples.reshape(CAPTIONS, NOISES, *samples.shape[1:])),
        }

    def grid(self, images: list, path: Path) -> None:
        """The first GRID_CAPTIONS captions, each as its training image then its NOISES samples; two a row."""
        from pipeline_text_to_image import make_captioned_grid
        from text_to_image.evaluation import to_pil

        cells, labels = [], []
        for index, caption in enumerate(self.reference.captions[:GRID_CAPTIONS]):
            own = self.reference.own[index].item()
            cells += to_pil(self.reference.images[own : own + 1]) + images[index * NOISES : (index + 1) * NOISES]
            labels += [f"trained: {caption}"] + [f"noise {noise}" for noise in range(NOISES)]
        make_captioned_grid(cells, labels, columns=2 * (NOISES + 1)).save(path)


def run_recipe(name: str, seed: int, args, encoder: Path, threads: int) -> list[dict]:
    """Per checkpoint: images seen, minutes, top-1, top-10, median rank, caption effect (cached in scores.json)."""
    run_dir = args.output_dir / f"{name}-seed{seed}"
    scores_file = run_dir / "scores.json"
    if scores_file.is_file():
        return json.loads(scores_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    torch_threads(threads)
    seconds = train(train_command(name, seed, args, encoder, run_dir), run_dir, threads)
    reference = Reference(args.data, args.resolution, encoder)
    scorer = Scorer(run_dir / "model", reference, args.guidance_scale, args.num_inference_steps)
    batch, points = RECIPES[name]["batch"], []
    for checkpoint in complete_checkpoints(run_dir / "model"):
        step = checkpoint_step(checkpoint)
        images = step * batch
        scores = scorer(checkpoint, run_dir / f"grid-{images:07d}.png")
        points.append({"images": images, "minutes": seconds[step] / 60, **scores})
        if not args.keep_checkpoints:
            shutil.rmtree(checkpoint)
    scores_file.write_text(json.dumps(points, indent=2))
    return points


# ----------------------------------------------------------------------------------------------------------------
# The report


def curve(points: list[dict], x: str, y: str) -> dict[float, float]:
    return {point[x]: point[y] for point in points}


SCORE_HEADER = ["top-1", "top-10", "top-10 / chance", "median rank", "effect"]


def score_cells(scores: dict, chance: float) -> list[str]:
    """A Scorer's scores as table cells, in SCORE_HEADER's order."""
    top1, top10 = scores["top1"], scores["top10"]
    rank, effect = scores["median_rank"], scores["caption_effect"]
    return [f"{top1:.1%}", f"{top10:.1%}", f"{top10 / chance:.1f}x", f"{rank:g}", f"{effect:.2f}"]


def format_table(runs: dict[tuple[str, int], list[dict]], chance: float) -> str:
    """A row per run and point: images, minutes, top-1, top-10 (x chance), median rank, caption effect."""
    header = ["recipe", "seed", "images", "minutes", *SCORE_HEADER]
    rows = [
        [name, str(seed), f"{p['images'] / 1000:g}k", f"{p['minutes']:.1f}", *score_cells(p, chance)]
        for (name, seed), points in runs.items()
        for p in points
    ]
    return markdown_table(header, rows)


def format_summary(runs: dict[tuple[str, int], list[dict]]) -> str:
    """Per recipe, its seeds' mean top-10 curve: images and minutes to each level, and its last point's values."""
    header = ["recipe", "seeds", "last top-10 (mean)", "median rank (median of seeds)"]
    header += [f"to {level:.0%} top-10: images / minutes" for level in TOP_LEVELS]
    by_images = mean_curves({run: curve(points, "images", "top10") for run, points in runs.items()})
    rows = []
    for name, (seeds, mean) in by_images.items():
        ranks = [points[-1]["median_rank"] for (recipe, _), points in runs.items() if recipe == name and points]
        cells = [name, str(seeds), f"{mean[max(mean)]:.1%}" if mean else "", f"{statistics.median(ranks):g}"]
        for level in TOP_LEVELS:
            images = interpolated_crossing(mean, level) if mean else None
            minutes = minutes_to(runs, name, level) if images is not None else None
            cells.append("not reached" if images is None else f"{images / 1000:.1f}k / {minutes:.1f}")
        rows.append(cells)
    return markdown_table(header, rows)


def minutes_to(runs: dict[tuple[str, int], list[dict]], name: str, level: float) -> float:
    """The mean, over the recipe's seeds, of each seed's interpolated minutes to reach a top-10 level (or its last)."""
    minutes = []
    for (recipe, _), points in runs.items():
        if recipe == name and points:
            crossed = interpolated_crossing(curve(points, "minutes", "top10"), level)
            minutes.append(crossed if crossed is not None else float("nan"))
    return sum(minutes) / len(minutes)


def write_report(runs: dict[tuple[str, int], list[dict]], reference_size: int, args) -> str:
    chance = 10 / reference_size
    text = f"{reference_size} training images: top-10 chance {chance:.2%}, top-1 chance {1 / reference_size:.3%}\n\n"
    text += format_table(runs, chance) + "\n\n" + format_summary(runs)
    print(text)
    (args.output_dir / "table.md").write_text(text + "\n")
    drawn = {run: points for run, points in runs.items() if points}
    if drawn and args.plot:
        title = f"caption retrieval top-10 ({args.data.name}, {args.resolution} px)"
        top = max(0.1, max(p["top10"] for points in drawn.values() for p in points))
        for x, label in (("images", "images seen"), ("minutes", "minutes of training")):
            path = args.plot.with_name(f"{args.plot.stem}-{x}{args.plot.suffix}")
            curves = {run: curve(points, x, "top10") for run, points in drawn.items()}
            plot(curves, path, title=title, x_label=label, levels=TOP_LEVELS, top=top)
        # the median rank moves long before top-10 does: as the share of training images the own image beats
        beaten = {
            run: {p["images"]: 1 - p["median_rank"] / reference_size for p in points} for run, points in drawn.items()
        }
        title = f"median sample: share of the {reference_size} training images its own image beats (chance 50%)"
        path = args.plot.with_name(f"{args.plot.stem}-rank{args.plot.suffix}")
        plot(beaten, path, title=title, x_label="images seen", levels=(0.5, 0.75), top=1.0, start=0.5)
    return text


def scored_runs(runs: list[tuple[str, int]], args) -> dict[tuple[str, int], list[dict]]:
    files = {run: args.output_dir / f"{run[0]}-seed{run[1]}" / "scores.json" for run in runs}
    return {run: json.loads(path.read_text()) for run, path in files.items() if path.is_file()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="An imagefolder with one caption per image.")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--model_size", default="tiny", help="The --model_size every recipe starts from.")
    parser.add_argument("--recipes", nargs="+", default=["defaults"], choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=25600, help="Images each run trains on.")
    parser.add_argument("--eval_every", type=int, default=6400, help="Score a checkpoint every this many images.")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="3: as real-images.md's tables scored.")
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=10,
        help="DPM-Solver++ steps per sample (10: scoring costs a quarter of 25).",
    )
    parser.add_argument("--jobs", type=int, default=2, help="Runs at once (CPU threads are shared).")
    parser.add_argument("--output_dir", type=Path, default=Path("out/retrieval"))
    parser.add_argument("--plot", type=Path, help="Draw top-10 against images and minutes: PLOT-images.png, ...")
    parser.add_argument("--keep_checkpoints", action="store_true")
    parser.add_argument("--report_only", action="store_true", help="Table the runs that have scores; train nothing.")
    args = parser.parse_args(argv)
    args.data = args.data.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name in args.recipes:
        if RECIPES[name]["batch"] and args.eval_every % RECIPES[name]["batch"]:
            parser.error(f"--eval_every {args.eval_every} is not a whole number of {name!r}'s batches")
    runs = [(name, seed) for name in args.recipes for seed in args.seeds]
    encoder = prepare_encoder(args.data, args.output_dir)
    if not args.report_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        # spawned processes: pipeline loading and torch's thread count are process-wide
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            # seed by seed: a sweep cut short still compares every recipe on the seeds it finished
            by_seed = sorted(runs, key=lambda run: args.seeds.index(run[1]))
            futures = [pool.submit(run_recipe, *run, args, encoder, threads) for run in by_seed]
            for future in futures:
                future.result()
    size = len(Reference(args.data, args.resolution, encoder))
    return write_report(scored_runs(runs, args), size, args)


if __name__ == "__main__":
    main()
