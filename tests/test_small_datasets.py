"""Small datasets: non-leaky augmentation, captions that say left/right, caption variants, input perturbation,
pixel-art resizing and transparent backgrounds."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    TINY_UNET_CONFIG,
    assert_same_tensors,
    resume_from_the_checkpoint_before,
    run_error,
    run_ok,
    write_imagefolder,
)
from PIL import Image
from safetensors.torch import load_file

from text_to_image.batches import (
    AUGMENT_LABELS,
    AugmentDraws,
    BatchDraws,
    HostBatches,
    augment_pixels,
    augmentation_labels,
    caption_variants_of,
    choose_captions,
    draw_batch,
    mind_the_sides,
    swap_sides,
)
from text_to_image.config import ALPHA_BACKGROUNDS, CaptionVariants, Decoding, DiffusionConfig
from text_to_image.data import Shard, decode_image, warn_fractional_nearest
from text_to_image.evaluation import on_white
from text_to_image.loss import DiffusionObjective, MinSnrWeighting, diffusion_losses
from text_to_image.models import build_noise_scheduler


def identity_draws(count: int, **changes) -> AugmentDraws:
    values = {
        "x_flip": torch.zeros(count, dtype=torch.bool),
        "quarter_turns": torch.zeros(count, dtype=torch.long),
        "rotation": torch.zeros(count),
        "log2_scale": torch.zeros(count),
        "shift": torch.zeros(count, 2),
    }
    return AugmentDraws(**(values | changes))


# ---------------------------------------------------------------------------------------------
# --augment_prob


def test_the_conditioning_vector_is_zero_exactly_for_untouched_images_which_keep_their_pixels():
    torch.manual_seed(3)
    draws = draw_batch(Shard(size=512), dropout_prob=0.0, center_crop=True, random_flip=False, augment_prob=0.5)
    augment = draws.augment
    labels = augmentation_labels(augment, 16)
    untouched = (
        ~augment.x_flip
        & (augment.quarter_turns == 0)
        & (augment.rotation == 0)
        & (augment.log2_scale == 0)
        & (torch.round(augment.shift * 16) == 0).all(dim=1)
    )
    assert labels.shape == (512, len(AUGMENT_LABELS))
    assert torch.equal(labels.eq(0).all(dim=1), untouched)
    assert 0.44 < 1 - untouched.float().mean() < 0.54  # 0.5 x (1 - 1/32) of them are changed
    pixels = torch.rand(512, 3, 16, 16) * 2 - 1
    moved, returned = augment_pixels(pixels, augment)
    assert torch.equal(returned, labels)
    assert torch.equal(moved[untouched], pixels[untouched])
    assert (moved[~untouched] - pixels[~untouched]).abs().flatten(1).amax(dim=1).gt(0.01).all()


def test_flips_quarter_turns_and_whole_pixel_shifts_move_pixels_exactly():
    image = torch.rand(1, 3, 8, 8) * 2 - 1  # no symmetry to hide a wrong direction
    cases = [
        (identity_draws(1, x_flip=torch.tensor([True])), image.flip(-1), [1, 0, 0, 0, 0, 0, 0]),
        (identity_draws(1, quarter_turns=torch.tensor([1])), torch.rot90(image, -1, (-2, -1)), [0, 1, -1, 0, 0, 0, 0]),
        (identity_draws(1, quarter_turns=torch.tensor([2])), torch.rot90(image, 2, (-2, -1)), [0, 0, -2, 0, 0, 0, 0]),
    ]
    for augment, expected, label in cases:
        moved, labels = augment_pixels(image, augment)
        assert torch.allclose(moved, expected, atol=1e-5)
        assert labels.tolist() == [label]
    moved, labels = augment_pixels(image, identity_draws(1, shift=torch.tensor([[0.125, -0.25]])))
    assert torch.allclose(moved[..., :6, 1:], image[..., 2:, :7], atol=1e-5)  # 1 px right, 2 px up
    assert labels.tolist() == [[0, 0, 0, 0, 0, 0.125, -0.25]]


def test_augmentation_draws_come_last_and_are_sliced_from_the_global_batch():
    flags = {
        "dropout_prob": 0.1,
        "center_crop": False,
        "random_flip": True,
        "caption_variants": True,
        "augment_prob": 0.7,
        "random_background": True,
    }
    torch.manual_seed(5)
    whole = draw_batch(Shard(size=6), **flags)
    after_whole = torch.rand(1)
    torch.manual_seed(5)
    second = draw_batch(Shard(index=1, count=2, size=3), **flags)
    assert torch.equal(torch.rand(1), after_whole)  # both took exactly as many numbers
    for name in ("caption_choice", "dropped", "crop_at", "flip", "variant_choice", "background"):
        assert torch.equal(getattr(second, name), getattr(whole, name)[3:]), name
    for name in ("x_flip", "quarter_turns", "rotation", "log2_scale", "shift"):
        assert torch.equal(getattr(second.augment, name), getattr(whole.augment, name)[3:]), name
    torch.manual_seed(5)
    plain = draw_batch(Shard(size=6), dropout_prob=0.1, center_crop=False, random_flip=True)
    assert torch.equal(plain.crop_at, whole.crop_at) and plain.augment is None  # earlier draws unchanged


@pytest.mark.slow
def test_augmented_run_resumes_bit_identically_and_its_pipeline_samples_with_zero_labels(argv, tmp_path):
    flags = (
        "--augment_prob", "0.8",
        "--random_flip",
        "--input_perturbation", "0.1",
        "--use_ema",
        "--max_train_steps", "6",
        "--checkpointing_steps", "3",
    )  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(argv(*flags, output=straight))
    resume_from_the_checkpoint_before(argv, flags, straight, 6, resumed)
    assert_same_tensors(
        load_file(straight / "checkpoint-6" / "model.safetensors"),
        load_file(resumed / "checkpoint-6" / "model.safetensors"),
    )
    config = json.loads((straight / "unet" / "config.json").read_text())
    assert config["class_embed_type"] == "projection"
    assert config["projection_class_embeddings_input_dim"] == len(AUGMENT_LABELS)
    assert "0.8 of them augmented" in (straight / "README.md").read_text()

    from pipeline_text_to_image import load_pipeline

    pipeline = load_pipeline(straight, None, "cpu", None)
    seen = []
    forward = pipeline.unet.forward

    def recording_forward(*args, **kwargs):
        seen.append(kwargs.get("class_labels"))
        return forward(*args, **kwargs)

    pipeline.unet.forward = recording_forward
    pipeline(["a red square"], num_inference_steps=2, guidance_scale=2.0, output_type="pt")
    assert len(seen) == 2
    for labels in seen:
        assert labels.shape == (2, len(AUGMENT_LABELS)) and not labels.any()  # both guidance branches


def test_augmentation_with_a_unet_config_that_has_a_class_embedding_is_refused(argv, tmp_path, capsys):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY_UNET_CONFIG | {"class_embed_type": "timestep"}))
    error = run_error(argv("--augment_prob", "0.5", "--model_config_name_or_path", str(config)), capsys)
    assert "--augment_prob" in error and "class_embed_type 'timestep'" in error


@pytest.mark.slow
def test_resuming_with_augmentation_turned_on_or_off_is_refused(argv, tmp_path, capsys):
    run_ok(argv("--max_train_steps", "2"))
    error = run_error(
        argv("--max_train_steps", "4", "--augment_prob", "0.5", "--resume_from_checkpoint", "latest"), capsys
    )
    assert "that run trained without --augment_prob" in error and "resume with the first run's --augment_prob" in error


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--augment_prob", "1.5", "--augment_prob must be in [0, 1]"),
        ("--caption_tag_dropout", "1", "--caption_tag_dropout must be in [0, 1)"),
        ("--caption_variants", "0", "--caption_variants must be at least 1"),
        ("--input_perturbation", "-0.1", "--input_perturbation must be at least 0"),
    ],
)
def test_small_dataset_flag_mistakes_get_one_line(argv, capsys, flag, value, words):
    assert words in run_error(argv(flag, value), capsys)


# ---------------------------------------------------------------------------------------------
# Captions: left/right, variants


def test_left_and_right_swap_in_the_captions_of_mirrored_images():
    assert swap_sides("Left hand up, facing RIGHT, leftward, rightmost, bright") == (
        "Right hand up, facing LEFT, rightward, leftmost, bright"
    )
    captions = ["a knight facing left", "a knight facing left", "a red square", "a knight facing right"]
    draws = BatchDraws(
        caption_choice=torch.zeros(4),
        dropped=torch.zeros(4, dtype=torch.bool),
        crop_at=torch.zeros(4, 2),
        flip=torch.tensor([True, False, True, True]),
        augment=identity_draws(4, x_flip=torch.tensor([False, False, False, True])),  # the last: flipped twice
    )
    swapped, same = mind_the_sides(captions, draws, "swap")
    assert swapped == ["a knight facing right", "a knight facing left", "a red square", "a knight facing right"]
    assert same is draws
    kept, unflipped = mind_the_sides(captions, draws, "no_flip")
    assert kept == captions
    assert unflipped.flip.tolist() == [False, False, True, False]
    assert unflipped.augment.x_flip.tolist() == [False] * 4


def test_k_caption_variants_keep_the_first_tags_and_are_the_same_every_time():
    variants = CaptionVariants(separator=",", shuffle=True, keep_tokens=1, tag_dropout=0.3, count=6)
    caption = "a sprite, red, hat, sword, shield, boots"
    made = caption_variants_of(caption, variants)
    assert made == caption_variants_of(caption, variants)
    assert len(made) == 6 and len(set(made)) > 3
    for text in made:
        tags = text.split(", ")
        assert tags[0] == "a sprite" and set(tags[1:]) <= {"red", "hat", "sword", "shield", "boots"}
    assert any(len(text.split(", ")) < 6 for text in made)  # some tags dropped
    assert any(text.split(", ")[1] != "red" for text in made)  # some shuffled
    draws = BatchDraws(
        caption_choice=torch.zeros(3),
        dropped=torch.tensor([False, False, True]),
        crop_at=torch.zeros(3, 2),
        flip=None,
        variant_choice=torch.tensor([0.0, 0.99, 0.5]),
    )
    chosen = choose_captions([[caption]] * 3, draws, variants)
    assert chosen == [made[0], made[5], ""]  # a dropped caption stays empty
    lone = CaptionVariants(separator=",", shuffle=False, keep_tokens=0, tag_dropout=0.99, count=4)
    assert all(caption_variants_of("red, hat", lone))  # one tag always stays


@pytest.mark.slow
def test_caption_variants_are_all_in_the_cache_and_training_uses_several(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, monkeypatch
):
    from conftest import train_argv

    captions = [f"a {colour} square, small, on a white background" for colour in ("red", "green", "blue", "yellow")]
    data = write_imagefolder(tmp_path / "data", count=8, captions=captions * 2)
    shown = []
    micro_batch = HostBatches.micro_batch

    def recording(self, micro_index):
        pixels, captions, labels = micro_batch(self, micro_index)
        shown.extend(captions)
        return pixels, captions, labels

    monkeypatch.setattr(HostBatches, "micro_batch", recording)
    argv = train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out")
    flags = ("--caption_shuffle_separator", ",", "--caption_keep_tokens", "1", "--caption_variants", "3")
    run_ok([*argv, *flags, "--max_train_steps", "6", "--random_flip", "--conditioning_dropout_prob", "0"])
    variants = CaptionVariants(separator=",", shuffle=True, keep_tokens=1, tag_dropout=0.0, count=3)
    expected = {text for caption in captions for text in caption_variants_of(caption, variants)}
    cache = torch.load(next((tmp_path / "out" / "caption_cache").glob("*.pt")), weights_only=True)
    assert len(cache) == len({""} | set(captions) | expected)
    assert set(shown) <= expected and len(set(shown)) > len(captions)


# ---------------------------------------------------------------------------------------------
# Input perturbation


class RecordingUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.inputs = []

    def forward(self, sample, timesteps, encoder_hidden_states, **kwargs):
        self.inputs.append(sample)
        return SimpleNamespace(sample=torch.zeros_like(sample))


def test_input_perturbation_noises_the_input_but_not_the_target():
    noise_scheduler = build_noise_scheduler(
        DiffusionConfig(
            ddpm_num_steps=100,
            ddpm_beta_schedule="linear",
            prediction_type="epsilon",
            rescale_betas_zero_snr=False,
            snr_gamma=0.0,
            noise_offset=0.0,
            conditioning_dropout_prob=0.0,
        )
    )
    clean, text, unet = torch.rand(4, 3, 8, 8) * 2 - 1, torch.zeros(4, 2, 8), RecordingUNet()
    torch.manual_seed(0)
    losses, timesteps = diffusion_losses(
        unet, noise_scheduler, clean, text, DiffusionObjective(MinSnrWeighting(0.0), input_perturbation=0.1)
    )
    torch.manual_seed(0)
    noise, drawn, extra = torch.randn(4, 3, 8, 8), torch.randint(0, 100, (4,)), torch.randn(4, 3, 8, 8)
    assert torch.equal(timesteps, drawn)
    assert torch.allclose(unet.inputs[0], noise_scheduler.add_noise(clean, noise + 0.1 * extra, drawn))
    assert torch.allclose(losses, noise.pow(2).mean(dim=(1, 2, 3)))  # the target is the unperturbed noise


class LastTimestep:
    def draw(self, shard, num_timesteps, device):
        return shard.of(torch.full((shard.total,), num_timesteps - 1, device=device))


class HalfWeight:
    def __call__(self, snr, prediction_type):
        return torch.full_like(snr, 0.5)


def test_the_loss_calls_the_objectives_weighting_and_timestep_sampling():
    noise_scheduler = build_noise_scheduler(
        DiffusionConfig(
            ddpm_num_steps=100,
            ddpm_beta_schedule="linear",
            prediction_type="epsilon",
            rescale_betas_zero_snr=False,
            snr_gamma=0.0,
            noise_offset=0.0,
            conditioning_dropout_prob=0.0,
        )
    )
    clean, text, unet = torch.rand(2, 3, 8, 8) * 2 - 1, torch.zeros(2, 2, 8), RecordingUNet()
    objective = DiffusionObjective(HalfWeight(), timesteps=LastTimestep())
    torch.manual_seed(0)
    shard = Shard(index=1, count=2, size=2)  # the second process's half of a global batch of 4
    losses, timesteps = diffusion_losses(unet, noise_scheduler, clean, text, objective, shard)
    torch.manual_seed(0)
    noise = torch.randn(4, 3, 8, 8)[2:]
    assert torch.equal(timesteps, torch.tensor([99, 99]))
    assert torch.allclose(losses, 0.5 * noise.pow(2).mean(dim=(1, 2, 3)))  # the zero UNet's error is the noise


# ---------------------------------------------------------------------------------------------
# Pixel art and transparency


def asymmetric_sprite(size: int = 8) -> Image.Image:
    palette = np.array([[255, 255, 255], [200, 30, 30], [20, 20, 120]], dtype=np.uint8)
    indices = np.random.default_rng(0).integers(0, 3, (size, size))
    indices[0, :3] = 1  # no mirror or rotation symmetry
    return Image.fromarray(palette[indices])


def test_nearest_resize_keeps_hard_edges_and_other_filters_blend(tmp_path):
    sprite = asymmetric_sprite()
    path = tmp_path / "sprite.png"
    sprite.save(path)
    source = {"path": str(path), "bytes": None}
    nearest = decode_image(source, 16, True, resize_filter="nearest")
    expected = np.asarray(sprite).repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(nearest.permute(1, 2, 0).numpy(), expected)
    halved = decode_image(source, 4, True, resize_filter="nearest")
    assert {tuple(pixel) for pixel in halved.flatten(1).T.tolist()} <= {
        tuple(p) for p in np.asarray(sprite).reshape(-1, 3).tolist()
    }
    bicubic = decode_image(source, 16, True)
    assert not np.array_equal(bicubic.permute(1, 2, 0).numpy(), expected)


def test_nearest_at_a_non_integer_scale_warns(tmp_path, caplog):
    for name, size in (("even.png", 8), ("odd.png", 12)):
        asymmetric_sprite(size).save(tmp_path / name)
    decoding = Decoding(resolution=16, center_crop=True, resize_filter="nearest")
    with caplog.at_level(logging.WARNING, logger="text_to_image"):
        warn_fractional_nearest([{"path": str(tmp_path / "even.png"), "bytes": None}], decoding)
        assert not caplog.records
        warn_fractional_nearest([{"path": str(tmp_path / "odd.png"), "bytes": None}], decoding)
    assert "non-integer factor (e.g. 12x12 px to 16 px: 1.33x)" in caplog.text


def write_transparent_sprites(folder: Path, count: int = 8) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for index in range(count):
        image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
        image.paste((200, 30, 30, 255), (5, 5, 11, 11))
        image.save(folder / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "text": "a red square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def corners_per_batch(argv: list[str], monkeypatch) -> list[torch.Tensor]:
    """The top-left pixel (background) of every image of every training micro-batch of a run."""
    corners = []
    micro_batch = HostBatches.micro_batch

    def recording(self, micro_index):
        pixels, captions, labels = micro_batch(self, micro_index)
        corners.append(pixels[:, :, 0, 0].clone())
        return pixels, captions, labels

    monkeypatch.setattr(HostBatches, "micro_batch", recording)
    run_ok(argv)
    monkeypatch.undo()
    return corners


@pytest.mark.slow
def test_random_backgrounds_differ_across_epochs_and_are_deterministic_given_the_seed(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, monkeypatch
):
    from conftest import train_argv

    data = write_transparent_sprites(tmp_path / "sprites")

    def argv(output: str, seed: str) -> list[str]:
        flags = ("--alpha_background", "random", "--max_train_steps", "4", "--seed", seed)
        return [*train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / output), *flags]

    first = corners_per_batch(argv("a", "0"), monkeypatch)
    again = corners_per_batch(argv("b", "0"), monkeypatch)
    other = corners_per_batch(argv("c", "1"), monkeypatch)
    assert len(first) == 4  # 8 images, batch 4: two epochs
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.stack(first), torch.stack(other))
    epoch_1, epoch_2 = torch.cat(first[:2]), torch.cat(first[2:])
    assert len({tuple(colour) for colour in torch.cat([epoch_1, epoch_2]).tolist()}) == 16  # every showing its own
    assert "transparency on a random flat colour" in (tmp_path / "a" / "README.md").read_text()


def test_fixed_backgrounds_fill_transparent_pixels(tmp_path):
    data = write_transparent_sprites(tmp_path / "sprites", count=1)
    source = {"path": str(data / "0.png"), "bytes": None}
    for name, colour in ALPHA_BACKGROUNDS.items():
        image = decode_image(source, 16, True, alpha_background=name)
        assert image[:, 0, 0].tolist() == list(colour) and image[:, 8, 8].tolist() == [200, 30, 30]
    rgba = decode_image(source, 16, True, alpha_background="random")
    assert rgba.shape == (4, 16, 16) and rgba[3, 0, 0] == 0 and rgba[3, 8, 8] == 255
    assert on_white(rgba)[:, 0, 0].tolist() == [255, 255, 255]  # how evaluation shows it
