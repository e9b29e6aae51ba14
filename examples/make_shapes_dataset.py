"""Draw a captioned dataset of coloured shapes: the quickstart's data, made with no download.

Each image is one filled shape on a white background, captioned with what is in it:
"a large red circle", "a small blue triangle", ... Colour, shape and size vary; the position
jitters, so the model has to learn the words rather than one picture per caption. The folder is
an `imagefolder` (PNG files + metadata.jsonl), the same layout users train on.

    python examples/make_shapes_dataset.py --output_dir data/shapes --count 4000 --resolution 32
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.4, 0.55), "large": (0.7, 0.9)}  # side / diameter as a share of the image
BACKGROUND = (255, 255, 255)
SUPERSAMPLE = 4  # drawn 4x larger and downsampled, so edges are anti-aliased


def shape_outline(shape: str, centre: tuple[float, float], extent: float) -> list[tuple[float, float]] | tuple:
    """Polygon points (square, triangle) or a bounding box (circle) of side/diameter `extent`."""
    x, y = centre
    half = extent / 2
    if shape == "circle":
        return (x - half, y - half, x + half, y + half)
    if shape == "square":
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    height = extent * math.sqrt(3) / 2  # equilateral, pointing up, centred on its bounding box
    return [(x, y - height / 2), (x + half, y + height / 2), (x - half, y + height / 2)]


def draw_shape(shape: str, colour: str, size: str, resolution: int, rng: random.Random) -> Image.Image:
    """One anti-aliased shape at a random size within `size`'s range and a random position."""
    canvas = resolution * SUPERSAMPLE
    extent = rng.uniform(*SIZES[size]) * canvas
    margin = extent / 2 + canvas * 0.04
    centre = (rng.uniform(margin, canvas - margin), rng.uniform(margin, canvas - margin))
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    outline = shape_outline(shape, centre, extent)
    if shape == "circle":
        draw.ellipse(outline, fill=COLOURS[colour])
    else:
        draw.polygon(outline, fill=COLOURS[colour])
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def caption(colour: str, shape: str, size: str) -> str:
    return f"a {size} {colour} {shape}"


def all_prompts() -> list[tuple[str, str, str]]:
    """Every (colour, shape, size) the dataset draws, in a fixed order."""
    return [(colour, shape, size) for colour in COLOURS for shape in SHAPES for size in SIZES]


def make_shapes_dataset(output_dir: str | Path, count: int, resolution: int, seed: int = 0) -> Path:
    """Write `count` PNGs and metadata.jsonl; every (colour, shape, size) appears equally often."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combinations = all_prompts()
    rows = []
    for index in range(count):
        colour, shape, size = combinations[index % len(combinations)]
        file_name = f"{index:05d}.png"
        draw_shape(shape, colour, size, resolution, rng).save(output_dir / file_name)
        rows.append({"file_name": file_name, "text": caption(colour, shape, size)})
    with open(output_dir / "metadata.jsonl", "w") as metadata:
        metadata.writelines(json.dumps(row) + "\n" for row in rows)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("data/shapes"))
    parser.add_argument("--count", type=int, default=4000, help="Number of images.")
    parser.add_argument("--resolution", type=int, default=32, help="Image side in pixels.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 1 or args.resolution < 8:
        parser.error("--count must be at least 1 and --resolution at least 8")
    make_shapes_dataset(args.output_dir, args.count, args.resolution, args.seed)
    print(f"wrote {args.count} {args.resolution}px images and metadata.jsonl to {args.output_dir}")


if __name__ == "__main__":
    main()
