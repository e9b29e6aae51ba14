"""Does the model use its caption? Caption retrieval and the caption effect, and the benchmark built on them."""

from __future__ import annotations

import json
import math

import pytest
import retrieval_curve
import torch
from conftest import caption_of_pixels, run_error, run_ok, write_imagefolder

from text_to_image.evaluation import EVALUATION_LOG, caption_effect, retrieval_ranks
from text_to_image.metrics import CAPTION_EFFECT, VAL_LOSS


def flat_images(*values: int, size: int = 4) -> torch.Tensor:
    """uint8 [N, 3, size, size], image i filled with values[i]."""
    return torch.tensor(values, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, size, size).contiguous()


def test_retrieval_ranks_count_the_training_images_nearer_than_the_own_one():
    reference = flat_images(0, 50, 100, 200)  # a sample of 60 is 60, 10, 40, 140 away: 50 < 100 < 0 < 200
    samples = flat_images(60, 60, 60, 60)
    ranks = retrieval_ranks(samples, reference, own=torch.tensor([1, 2, 0, 3]))
    assert ranks.tolist() == [1, 2, 3, 4]


def test_a_tie_with_the_own_image_counts_for_the_sample_and_one_level_nearer_does_not():
    ranks = retrieval_ranks(flat_images(75, 75, 75), flat_images(50, 100, 0), own=torch.tensor([1, 0, 2]))
    assert ranks.tolist() == [1, 1, 3]  # 50 and 100 are both 25 away
    one_pixel_nearer = flat_images(75, 75, size=32)
    one_pixel_nearer[1, 0, 0, 0] = 74
    assert retrieval_ranks(flat_images(74, size=32), one_pixel_nearer, own=torch.tensor([0])).tolist() == [2]


def noise_and_caption_samples(caption_step: int, noise_step: int) -> torch.Tensor:
    """[3 captions, 2 noises, 3, 4, 4]: sample (c, n) is flat at 10 + c * caption_step + n * noise_step."""
    values = [10 + c * caption_step + n * noise_step for c in range(3) for n in range(2)]
    return flat_images(*values).reshape(3, 2, 3, 4, 4)


def test_caption_effect_is_zero_when_only_the_noise_changes_a_sample():
    assert caption_effect(noise_and_caption_samples(caption_step=0, noise_step=40)) == 0


def test_caption_effect_is_the_caption_distance_over_the_noise_distance():
    # captions 30 apart: pairs at distances 30, 60, 30 (mean 40); noises 40 apart: 40. So 40 / 40
    assert caption_effect(noise_and_caption_samples(caption_step=30, noise_step=40)) == pytest.approx(1.0)
    # captions 60 apart (mean 80) against noises 20 apart: 4
    assert caption_effect(noise_and_caption_samples(caption_step=60, noise_step=20)) == pytest.approx(4.0)


def test_a_run_logs_the_caption_effect_with_each_validation_loss(argv, tmp_path):
    run_ok(argv("--validation_split", "4", "--validation_steps", "2", "--eval_batch_size", "4"))
    records = [json.loads(line) for line in (tmp_path / "out" / EVALUATION_LOG).read_text().splitlines()]
    validated = [record for record in records if VAL_LOSS.logged in record]
    assert [record["step"] for record in validated] == [2, 4]
    assert all(math.isfinite(record[CAPTION_EFFECT.logged]) for record in validated)
    assert all(record[CAPTION_EFFECT.logged] > 0 for record in validated)


def test_the_benchmark_scores_captions_of_trained_images_each_with_its_own_image(tmp_path, tiny_text_encoder_dir):
    data = write_imagefolder(tmp_path / "data", count=100)  # --validation_split 0.02 holds out 2
    reference = retrieval_curve.Reference(data, 16, tiny_text_encoder_dir)
    assert len(reference) == 100 and reference.images.shape == (100, 3, 16, 16)
    assert len(reference.captions) == retrieval_curve.CAPTIONS == len(set(reference.own.tolist()))
    for own, caption in zip(reference.own.tolist(), reference.captions, strict=True):
        assert caption_of_pixels(reference.images[own]) == caption
    again = retrieval_curve.Reference(data, 16, tiny_text_encoder_dir)
    assert torch.equal(again.own, reference.own)  # every recipe and seed scores the same captions


def test_the_benchmark_leaves_the_validation_splits_images_out_of_the_scored_captions(tmp_path, tiny_text_encoder_dir):
    from text_to_image.setup import hold_out_rows

    data = write_imagefolder(tmp_path / "data", count=80)
    held_out = set(hold_out_rows(torch.arange(80), 0.02).tolist())
    assert len(held_out) == 1
    reference = retrieval_curve.Reference(data, 16, tiny_text_encoder_dir)
    assert len(reference.captions) == retrieval_curve.CAPTIONS
    assert not held_out & set(reference.own.tolist())


def test_the_benchmark_tables_each_point_and_each_recipes_mean_crossings():
    points = [
        {"images": 6400, "minutes": 2.0, "top1": 0.0, "top10": 0.04, "median_rank": 300.0, "caption_effect": 0.5},
        {"images": 12800, "minutes": 4.0, "top1": 0.01, "top10": 0.12, "median_rank": 120.0, "caption_effect": 0.9},
    ]
    runs = {("defaults", 0): points, ("defaults", 1): [dict(p, top10=p["top10"] / 2) for p in points]}
    table = retrieval_curve.format_table(runs, chance=10 / 1000)
    assert "| defaults | 0 | 12.8k | 4.0 | 1.0% | 12.0% | 12.0x | 120 | 0.90 |" in table
    summary = retrieval_curve.format_summary(runs)
    # the seeds' mean curve: 3% at 6.4k, 9% at 12.8k; 5% is crossed a third of the way, at 8.5k images; seed 0's
    # minutes curve crosses 5% at 2.25 min, seed 1's (2%, 6%) at 3.5 min: 2.9 on average
    assert "| defaults | 2 | 9.0% | 120 | 8.5k / 2.9 | not reached | not reached |" in summary


def test_pooled_text_adds_the_pooled_caption_to_the_unet_and_the_pipeline_samples_with_it(argv, tmp_path):
    from diffusers import UNet2DConditionModel

    run_ok(argv("--max_train_steps", "2"))  # on by default since 2026-12-07
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet")
    assert unet.config.addition_embed_type == "text" and unet.add_embedding is not None
    assert unet.config.addition_embed_type_num_heads == 64  # a divisor of the 64-wide test encoder
    assert list((tmp_path / "out" / "samples").glob("*.png"))  # its grid sampled through the pipeline


def test_no_pooled_text_parses_and_a_config_keeps_its_own_addition_embedding(tmp_path):
    from text_to_image.config import parse_args
    from text_to_image.models import build_unet, default_unet_config

    assert parse_args(["--pooled_text", "--no-pooled_text"]).pooled_text is False  # the spelling errors name
    assert build_unet(None, 16, 64, "tiny", pooled_text=True).config.addition_embed_type == "text"
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(default_unet_config(16, "tiny") | {"addition_embed_type": "text_image"}))
    assert build_unet(str(config), 16, 64, pooled_text=True).config.addition_embed_type == "text_image"


def test_the_recipes_of_the_old_defaults_train_as_the_trainer_did_before_2026_12_07():
    import adherence_curve

    from text_to_image.config import parse_args

    old = {"min_snr_variant": "snr", "pooled_text": False}
    new = {"min_snr_variant": "snr_plus_one", "pooled_text": True}
    flags_of = {
        "retrieval defaults until 2026-12-07": retrieval_curve.RECIPES["defaults until 2026-12-07"]["flags"],
        "adherence tiny defaults until 2026-12-07": adherence_curve.RECIPES["tiny defaults until 2026-12-07"]["flags"],
        "adherence quickstart-UNet recipes": adherence_curve.COMMON_FLAGS,
        "retrieval defaults": retrieval_curve.RECIPES["defaults"]["flags"],
    }
    for name, flags in flags_of.items():
        parsed = vars(parse_args(list(flags)))
        assert {key: parsed[key] for key in old} == (new if name == "retrieval defaults" else old), name


def test_resuming_with_pooled_text_turned_on_or_off_is_refused_in_one_line(argv, capsys):
    run_ok(argv("--max_train_steps", "2", "--no-pooled_text"))  # as a run from before the default changed
    error = run_error(argv("--max_train_steps", "4", "--resume_from_checkpoint", "latest"), capsys)
    assert "that run trained without --pooled_text" in error and "pass --no-pooled_text to resume it" in error
    assert "a run started before then also needs --min_snr_variant snr" in error
    assert "Traceback" not in error and len([line for line in error.splitlines() if "pooled_text" in line]) == 1
    run_ok(argv("--max_train_steps", "4", "--overwrite_output_dir"))
    error = run_error(argv("--max_train_steps", "6", "--no-pooled_text", "--resume_from_checkpoint", "latest"), capsys)
    assert "that run trained with --pooled_text" in error and "pass --pooled_text to resume it, or" in error


def test_the_pooled_captions_key_bias_gets_no_gradient_so_no_machine_walks_it_on_rounding_noise():
    from text_to_image.models import build_unet

    torch.manual_seed(0)
    unet = build_unet(None, 16, 64, "tiny", pooled_text=True)
    text = torch.randn(2, 5, 64)
    unet(
        torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), encoder_hidden_states=text
    ).sample.square().mean().backward()
    key = unet.add_embedding.pool.k_proj
    assert torch.equal(key.bias.grad, torch.zeros_like(key.bias))  # the softmax ignores a shift shared by all keys
    assert key.weight.grad.abs().sum() > 0
