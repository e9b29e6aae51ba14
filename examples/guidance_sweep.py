"""Which guidance scale and sampler steps draw the thing named? Trained runs re-scored, nothing retrained.

Sampling settings can change after training, so they are measured on runs that already exist: each run
that `retrieval_curve.py --keep_checkpoints` trained is scored as that script scores it (64 fixed captions
x 4 shared noises, each sample's own training image ranked among all the training images by pixel
distance; top-1, top-10, median rank and the caption effect), once per guidance scale and number of
DPM-Solver++ steps, at its last kept checkpoint (or at --images). The table has a row per run and
setting and, for several runs, the mean of each setting; each setting saves its grid of 8 captions
(`guidance-G-steps-S.png` in the run's folder).

    python examples/retrieval_curve.py --data data/minecraft --recipes defaults --seeds 0 1 2 \\
        --images 38400 --keep_checkpoints --output_dir out/retrieval-mc16
    python examples/guidance_sweep.py --data data/minecraft --runs out/retrieval-mc16/defaults-seed* \\
        --guidance_scales 1 3 5 7.5 10 --num_inference_steps 10 25
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from adherence_curve import checkpoint_step, complete_checkpoints, markdown_table  # noqa: E402
from retrieval_curve import DEFAULT_BATCH, SCORE_HEADER, Reference, Scorer, score_cells  # noqa: E402

MEANED = ("top1", "top10", "caption_effect")  # and the median rank's median


def chosen_checkpoint(run: Path, images: int | None, batch: int) -> Path:
    """The run's checkpoint at `images` (its last kept one when None); a missing one is named with what there is."""
    checkpoints = complete_checkpoints(run / "model")
    if not checkpoints:
        raise SystemExit(f"{run}: no kept checkpoints (train it with retrieval_curve.py --keep_checkpoints)")
    if images is None:
        return checkpoints[-1]
    by_images = {checkpoint_step(checkpoint) * batch: checkpoint for checkpoint in checkpoints}
    if images not in by_images:
        kept = ", ".join(f"{seen}" for seen in sorted(by_images))
        raise SystemExit(f"{run}: no checkpoint at --images {images} (kept: {kept})")
    return by_images[images]


def trained_resolution(runs: list[Path]) -> int:
    """The runs' resolution, from their saved pipelines; a run without one (still training?) is named."""
    configs = [run / "model" / "unet" / "config.json" for run in runs]
    missing = [str(run) for run, config in zip(runs, configs, strict=True) if not config.is_file()]
    if missing:
        raise SystemExit(f"no saved pipeline in {', '.join(missing)} (still training?): nothing to sample with")
    return json.loads(configs[0].read_text())["sample_size"]


def score_run(run: Path, reference: Reference, settings: list[tuple[float, int]], checkpoint: Path) -> list[dict]:
    """One row per (guidance, steps): the retrieval scores of `checkpoint`'s EMA weights, and its grid."""
    scorer = Scorer(run / "model", reference, guidance=settings[0][0], steps=settings[0][1])
    rows = []
    for guidance, steps in settings:
        scorer.guidance, scorer.steps = guidance, steps
        scores = scorer(checkpoint, run / f"guidance-{guidance:g}-steps-{steps}.png")
        rows.append({"run": run.name, "guidance": guidance, "steps": steps, **scores})
        print(f"{run.name}, guidance {guidance:g}, {steps} steps: top-10 {scores['top10']:.1%}", flush=True)
    return rows


def format_rows(rows: list[dict], chance: float) -> list[list[str]]:
    return [[row["run"], f"{row['guidance']:g}", str(row["steps"]), *score_cells(row, chance)] for row in rows]


def mean_rows(rows: list[dict], settings: list[tuple[float, int]]) -> list[dict]:
    """Per setting, the mean of each score over the runs (the median rank's median)."""
    means = []
    for guidance, steps in settings:
        same = [row for row in rows if (row["guidance"], row["steps"]) == (guidance, steps)]
        mean = {name: statistics.fmean(row[name] for row in same) for name in MEANED}
        mean["median_rank"] = statistics.median(row["median_rank"] for row in same)
        means.append({"run": f"mean of {len(same)}", "guidance": guidance, "steps": steps, **mean})
    return means


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="The imagefolder the runs trained on.")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="Run folders of retrieval_curve.py.")
    parser.add_argument("--images", type=int, help="Score the checkpoint at this many images (default: the last).")
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="The runs' batch (images per checkpoint step)."
    )
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5])
    parser.add_argument("--num_inference_steps", type=int, nargs="+", default=[10])
    parser.add_argument("--output", type=Path, help="Also write the table here (markdown).")
    args = parser.parse_args(argv)
    settings = list(itertools.product(args.guidance_scales, args.num_inference_steps))
    # the runs of one sweep share the caption-vocabulary encoder retrieval_curve.py made beside them
    encoder = args.runs[0].parent / "text-encoder"
    resolution = trained_resolution(args.runs)
    reference = Reference(args.data.resolve(), resolution, encoder)
    rows = []
    for run in args.runs:
        checkpoint = chosen_checkpoint(run, args.images, args.batch)
        rows += score_run(run, reference, settings, checkpoint)
    chance = 10 / len(reference)
    if len(args.runs) > 1:
        rows += mean_rows(rows, settings)
    header = ["run", "guidance", "steps", *SCORE_HEADER]
    text = f"{len(reference)} training images: top-10 chance {chance:.2%}\n\n"
    text += markdown_table(header, format_rows(rows, chance))
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
