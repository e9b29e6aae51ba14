"""Score a model trained on the shapes dataset: does it draw what the prompt says?

For every (colour, shape, size) prompt of `make_shapes_dataset.py` it generates a few images and
reads back, with plain pixel rules, the dominant colour (nearest palette colour of the inked
pixels), the shape (an upward triangle has a third of its ink in the top half of its bounding
box; a square fills the box's corners, a circle leaves them empty) and the size (the box's
side). It reports the share of images whose colour, shape and size match the prompt. `--dataset` scores the training images instead, to
show how reliable the pixel rules themselves are.

    python examples/evaluate_shapes.py --model out/shapes --grid out/shapes/evaluation.png
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the repository root: pipeline_text_to_image, imported (with torch) only when generating
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from make_shapes_dataset import BACKGROUND, COLOURS, SHAPES, SIZES, all_prompts, caption  # noqa: E402

MIN_INK = 80  # an image whose most inked pixels are this close to white holds no shape
TRIANGLE_BALANCE = 0.7  # ink in the top half / bottom half: ~0.33 for an upward triangle, ~1 otherwise
SQUARE_CORNERS = 0.3  # mean coverage of the bounding box's corner pixels: ~1 for a square, ~0 for a circle
LARGE_EXTENT = (SIZES["small"][1] + SIZES["large"][0]) / 2


@dataclass
class Reading:
    colour: str | None
    shape: str | None
    size: str | None

    def matches(self, colour: str, shape: str, size: str) -> dict[str, bool]:
        return {"colour": self.colour == colour, "shape": self.shape == shape, "size": self.size == size}


def read_image(image: np.ndarray) -> Reading:
    """Colour, shape and size of the one shape in an [H, W, 3] uint8 image (None when there is none).

    Coverage is measured relative to the shape's own ink (distance from white), so anti-aliased or
    slightly faded edges count as partly covered whatever the colour; the shape is then told by
    where the ink lies in its bounding box rather than by exact areas, which 16 px cannot resolve.
    """
    pixels = image.astype(np.float64)
    ink = np.abs(pixels - np.array(BACKGROUND)).max(axis=-1)
    full_ink = np.percentile(ink, 98)
    if full_ink < MIN_INK:
        return Reading(None, None, None)
    coverage = np.clip(ink / full_ink, 0, 1)
    rows, cols = np.nonzero(coverage > 0.5)
    box = coverage[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height = box.shape[0]
    balance = box[: height // 2].sum() / max(box[(height + 1) // 2 :].sum(), 1e-6)
    corners = np.mean([box[0, 0], box[0, -1], box[-1, 0], box[-1, -1]])
    shape = "triangle" if balance < TRIANGLE_BALANCE else "square" if corners > SQUARE_CORNERS else "circle"
    size = "large" if max(box.shape) / image.shape[0] > LARGE_EXTENT else "small"
    names = list(COLOURS)
    median = np.median(pixels[coverage > 0.5], axis=0)
    distances = [np.abs(median - np.array(COLOURS[name])).sum() for name in names]
    return Reading(names[int(np.argmin(distances))], shape, size)


def score(readings: list[tuple[Reading, tuple[str, str, str]]]) -> dict[str, float]:
    """Share of images matching the prompt in colour, shape, size, and in all three."""
    matches = [reading.matches(*prompt) for reading, prompt in readings]
    shares = {key: float(np.mean([m[key] for m in matches])) for key in ("colour", "shape", "size")}
    shares["all"] = float(np.mean([all(m.values()) for m in matches]))
    return shares


def chance_levels() -> dict[str, float]:
    return {
        "colour": 1 / len(COLOURS),
        "shape": 1 / len(SHAPES),
        "size": 1 / len(SIZES),
        "all": 1 / (len(COLOURS) * len(SHAPES) * len(SIZES)),
    }


def format_scores(shares: dict[str, float], what: str) -> str:
    chance = chance_levels()
    parts = [f"{key} {shares[key]:.0%} (chance {chance[key]:.0%})" for key in ("colour", "shape", "size", "all")]
    return f"{what}: " + ", ".join(parts)


def generate(model: Path, images_per_prompt: int, steps: int, guidance: float, seed: int, scheduler: str | None):
    """Images for every prompt, one batched pipeline call per prompt group; returns (uint8 array, prompt)."""
    import torch

    from pipeline_text_to_image import load_pipeline

    pipeline = load_pipeline(model, scheduler, "cpu", None)
    pipeline.set_progress_bar_config(disable=True)
    prompts = all_prompts()
    generator = torch.Generator().manual_seed(seed)
    images = pipeline(
        [caption(*prompt) for prompt in prompts],
        num_images_per_prompt=images_per_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="np",
    ).images
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    labels = [prompt for prompt in prompts for _ in range(images_per_prompt)]
    return list(zip(pixels, labels, strict=True))


def dataset_images(folder: Path):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    by_caption = {caption(*prompt): prompt for prompt in all_prompts()}
    return [(np.asarray(Image.open(folder / row["file_name"]).convert("RGB")), by_caption[row["text"]]) for row in rows]


def save_grid(samples, columns: int, path: Path) -> None:
    """All images, one row per prompt, in prompt order: a quick look at what the scores mean."""
    size = samples[0][0].shape[0]
    rows = (len(samples) + columns - 1) // columns
    grid = Image.new("RGB", (columns * size, rows * size), BACKGROUND)
    for index, (pixels, _) in enumerate(samples):
        grid.paste(Image.fromarray(pixels), ((index % columns) * size, (index // columns) * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="A trained output_dir (a saved TextToImagePipeline).")
    source.add_argument("--dataset", type=Path, help="A make_shapes_dataset.py folder: score the pixel rules.")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument(
        "--scheduler",
        help="Sampler: ddpm, ddim, dpm, euler or unipc; default: the model's saved one (euler for flow matching).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, help="Also save every generated image as one grid PNG here.")
    args = parser.parse_args(argv)
    if args.dataset:
        if not (args.dataset / "metadata.jsonl").is_file():
            parser.error(f"--dataset {args.dataset}: no metadata.jsonl there; make it with make_shapes_dataset.py")
        samples, what = dataset_images(args.dataset), f"training images ({args.dataset})"
    else:
        if not (args.model / "model_index.json").is_file():
            parser.error(f"--model {args.model}: no model_index.json there; train first (examples/quickstart.sh)")
        from pipeline_text_to_image import IncompatibleSampler

        try:
            samples = generate(
                args.model,
                args.images_per_prompt,
                args.num_inference_steps,
                args.guidance_scale,
                args.seed,
                args.scheduler,
            )
        except IncompatibleSampler as error:
            parser.error(f"--scheduler: {error}")
        what = f"{len(samples)} generated images ({args.model})"
    if args.grid:
        save_grid(samples, args.images_per_prompt * len(SIZES), args.grid)
    shares = score([(read_image(pixels), prompt) for pixels, prompt in samples])
    print(format_scores(shares, what))
    return shares


if __name__ == "__main__":
    main()
