"""Plot runs' evaluation.jsonl side by side (PIL, no matplotlib): loss and copy rate against steps.

    python examples/plot_evaluations.py --runs small=out/emoji-150 all=out/emoji-all --output curves.png

Top: the validation loss (solid) and the training loss read from the run's TensorBoard events
(dotted, when --logger tensorboard wrote them); bottom: the memorization copy rate of each grid.
Runs with the same batch size see the same images at the same step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from text_to_image.metrics import COPY_RATE, VAL_LOSS  # noqa: E402

PALETTE = [(200, 40, 40), (40, 90, 220), (30, 150, 60), (230, 140, 20), (140, 50, 170)]
WIDTH, PANEL, MARGIN = 720, 260, 56


def read_evaluations(output_dir: Path) -> list[dict]:
    path = output_dir / "evaluation.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_training_loss(output_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for events in sorted(output_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "loss" in accumulator.Tags()["scalars"]:
            points |= {event.step: event.value for event in accumulator.Scalars("loss")}
    return sorted(points.items())


def smooth(points: list[tuple[int, float]], window: int = 5) -> list[tuple[int, float]]:
    values = [value for _, value in points]
    return [
        (step, sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]))
        for i, (step, _) in enumerate(points)
    ]


def panel(draw, top: int, title: str, series: list, low: float, high: float, last_step: int) -> None:
    """One chart: `series` = [(colour, dotted, [(step, value)])], y from low to high."""

    def x_of(step):
        return MARGIN + (WIDTH - 2 * MARGIN) * step / last_step

    def y_of(value):
        return top + PANEL - MARGIN // 2 - (PANEL - MARGIN) * (value - low) / (high - low)

    bottom = top + PANEL - MARGIN // 2
    draw.line([(MARGIN, top + MARGIN // 2), (MARGIN, bottom), (WIDTH - MARGIN, bottom)], fill="black")
    draw.text((MARGIN, top + 6), title, fill="black")
    for value in (low, (low + high) / 2, high):
        draw.text((4, y_of(value) - 6), f"{value:.3g}", fill="black")
    draw.text((WIDTH - MARGIN - 20, bottom + 4), str(last_step), fill="black")
    for colour, dotted, points in series:
        xy = [(x_of(step), y_of(min(max(value, low), high))) for step, value in points]
        if dotted:
            for point in xy[::2]:
                draw.ellipse([point[0] - 1, point[1] - 1, point[0] + 1, point[1] + 1], fill=colour)
        elif len(xy) > 1:
            draw.line(xy, fill=colour, width=2)


def plot(runs: dict[str, Path], output: Path) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, 2 * PANEL + 30), "white")
    draw = ImageDraw.Draw(image)
    losses, copies, last_step = [], [], 1
    for index, (name, folder) in enumerate(runs.items()):
        colour = PALETTE[index % len(PALETTE)]
        records = read_evaluations(folder)
        validation = [(r["step"], r[VAL_LOSS.logged]) for r in records if VAL_LOSS.logged in r]
        copy_rate = [(r["step"], r[COPY_RATE.logged]) for r in records if COPY_RATE.logged in r]
        training = smooth(read_training_loss(folder))
        losses += [(colour, False, validation), (colour, True, training)]
        copies.append((colour, False, copy_rate))
        last_step = max([last_step] + [step for step, _ in validation + copy_rate + training])
        draw.text((WIDTH - MARGIN - 160, 6 + 14 * index), f"{name}", fill=colour)
    values = [value for _, _, points in losses for _, value in points]
    values.sort()
    high = values[int(0.98 * (len(values) - 1))] if values else 1.0  # the first steps' loss would flatten the rest
    panel(draw, 0, "loss: validation (line), training (dots)", losses, min(values or [0]), high, last_step)
    panel(draw, PANEL, "memorization copy rate of the grid samples", copies, 0.0, 1.0, last_step)
    draw.text((WIDTH // 2 - 40, 2 * PANEL + 10), "optimizer steps", fill="black")
    image.save(output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=OUTPUT_DIR for each run.")
    parser.add_argument("--output", type=Path, required=True, help="The PNG to write.")
    args = parser.parse_args(argv)
    runs = dict(run.split("=", 1) for run in args.runs)
    plot({name: Path(folder) for name, folder in runs.items()}, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
