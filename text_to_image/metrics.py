"""The evaluation metrics a run logs, each named once here: the name it has in TensorBoard/W&B, in
evaluation.jsonl and in the model card, and whether `--keep_best` can choose it.

A new metric: add it below, compute it in `evaluation`, and return it under `metric.logged`; the
summary line, the model card, `--keep_best` and the example scripts follow."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    logged: str  # its name wherever it is written
    keep_best: str | None = None  # its `--keep_best` choice; keeping the lowest value must make sense
    needs: str | None = None  # what `--keep_best` of it needs, for the error that says so


VAL_LOSS = Metric(
    "val/loss", keep_best="val_loss", needs="held-out images: pass --validation_split or --validation_data_dir"
)
# samples of different captions from one noise, against samples of one caption from different noises: ~0 when the
# UNet ignores its text (evaluation.caption_effect)
CAPTION_EFFECT = Metric("text/caption_effect")
COPY_RATE = Metric("memorization/copy_rate")  # of a grid's samples
NEAREST_DISTANCE = Metric("memorization/nearest_distance_median")
COPY_THRESHOLD = Metric("memorization/copy_threshold")
FD = Metric("eval/fd", keep_best="fd", needs="--eval_feature_model (e.g. facebook/dinov2-small)")
KID = Metric("eval/kid", keep_best="kid", needs="--eval_feature_model (e.g. facebook/dinov2-small)")
CLIP_SCORE = Metric("eval/clip_score")
EVAL_COPY_RATE = Metric("eval/copy_rate")  # of the --eval_num_images samples

# the run's last line shows these, in this order, when measured
SUMMARY = (VAL_LOSS, CAPTION_EFFECT, COPY_RATE, FD, KID, CLIP_SCORE, EVAL_COPY_RATE)
KEEP_BEST = {metric.keep_best: metric for metric in SUMMARY if metric.keep_best is not None}
