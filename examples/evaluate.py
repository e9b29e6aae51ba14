"""Evaluate any trained output folder the way the trainer does, so two runs compare after the fact.

    python examples/evaluate.py --model out/run-a --data data/emoji --validation_data_dir data/emoji-val
    python examples/evaluate.py --model out/run-a/best --data data/emoji \
        --eval_feature_model facebook/dinov2-small --eval_clip_model openai/clip-vit-base-patch32

--data is the training data: its images are what a sample may copy and what FD/KID compare with. The
validation loss is read on --validation_data_dir, or on the rows --validation_split holds out of --data
(the same rows the trainer held out with the same flag: they depend on the data only). The metrics are
the trainer's, computed by its own functions: validation loss at fixed noise and timestep buckets, copy
rate and nearest distance of --num_images samples (prompts = captions of fixed training rows, fixed
seeds), and with the models given FD, KID and CLIP score.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from text_to_image.common import UserError  # noqa: E402
from text_to_image.config import DataConfig, EvalConfig  # noqa: E402
from text_to_image.data import read_image_table  # noqa: E402
from text_to_image.evaluation import (  # noqa: E402
    Checks,
    SampleQuality,
    TrainingReference,
    ValidationSet,
    to_uint8_batch,
)
from text_to_image.loss import weighting_for  # noqa: E402
from text_to_image.metrics import COPY_RATE, EVAL_COPY_RATE  # noqa: E402
from text_to_image.outputs import sample_images  # noqa: E402
from text_to_image.setup import (  # noqa: E402
    hold_out_rows,
    read_validation_folder,  # noqa: E402
    without_rows,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="A trained output folder (or its best/).")
    parser.add_argument("--data", required=True, help="The training imagefolder (what samples may copy).")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--validation_data_dir", help="Held-out imagefolder for the validation loss.")
    parser.add_argument(
        "--validation_split", type=float, default=0.02, help="As the trainer's flag, when no --validation_data_dir."
    )
    parser.add_argument(
        "--eval_feature_model", help="transformers image model for FD/KID (e.g. facebook/dinov2-small)."
    )
    parser.add_argument("--eval_clip_model", help="transformers CLIP model for the CLIP score.")
    parser.add_argument("--num_images", type=int, default=256, help="Samples for copy rate, FD, KID, CLIP score.")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=32, help="Samples generated at once.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snr_gamma", type=float, help="Loss weighting (default: the model card's, else 5).")
    parser.add_argument("--output_json", type=Path, help="Also write the metrics here.")
    return parser.parse_args(argv)


def training_flags(model: Path) -> dict:
    """The flags the model card recorded (empty when there is no card)."""
    card = model / "README.md"
    found = re.search(r"## Training flags\s+```json\n(.*?)\n```", card.read_text(), re.S) if card.is_file() else None
    return json.loads(found.group(1)) if found else {}


def data_config(args: argparse.Namespace, resolution: int) -> DataConfig:
    return DataConfig(
        train_data_dir=args.data,
        image_column=args.image_column,
        caption_column=args.caption_column,
        resolution=resolution,
        center_crop=True,
        image_cache_max_gb=float("inf"),
        caption_cache=False,
        train_batch_size=1,
    )


def split_data(args: argparse.Namespace, config: DataConfig):
    """(training table, validation set or None), held out as the trainer holds out."""
    table = read_image_table(config, None, show_progress=True)
    if args.validation_data_dir:
        return table, read_validation_folder(config, args.validation_data_dir, show_progress=True)
    held_out = hold_out_rows(table.usable_rows, args.validation_split) if args.validation_split > 0 else []
    if len(held_out) == 0:
        return table, None
    validation = ValidationSet.from_table(table, held_out.tolist(), config.resolution)
    return without_rows(table, held_out), validation


def generate(pipeline, prompts: list[str], args: argparse.Namespace) -> list:
    images = []
    for index, start in enumerate(range(0, len(prompts), args.batch_size)):
        chunk = prompts[start : start + args.batch_size]
        images += sample_images(
            pipeline, chunk, len(chunk), args.num_inference_steps, args.guidance_scale, args.seed + index
        )[0]
    return images


def evaluate(args: argparse.Namespace) -> dict:
    from diffusers import DDPMScheduler

    from pipeline_text_to_image import TextToImagePipeline, encode_text, is_flow_matching

    pipeline = TextToImagePipeline.from_pretrained(args.model)
    pipeline.set_progress_bar_config(disable=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.to(device)
    resolution = pipeline.unet.config.sample_size
    table, validation = split_data(args, data_config(args, resolution))
    flags = training_flags(args.model)
    snr_gamma = args.snr_gamma if args.snr_gamma is not None else flags.get("snr_gamma", 5.0)
    evaluation = EvalConfig(
        validation_split=args.validation_split,
        validation_data_dir=args.validation_data_dir,
        eval_feature_model=args.eval_feature_model,
        eval_clip_model=args.eval_clip_model,
        eval_num_images=args.num_images,
    )
    quality = SampleQuality(table=table, config=evaluation, resolution=resolution, device=device, cache_dir=None)
    reference = TrainingReference.from_table(table, resolution)
    metrics = {}
    with torch.no_grad():
        if validation is not None:
            checks = Checks(
                validation=validation,
                reference=reference,
                quality=quality,
                embed=lambda texts: encode_text(
                    pipeline.tokenizer, pipeline.text_encoder, texts, pipeline.text_max_length, device
                ),
                weighting=weighting_for(snr_gamma, flags.get("min_snr_variant", "snr")),
                keep_best=None,
            )
            # a flow-matching model's sampler is its training scheduler; a DDPM one's keeps the training betas
            config = pipeline.scheduler.config
            noise_scheduler = pipeline.scheduler if is_flow_matching(config) else DDPMScheduler.from_config(config)
            metrics |= checks.validate(pipeline.unet, noise_scheduler)
        images = generate(pipeline, quality.prompts, args)
        metrics |= quality.measure(images)
        copies = reference.memorization(to_uint8_batch(images, resolution))[0]
    return metrics | {EVAL_COPY_RATE.logged: copies[COPY_RATE.logged]} | copies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = evaluate(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    width = max(len(name) for name in metrics)
    print(f"{'metric':<{width}}  value\n{'-' * width}  ------")
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.6g}")
    if args.output_json:
        args.output_json.write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
