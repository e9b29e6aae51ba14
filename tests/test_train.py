"""The trainer end to end on tiny models: what it writes, how it resumes, what it refuses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_tensors,
    read_until,
    resume_from_the_checkpoint_before,
    run_error,
    run_ok,
    train_argv,
    write_imagefolder,
)
from safetensors.torch import load_file

import train_text_to_image as trainer
from text_to_image.batches import choose_captions, crop_and_flip, draw_batch
from text_to_image.checkpoints import (
    PIPELINE_RETIRED,
    PIPELINE_STAGING,
    STOP_CHECK_STEPS,
    StopRequest,
    TrainState,
    find_latest_checkpoint,
    finish_interrupted_export,
    is_complete_checkpoint,
    list_checkpoints,
    read_train_state,
)
from text_to_image.config import DataConfig, DiffusionConfig, OptimConfig, RunConfig, parse_args
from text_to_image.data import IndexedBatches, Shard, decode_image, epoch_order, read_image_table, to_rgb
from text_to_image.loss import (
    DiffusionObjective,
    MinSnrPlusOneWeighting,
    MinSnrWeighting,
    StepLoss,
    min_snr_weights,
    objective_for,
)
from text_to_image.models import (
    CaptionCut,
    build_noise_scheduler,
    build_text_encoder,
    build_unet,
    caption_cut,
    caption_max_length,
    caption_tokens,
    default_unet_config,
    fit_text_pooling_heads,
)
from text_to_image.optimization import WarmupStableDecay, build_lr_scheduler
from text_to_image.outputs import build_pipeline, sample_images
from text_to_image.setup import plan_schedule, setup_run
from text_to_image.training import (
    DISK_BYTES_PER_SECOND,
    LengthPlan,
    Schedule,
    StopCost,
    TimePlanner,
    cut_short,
    planned_steps,
    starting_length,
)


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# A whole run


def test_run_leaves_pipeline_checkpoints_grids_and_tensorboard_events(argv, tmp_path, capsys):
    output = tmp_path / "out"
    run_ok(argv("--logger", "tensorboard", "--use_ema", "--validation_prompts", "a red square", "a blue circle"))
    for name in (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer_config.json",
        "pipeline.py",
        "README.md",
    ):
        assert (output / name).is_file(), name
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-2", "checkpoint-4"]
    grids = sorted((output / "samples").glob("*.png"))
    assert grids and (output / "samples" / "progress.gif").is_file()
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    assert "img/s" in capsys.readouterr().out
    model_index = json.loads((output / "model_index.json").read_text())
    assert model_index["text_max_length"] == 5  # <start> a red square <end>


def test_seed_readme_command_parses_and_completes_with_local_data(
    tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path
):
    seed_flags = [
        "--train_data_dir", str(tiny_imagefolder), "--resolution=16", "--output_dir", str(tmp_path / "out"),
        "--train_batch_size=3", "--dataloader_num_workers=0", "--eval_batch_size=1", "--num_epochs=20000000",
        "--use_ema", "--gradient_accumulation_steps=4", "--learning_rate=1e-4", "--lr_warmup_steps=1000",
        "--mixed_precision=no", "--save_images_epoch=7", "--ddpm_beta_schedule=squaredcos_cap_v2",
        "--checkpointing_steps=2000", "--resume_from_checkpoint=latest", "--prediction_type=sample",
        "--logger=wandb", "--image_column=image", "--caption_column=text",
        "--text_encoder_name_or_path", str(tiny_text_encoder_dir), "--model_config_name_or_path", str(tiny_unet_config_file),
        "--max_train_steps", "4", "--ddpm_num_inference_steps", "2",
    ]  # fmt: skip
    run_ok(seed_flags)
    assert [path.name for path in list_checkpoints(tmp_path / "out")] == ["checkpoint-4"]
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_saved_pipeline_holds_the_ema_weights(argv, tmp_path):
    from pipeline_text_to_image import TextToImagePipeline

    output = tmp_path / "out"
    run_ok(argv("--use_ema"))
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    state = torch.load(output / "checkpoint-4" / "custom_checkpoint_1.pkl", weights_only=False)
    raw = checkpoint_weights(output / "checkpoint-4")
    unet = UNet2DConditionModel.from_pretrained(output / "unet")
    ema = EMAModel(unet.parameters())
    ema.load_state_dict(state)
    saved = TextToImagePipeline.from_pretrained(output).unet
    for ema_param, (name, saved_param) in zip(ema.shadow_params, saved.named_parameters(), strict=True):
        assert torch.equal(ema_param, saved_param), name
    assert not all(torch.equal(raw[name], param) for name, param in saved.named_parameters())


def test_saved_pipeline_without_ema_holds_the_trained_weights(argv, tmp_path):
    output = tmp_path / "out"
    run_ok(argv("--no-use_ema"))
    assert_same_tensors(unet_weights(output), checkpoint_weights(output / "checkpoint-4"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_loss_is_finite_and_bounded_for_every_prediction_type_and_schedule(
    prediction_type, beta_schedule, tiny_unet_config_file
):
    args = parse_args(
        ["--train_data_dir", ".", "--prediction_type", prediction_type, "--ddpm_beta_schedule", beta_schedule]
    )
    scheduler = build_noise_scheduler(DiffusionConfig.from_args(args))
    unet = build_unet(str(tiny_unet_config_file), 16, 64)
    torch.manual_seed(0)
    clean = torch.rand(8, 3, 16, 16) * 2 - 1
    loss = StepLoss(unet, scheduler, DiffusionObjective(MinSnrWeighting(5.0))).micro_batch(clean, torch.randn(8, 5, 64))
    assert torch.isfinite(loss) and 0 < loss.item() < 20


def test_min_snr_weights_stay_bounded_at_tiny_and_zero_snr():
    snr = torch.tensor([0.0, 1e-6, 1.0, 5.0, 1e6])
    assert torch.equal(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 1.0, 5e-6]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "sample"), torch.tensor([0.0, 1e-6, 1.0, 5.0, 5.0]))
    assert torch.allclose(
        min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.0, 1e-6, 0.5, 5 / 6, 5 / (1e6 + 1)])
    )
    assert torch.equal(min_snr_weights(snr, 0.0, "sample"), torch.ones(5))


def test_min_snr_plus_one_keeps_the_noisy_v_steps_at_one_and_caps_the_clean_ones():
    snr = torch.tensor([0.0, 1.0, 4.0, 9.0, 1e6])
    weighting = MinSnrPlusOneWeighting(5.0)
    assert torch.allclose(weighting(snr, "v_prediction"), torch.tensor([1.0, 1.0, 1.0, 0.5, 5 / (1e6 + 1)]))
    assert torch.equal(MinSnrPlusOneWeighting(0.0)(snr, "v_prediction"), torch.ones(5))
    for other in ("epsilon", "sample", "flow_matching"):  # weighed as plain min-SNR
        assert torch.equal(weighting(snr, other), min_snr_weights(snr, 5.0, other))
    chosen = objective_for(DiffusionConfig.from_args(parse_args(["--min_snr_variant", "snr"])))
    assert chosen.weighting == MinSnrWeighting(5.0)
    assert objective_for(DiffusionConfig.from_args(parse_args([]))).weighting == MinSnrPlusOneWeighting(5.0)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_other_prediction_types_and_cosine_betas_train_and_save(argv, tmp_path, prediction_type):
    run_ok(
        argv(
            "--prediction_type", prediction_type, "--ddpm_beta_schedule", "squaredcos_cap_v2", "--max_train_steps", "2"
        )
    )
    config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == prediction_type and config["beta_schedule"] == "squaredcos_cap_v2"


def test_list_captions_and_empty_captions_are_all_used(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file):
    captions = [["a red square", "a red circle"], None, [], ["a blue circle"]] * 4
    data = write_imagefolder(tmp_path / "data", count=16, captions=captions)
    args = parse_args(["--train_data_dir", str(data)])
    loaded = read_image_table(DataConfig.from_args(args), None, show_progress=False)
    assert loaded.captions == ["", "a red square", "a red circle", "a blue circle"]
    assert loaded.caption_options[:4] == [["a red square", "a red circle"], [""], [""], ["a blue circle"]]
    torch.manual_seed(0)
    draws = draw_batch(Shard(size=400), dropout_prob=0.0, center_crop=True, random_flip=False)
    picked = choose_captions([loaded.caption_options[0]] * 400, draws)
    assert set(picked) == {"a red square", "a red circle"}
    run_ok(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out", "--max_train_steps", "2"))


def test_conditioning_dropout_replaces_captions_by_the_empty_one_at_the_given_rate():
    options = [["a red square"], ["a blue circle"]] * 5000
    torch.manual_seed(0)
    shard = Shard(size=len(options))
    for rate in (0.0, 0.1):
        draws = draw_batch(shard, dropout_prob=rate, center_crop=True, random_flip=False)
        captions = choose_captions(options, draws)
        dropped = captions.count("") / len(captions)
        assert dropped == 0 if rate == 0 else 0.08 < dropped < 0.12
        assert all(caption in ("", option[0]) for caption, option in zip(captions, options, strict=True))


def test_gradient_accumulation_takes_one_optimizer_step_per_n_micro_batches(argv, tmp_path):
    run_ok(argv("--gradient_accumulation_steps", "3", "--max_train_steps", "2", "--checkpointing_steps", "1"))
    scheduler_state = torch.load(tmp_path / "out" / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=False)
    assert scheduler_state["last_epoch"] == 2
    assert json.loads((tmp_path / "out" / "checkpoint-2" / "train_state.json").read_text())["step"] == 2


def test_trained_text_encoder_is_saved_with_its_new_weights(argv, tmp_path, tiny_text_encoder_dir):
    run_ok(argv("--train_text_encoder", "--learning_rate", "1e-2"))
    before = load_file(tiny_text_encoder_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_text_encoder_learning_rate_gets_its_own_group_and_resuming_without_it_is_refused(
    argv, tmp_path, capsys, caplog
):
    flags = ("--train_text_encoder", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--max_train_steps", "2")
    run_ok(argv(*flags, "--text_encoder_learning_rate", "1e-3", "--checkpointing_steps", "2"))
    optimizer = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.bin", weights_only=False)
    encoder = load_file(tmp_path / "out" / "text_encoder" / "model.safetensors")
    assert [group["lr"] for group in optimizer["param_groups"]] == [1e-2, 1e-3]
    assert len(optimizer["param_groups"][1]["params"]) == len(encoder)
    error = run_error(argv(*flags[:-1], "4", "--resume_from_checkpoint", "latest"), capsys)
    assert "its optimizer trained other parameters than this run would" in error and "start a new --output_dir" in error
    with caplog.at_level("WARNING"):
        run = setup_run(RunConfig.from_args(parse_args(argv("--text_encoder_learning_rate", "1e-3"))))
        assert len(run.trainer.optimizer.param_groups) == 1  # the frozen encoder trains at no rate
    assert "--text_encoder_learning_rate is ignored: the text encoder is frozen" in caplog.text


# ---------------------------------------------------------------------------------------------
# Arguments, schedule, images


def test_config_file_gives_values_and_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("resolution: 32\nlearning_rate: 0.001\nvalidation_prompts: [a cat, a dog]\n")
    args = parse_args(["--config", str(config), "--learning_rate", "0.5"])
    assert (args.resolution, args.learning_rate, args.validation_prompts) == (32, 0.5, ["a cat", "a dog"])


def test_seed_num_epochs_gives_a_sane_learning_rate_schedule():
    from diffusers.optimization import get_scheduler

    args = parse_args(
        [
            "--train_data_dir",
            ".",
            "--num_epochs=20000000",
            "--train_batch_size=3",
            "--gradient_accumulation_steps=4",
            "--lr_warmup_steps=1000",
        ]
    )
    schedule = plan_schedule(
        833,
        batch_size=args.train_batch_size,
        num_processes=1,
        accumulation=args.gradient_accumulation_steps,
        max_steps=args.max_train_steps,
        num_epochs=args.num_epochs,
    )
    assert schedule.max_steps == 1_385_000_000
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=1000, num_training_steps=schedule.max_steps
    )
    for _ in range(5000):
        optimizer.step()
        lr_scheduler.step()
    assert lr_scheduler.get_last_lr()[0] == pytest.approx(1e-4, rel=1e-3)


def test_epoch_events_fire_once_per_n_epochs_with_accumulation():
    schedule = Schedule(batches_per_epoch=5, accumulation=2, max_steps=20)
    fired = [step for step in range(1, 21) if schedule.crosses(step, 2)]
    assert fired == [5, 10, 15, 20]
    # step 18's first micro-batch is the 36th: epoch 7, second batch of it
    from types import SimpleNamespace

    table = SimpleNamespace(usable_rows=torch.arange(10))
    batches = IndexedBatches(table, seed=3, shard=Shard(size=2), batches_per_epoch=5, num_workers=0)
    assert batches.rows(18 * 2) == epoch_order(table.usable_rows, 3, 7)[2:4].tolist()
    assert sorted(row for index in range(35, 40) for row in batches.rows(index)) == list(range(10))


def test_warmup_stable_decay_warms_up_holds_then_decays_to_zero_over_the_last_share():
    optim = OptimConfig(lr_scheduler="warmup_stable_decay", lr_warmup_steps=10, max_train_steps=100)
    length, plans_by_time = starting_length(optim, TrainState(), bound=100)
    assert (length, plans_by_time) == (LengthPlan(steps=100, decay_start=80), False)  # --lr_decay_share 0.2
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    lr_scheduler, factor = build_lr_scheduler(optimizer, optim, length.steps, length.decay_start)
    rates = {}
    for step in range(101):
        rates[step] = lr_scheduler.get_last_lr()[0]
        optimizer.step()
        lr_scheduler.step()
    # warm-up, stable, the decay's first step, its middle, its last step, the end
    steps = (0, 5, 10, 79, 80, 90, 99, 100)
    assert [factor(step) for step in steps] == [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.05, 0.0]
    assert [rates[step] for step in steps] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 5e-5, 0.0], abs=1e-18)
    # a decay longer than the run's stable part starts inside the warm-up: the lower of the two
    short = WarmupStableDecay(warmup_steps=10, total_steps=12, decay_start=4)
    assert [short(step) for step in (2, 4, 8, 12)] == [0.2, 0.4, 0.5, 0.0]


def test_time_plan_turns_the_measured_step_time_and_the_time_left_into_a_step_count():
    # 8h29m50s left at step 21, 0.31 s a step plus 0.01 s of periodic saves, 95 s kept for the final ones
    assert (
        planned_steps(
            step=21, seconds_left=30590.0, step_seconds=0.31, final_seconds=95.0, periodic_seconds_per_step=0.01
        )
        == 21 + 95296
    )  # (30590 - 95) / 0.32 = 95296.9
    assert (
        planned_steps(step=21, seconds_left=50.0, step_seconds=0.31, final_seconds=95.0, periodic_seconds_per_step=0.0)
        == 21
    )  # no time left for a step: the run ends where it is

    def planner(bound: int) -> TimePlanner:
        return TimePlanner(
            budget="8h30m",
            bound=bound,
            provisional=LengthPlan(steps=bound, decay_start=bound - round(0.2 * bound)),
            decay_share=0.2,
            factor=WarmupStableDecay(warmup_steps=100, total_steps=bound, decay_start=bound - round(0.2 * bound)),
            first_step=1,
        )

    by_time = planner(bound=1_000_000)
    plan = by_time.fix(21, seconds_left=30590.0, step_seconds=0.31, stop_seconds=95.0, periodic=0.01)
    assert (plan.steps, plan.decay_start) == (95317, 95317 - 19063)
    assert plan.how == (
        "~95296 more in the 8h29m left of --max_train_time 8h30m at 0.31 s/step, timed over steps 2-21;"
        " 95 s kept for the final checkpoint, grid and export, 953 s for the periodic ones"
    )
    assert (by_time.factor.total_steps, by_time.factor.decay_start) == (95317, 76254)
    by_epochs = planner(bound=40).fix(21, seconds_left=30590.0, step_seconds=0.31, stop_seconds=95.0, periodic=0.01)
    assert (by_epochs.steps, by_epochs.decay_start) == (40, 32)
    assert (
        by_epochs.how
        == "--num_epochs' count; --max_train_time 8h30m would allow ~95317 at 0.31 s/step, timed over steps 2-21"
    )
    # 3 steps left: their decay starts at the step the plan is fixed at, never before it (the rate never jumps)
    late = planner(bound=1_000_000).fix(21, seconds_left=98.0, step_seconds=1.0, stop_seconds=95.0, periodic=0.0)
    assert (late.steps, late.decay_start) == (24, 21)
    assert planner(bound=40).closes(21, seconds=6.0)  # 20 steps timed
    assert planner(bound=1000).closes(5, seconds=30.0) and not planner(bound=1000).closes(5, seconds=29.0)
    assert planner(bound=20).closes(16, seconds=1.0)  # by the provisional decay start: the rate is still stable


def test_a_resumed_run_plans_anew_from_its_time_until_the_decay_begins_and_keeps_the_plan_after():
    wsd = dict(lr_scheduler="warmup_stable_decay", max_train_time="9h")
    saved = {"steps": 1000, "decay_start": 800, "how": "timed"}
    assert starting_length(OptimConfig(**wsd), TrainState(), bound=4000) == (
        LengthPlan(steps=4000, decay_start=3200),
        True,
    )
    # a fresh session's budget: the saved plan is planned anew while its decay has not begun ...
    assert starting_length(OptimConfig(**wsd), TrainState(step=799, plan=saved), 4000) == (LengthPlan(**saved), True)
    # ... and finished as planned once it has, or without --max_train_time (the same schedule, exactly)
    assert starting_length(OptimConfig(**wsd), TrainState(step=800, plan=saved), 4000) == (LengthPlan(**saved), False)
    no_limit = OptimConfig(lr_scheduler="warmup_stable_decay")
    assert starting_length(no_limit, TrainState(step=500, plan=saved), 4000) == (LengthPlan(**saved), False)
    # a constant rate has no decay to wait for; --max_train_steps sets the length and drops the plan
    constant = {"steps": 1000, "decay_start": None, "how": "timed"}
    assert starting_length(OptimConfig(max_train_time="9h"), TrainState(step=1000, plan=constant), 4000)[1]
    state = TrainState(step=500, plan=saved)
    given = OptimConfig(**wsd, max_train_steps=2000)
    assert starting_length(given, state, 2000) == (LengthPlan(steps=2000, decay_start=1600), False)
    assert state.plan is None
    # diffusers' cosine reads the total from its first step: it stays over --num_epochs' count
    assert starting_length(OptimConfig(lr_scheduler="cosine", max_train_time="9h"), TrainState(), 4000) == (
        LengthPlan(steps=4000),
        False,
    )


def test_a_stop_by_time_says_what_it_left_of_the_planned_decay():
    length = LengthPlan(steps=100, decay_start=80)
    assert cut_short(length, 90, rate_share=0.5) == (
        "stopped by --max_train_time at step 90 of the 100 planned: the learning-rate decay from step 80 was cut"
        " short at 50% of the peak rate"
    )
    assert cut_short(length, 70, rate_share=1.0) == (
        "stopped by --max_train_time at step 70 of the 100 planned: the learning-rate decay (from step 80) never began"
    )
    assert cut_short(length, 100, rate_share=0.0) is None and cut_short(LengthPlan(steps=100), 50, 1.0) is None


def test_save_images_epoch_spelling_of_the_seed_is_accepted():
    assert parse_args(["--save_images_epoch", "7"]).save_images_epochs == 7


@pytest.mark.parametrize(("resolution", "levels"), [(16, 3), (32, 4), (64, 5), (128, 6), (256, 6)])
def test_default_unet_fits_the_resolution(resolution, levels):
    config = default_unet_config(resolution)
    assert len(config["block_out_channels"]) == levels
    assert resolution // 2 ** (levels - 1) >= 4


# the README's "Model sizes" table: parameters at 32 px with a 768-wide (CLIP-L) text encoder
DOCUMENTED_MILLIONS = {"tiny": 8.3, "small": 21.5, "base": 48.3, "large": 104.7}


@pytest.mark.parametrize("size", list(DOCUMENTED_MILLIONS))
def test_model_size_presets_build_unets_of_the_documented_sizes(size):
    with torch.device("meta"):  # counted, never run: no memory, no initialisation
        unet = build_unet(None, 32, 768, size)
    assert round(sum(parameter.numel() for parameter in unet.parameters()) / 1e6, 1) == DOCUMENTED_MILLIONS[size]


def test_a_config_file_wins_over_model_size(tiny_unet_config_file):
    unet = build_unet(str(tiny_unet_config_file), 16, 64, "large")
    assert list(unet.config.block_out_channels) == [32, 64] and unet.config.addition_embed_type is None


def test_a_unet_config_with_the_pooled_prompt_trains_and_reloads_through_the_pipeline(
    tiny_imagefolder, tiny_text_encoder_dir, tmp_path
):
    from conftest import TINY_UNET_CONFIG

    from pipeline_text_to_image import TextToImagePipeline

    config = tmp_path / "pooled.json"
    config.write_text(json.dumps({**TINY_UNET_CONFIG, "addition_embed_type": "text"}))
    output = tmp_path / "out"
    run_ok(train_argv(tiny_imagefolder, tiny_text_encoder_dir, config, output, "--max_train_steps", "1"))
    pipeline = TextToImagePipeline.from_pretrained(output)
    assert pipeline.unet.config.addition_embed_type == "text"
    assert pipeline.unet.config.addition_embed_type_num_heads == 64  # divides the encoder's 64 channels
    generator = torch.Generator().manual_seed(0)
    images = pipeline(["a red square"], num_inference_steps=2, generator=generator, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_default_unet_of_a_model_size_trains_without_a_config_file(tiny_imagefolder, tiny_text_encoder_dir, tmp_path):
    output = tmp_path / "out"
    flags = train_argv(tiny_imagefolder, tiny_text_encoder_dir, Path("unused"), output, "--max_train_steps", "1")
    run_ok(flags[:4] + flags[6:] + ["--model_size", "tiny"])  # without --model_config_name_or_path
    config = json.loads((output / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [32, 64, 128] and config["layers_per_block"] == 1


def test_pooled_prompt_heads_are_fitted_to_the_encoder_width():
    config = {"addition_embed_type": "text"}
    fit_text_pooling_heads(config, 96)
    assert config["addition_embed_type_num_heads"] == 32
    untouched = {"addition_embed_type": "text", "addition_embed_type_num_heads": 12}
    fit_text_pooling_heads(untouched, 768)
    assert untouched["addition_embed_type_num_heads"] == 12


def test_every_pil_mode_becomes_rgb_with_transparency_on_white():
    from PIL import Image

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.new("I;16", (4, 4))
    sixteen.putdata([65535] * 16)
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_images_are_resized_on_the_short_side_and_cropped_to_the_resolution():
    from PIL import Image

    wide = {"path": None, "bytes": None}
    image = Image.new("RGB", (64, 32), (10, 20, 30))
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    wide["bytes"] = buffer.getvalue()
    decoded = decode_image(wide, 16, center_crop=False)
    assert decoded.shape == (3, 16, 32) and decoded.dtype == torch.uint8
    batch = crop_and_flip([decoded, decoded], 16, torch.tensor([[0.0, 0.0], [0.0, 0.99]]), torch.tensor([False, True]))
    assert batch.shape == (2, 3, 16, 16)
    assert batch.min() >= -1 and batch.max() <= 1
    assert torch.allclose(batch[0, 0, 0, 0], torch.tensor(10 / 127.5 - 1))


# ---------------------------------------------------------------------------------------------
# Resume, interruptions, divergence


def test_resume_mid_epoch_with_ema_and_accumulation_gives_bit_identical_weights(argv, tmp_path):
    flags = (
        "--use_ema",
        "--gradient_accumulation_steps",
        "2",
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "3",
        "--random_flip",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(argv(*flags, output=straight))
    resume_from_the_checkpoint_before(argv, flags, straight, 6, resumed)
    assert_same_tensors(checkpoint_weights(straight / "checkpoint-6"), checkpoint_weights(resumed / "checkpoint-6"))
    assert_same_tensors(unet_weights(straight), unet_weights(resumed))  # EMA weights
    first = torch.load(straight / "checkpoint-6" / "custom_checkpoint_1.pkl", weights_only=False)
    second = torch.load(resumed / "checkpoint-6" / "custom_checkpoint_1.pkl", weights_only=False)
    assert first["optimization_step"] == second["optimization_step"] == 6
    assert all(torch.equal(a, b) for a, b in zip(first["shadow_params"], second["shadow_params"], strict=True))


def test_flow_matching_resumes_with_bit_identical_weights_and_exports_its_flow_sampler(argv, tmp_path):
    flags = ("--prediction_type", "flow_matching", "--timestep_sampling", "logit_normal", "--timestep_shift", "3")
    flags += ("--noise_offset", "0.05", "--input_perturbation", "0.1")  # every draw of the loss, in its order
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(argv(*flags, output=straight))
    resume_from_the_checkpoint_before(argv, flags, straight, 4, resumed)
    assert_same_tensors(checkpoint_weights(straight / "checkpoint-4"), checkpoint_weights(resumed / "checkpoint-4"))
    assert_same_tensors(unet_weights(straight), unet_weights(resumed))
    config = json.loads((resumed / "scheduler" / "scheduler_config.json").read_text())
    assert (config["_class_name"], config["shift"], config["num_train_timesteps"]) == (
        "FlowMatchEulerDiscreteScheduler",
        3.0,
        100,
    )
    from pipeline_text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(resumed)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red square", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)


def test_resume_inside_a_cosine_warm_up_with_a_trained_encoder_logs_and_trains_as_the_straight_run(
    argv, tmp_path, monkeypatch
):
    """The quickstart's setup (a trained encoder at its own rate), resumed at step 3 of a 5-step warm-up into a
    cosine decay: every step's rate differs, so a schedule restored a step off shows in the log and the weights."""
    from accelerate import Accelerator

    logged, log = {}, Accelerator.log

    def recording(self, values, step=None, log_kwargs=None):
        if "lr" in values:  # a training step's log, not an evaluation's
            logged[step] = (values["lr"], values["lr_text_encoder"])
        return log(self, values, step=step, log_kwargs=log_kwargs)

    monkeypatch.setattr(Accelerator, "log", recording)
    flags = ("--train_text_encoder", "--text_encoder_learning_rate", "1e-3", "--learning_rate", "2e-3")
    flags += ("--lr_scheduler", "cosine", "--lr_warmup_steps", "5", "--logging_steps", "1")
    flags += ("--max_train_steps", "6", "--checkpointing_steps", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(argv(*flags, output=straight))
    straight_rates = dict(logged)
    assert len({rates for step, rates in straight_rates.items() if step > 3}) == 3
    logged.clear()
    resume_from_the_checkpoint_before(argv, flags, straight, 6, resumed)
    assert logged == {step: straight_rates[step] for step in (4, 5, 6)}
    for name in ("model.safetensors", "model_1.safetensors"):  # the UNet and the text encoder
        assert_same_tensors(load_file(straight / "checkpoint-6" / name), load_file(resumed / "checkpoint-6" / name))
    first, second = (
        torch.load(run / "checkpoint-6" / "optimizer.bin", weights_only=False) for run in (straight, resumed)
    )
    assert [group["lr"] for group in first["param_groups"]] == [group["lr"] for group in second["param_groups"]]
    for state, other in zip(first["state"].values(), second["state"].values(), strict=True):
        assert_same_tensors(state, other)  # step count and both moments of AdamW
    assert_same_tensors(
        load_file(straight / "text_encoder" / "model.safetensors"),
        load_file(resumed / "text_encoder" / "model.safetensors"),
    )


@pytest.mark.slow
def test_images_decoded_per_batch_by_workers_train_and_resume_as_the_cached_run(argv, tmp_path, monkeypatch):
    loaders_opened_at = []
    examples = IndexedBatches.examples

    def spy(batches, micro_index):
        if batches.table.cache is None and micro_index != batches.ahead_index:  # workers (re)started here
            loaders_opened_at.append(micro_index)
        return examples(batches, micro_index)

    monkeypatch.setattr(IndexedBatches, "examples", spy)
    flags = ("--max_train_steps", "6", "--checkpointing_steps", "3", "--random_flip")
    per_batch = ("--image_cache_max_gb", "0", "--dataloader_num_workers", "2")
    cached, decoded = tmp_path / "cached", tmp_path / "decoded"
    run_ok(argv(*flags, output=cached))
    run_ok(argv(*flags, *per_batch, output=decoded))
    assert_same_tensors(unet_weights(cached), unet_weights(decoded))
    resumed = tmp_path / "resumed"
    resume_from_the_checkpoint_before(argv, (*flags, *per_batch), decoded, 6, resumed)
    assert_same_tensors(checkpoint_weights(cached / "checkpoint-6"), checkpoint_weights(resumed / "checkpoint-6"))
    assert loaders_opened_at == [0, 3]  # 16 images / batch 4: step 3 resumes mid-epoch, at micro-batch 3


@pytest.mark.slow
def test_latest_skips_an_incomplete_checkpoint_with_a_warning(argv, tmp_path, caplog):
    output = tmp_path / "out"
    run_ok(argv("--max_train_steps", "2"))
    (output / "checkpoint-999999").mkdir()
    assert find_latest_checkpoint(output) == output / "checkpoint-2"
    assert "ignoring incomplete checkpoint" in caplog.text and "checkpoint-999999" in caplog.text
    run_ok(argv("--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert (output / "checkpoint-3").is_dir()


def test_latest_without_checkpoints_starts_fresh_and_says_so(argv, caplog):
    run_ok(argv("--max_train_steps", "1", "--resume_from_checkpoint", "latest"))
    assert "no checkpoint" in caplog.text and "starting a fresh run" in caplog.text


def test_checkpoints_total_limit_keeps_the_newest(argv, tmp_path):
    run_ok(argv("--max_train_steps", "4", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"))
    assert [path.name for path in list_checkpoints(tmp_path / "out")] == ["checkpoint-3", "checkpoint-4"]


def test_divergence_stops_with_a_clear_error_and_keeps_the_good_pipeline(argv, tmp_path, capsys):
    output = tmp_path / "out"
    run_ok(argv("--max_train_steps", "2"))
    good = (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    capsys.readouterr()
    diverging = (
        "--max_train_steps",
        "8",
        "--learning_rate",
        "1e30",
        "--lr_scheduler",
        "constant",
        "--max_grad_norm",
        "0",
    )
    error = run_error(argv(*diverging, "--overwrite_output_dir"), capsys)
    assert "loss became NaN/inf" in error and "--learning_rate" in error
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == good
    assert list_checkpoints(output) == []


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, before any long work


def test_missing_caption_column_lists_the_columns(argv, capsys):
    error = run_error(argv("--caption_column", "caption"), capsys)
    assert "--caption_column 'caption' not in dataset columns ['image', 'text']" in error


def test_missing_data_folder_is_named(argv, tmp_path, capsys):
    error = run_error(argv("--train_data_dir", str(tmp_path / "nowhere")), capsys)
    assert f"--train_data_dir {tmp_path / 'nowhere'} is not a folder" in error


def test_empty_dataset_is_refused(argv, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    error = run_error(argv("--train_data_dir", str(empty)), capsys)
    assert f"error: --train_data_dir {empty}: metadata.jsonl has no rows" in error


@pytest.mark.parametrize("streaming", [(), ("--streaming",)])
@pytest.mark.parametrize(
    ("caption", "says"),
    [
        (7, 'line 3: the caption column "text" holds 7, not a string; write it in quotes: "7"'),
        (["a red circle"], 'line 3: the caption column "text" holds a list where earlier rows hold a string;'),
    ],
)
def test_a_caption_pyarrow_cannot_read_is_named_by_file_and_line(
    argv, tiny_imagefolder, capsys, caption, says, streaming
):
    metadata = tiny_imagefolder / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[2]["text"] = caption
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    error = run_error(argv(*streaming), capsys)
    assert f"error: --train_data_dir {tiny_imagefolder}: {metadata} {says}" in error
    assert "Traceback" not in error


def test_resolution_the_unet_halves_unevenly_trains_like_diffusers_allows(argv, tmp_path):
    run_ok(argv("--resolution", "17", "--max_train_steps", "1"))
    assert (tmp_path / "out" / "model_index.json").is_file()


@pytest.mark.slow
def test_original_scripts_unet_at_32px_warns_trains_resumes_and_samples(argv, tmp_path, caplog):
    from pipeline_text_to_image import TextToImagePipeline

    seed_unet = Path(trainer.__file__).parent / "examples" / "seed_unet.json"
    # one step a run and a one-image grid: this UNet takes seconds a step at 32 px on a CPU
    flags = ["--model_config_name_or_path", str(seed_unet), "--resolution", "32", "--train_batch_size", "2"]
    flags += ["--eval_batch_size", "1"]
    with caplog.at_level("WARNING", logger="text_to_image"):
        run_ok(argv(*flags, "--max_train_steps", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1"))
    warnings = [
        record.getMessage() for record in caplog.records if "levels take --resolution 32" in record.getMessage()
    ]
    assert len(warnings) == 1 and "32/16/8/4/2/1/1/1 px: levels 5-8" in warnings[0]
    run_ok(argv(*flags, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    assert [path.name for path in list_checkpoints(tmp_path / "out")] == ["checkpoint-1", "checkpoint-2"]
    pipeline = TextToImagePipeline.from_pretrained(tmp_path / "out")
    assert len(pipeline.unet.config.down_block_types) == 8
    images = pipeline(["a red square"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_missing_checkpoint_path_is_refused(argv, tmp_path, capsys):
    error = run_error(argv("--resume_from_checkpoint", str(tmp_path / "checkpoint-5")), capsys)
    assert "--resume_from_checkpoint" in error and "does not exist" in error


def test_text_encoder_that_needs_a_download_says_so_offline(argv, capsys):
    error = run_error(argv("--text_encoder_name_or_path", "openai/clip-vit-large-patch14"), capsys)
    assert "openai/clip-vit-large-patch14 is not a local folder" in error and "download" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on a GPU")
def test_fp16_on_cpu_is_refused(argv, capsys):
    error = run_error(argv("--mixed_precision", "fp16"), capsys)
    assert "fp16 needs a CUDA GPU" in error and "bf16" in error


@pytest.mark.parametrize("native, warned", [(False, True), (True, False)])
def test_bf16_on_a_cpu_that_emulates_it_warns(argv, monkeypatch, caplog, native, warned):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("text_to_image.config.cpu_has_native_bf16", lambda: native)
    OptimConfig.from_args(parse_args(argv("--mixed_precision", "bf16")))
    assert ("this CPU has no native bf16" in caplog.text) == warned


def test_missing_xformers_is_refused(argv, capsys):
    import importlib.util

    if importlib.util.find_spec("xformers"):
        pytest.skip("xformers is installed")
    error = run_error(argv("--enable_xformers_memory_efficient_attention"), capsys)
    assert "xformers is not installed" in error


def test_unknown_key_in_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"learning_rat": 1e-4}))
    error = run_error(["--config", str(config)], capsys)
    assert "unknown flags ['learning_rat']" in error


@pytest.mark.slow
def test_fresh_run_into_an_earlier_runs_output_dir_is_refused(argv, capsys):
    run_ok(argv("--max_train_steps", "1"))
    error = run_error(argv("--max_train_steps", "1"), capsys)
    assert "already holds checkpoints" in error and "--resume_from_checkpoint latest" in error


@pytest.mark.slow
def test_corrupt_images_are_skipped_named_and_counted(
    tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, capsys, caplog
):
    data = write_imagefolder(tmp_path / "data", count=16)
    (data / "003.png").write_bytes(b"")
    (data / "007.png").write_bytes((data / "008.png").read_bytes()[:40])
    run_ok(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out", "--max_train_steps", "2"))
    assert "003.png" in caplog.text and "007.png" in caplog.text
    assert "skipped 2 unreadable images" in capsys.readouterr().out


def test_mostly_corrupt_dataset_stops_with_an_error(tmp_path, tiny_text_encoder_dir, tiny_unet_config_file, capsys):
    data = write_imagefolder(tmp_path / "data", count=8)
    for index in range(6):
        (data / f"{index:03d}.png").write_bytes(b"not a png")
    error = run_error(train_argv(data, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path / "out"), capsys)
    assert "6 of 8 images could not be read" in error


# ---------------------------------------------------------------------------------------------
# Signals (a real process)


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_resume_continues(argv, tmp_path):
    import signal
    import subprocess
    import sys

    output = tmp_path / "out"
    flags = argv(
        "--max_train_steps",
        "100000",
        "--checkpointing_steps",
        "100000",
        "--save_images_epochs",
        "100000",
        "--save_model_epochs",
        "100000",
    )
    script = Path(trainer.__file__)
    process = subprocess.Popen(
        [sys.executable, str(script), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    read_until(process.stderr, r"training: .*\| *[1-9]\d*/100000", seconds=120)  # a step or more taken
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "SIGTERM received" in stderr and "--resume_from_checkpoint latest" in stderr
    (checkpoint,) = list_checkpoints(output)
    stopped_at = read_train_state(checkpoint).step
    assert is_complete_checkpoint(checkpoint) and 0 < stopped_at < 100000
    assert f"stopped at step {stopped_at}/100000" in stdout
    # then the pipeline of that step, without a last grid (a preemption's grace period may be short)
    assert "holds that step's weights" in stderr
    assert f"for {stopped_at} optimizer steps" in (output / "README.md").read_text()
    assert not list(output.glob("samples/*.png"))
    run_ok(argv("--max_train_steps", str(stopped_at + 2), "--resume_from_checkpoint", "latest"))
    assert read_train_state(output / f"checkpoint-{stopped_at + 2}").step == stopped_at + 2


# ---------------------------------------------------------------------------------------------
# Planned stops and exports: the pipeline is the model the run reached, never half written


def ema_of_checkpoint(checkpoint: Path) -> list[torch.Tensor]:
    return torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)["shadow_params"]


def test_max_train_time_exports_the_final_checkpoints_ema_weights_and_a_grid(argv, tmp_path, capsys):
    from pipeline_text_to_image import TextToImagePipeline

    output = tmp_path / "out"
    long_run = ("--max_train_steps", "1000", "--save_model_epochs", "1000", "--checkpointing_steps", "1000")
    long_run += ("--save_images_epochs", "1000")  # a fast machine would otherwise reach a periodic grid within 1 s
    run_ok(argv("--use_ema", "--max_train_time", "1s", *long_run))
    (checkpoint,) = list_checkpoints(output)
    step = read_train_state(checkpoint).step
    assert 0 < step < 1000
    saved = TextToImagePipeline.from_pretrained(output).unet
    for ema, (name, parameter) in zip(ema_of_checkpoint(checkpoint), saved.named_parameters(), strict=True):
        assert torch.equal(ema, parameter), name
    assert f"for {step} optimizer steps" in (output / "README.md").read_text()
    assert [path.name.split("-step-")[1] for path in output.glob("samples/epoch-*.png")] == [f"{step:07d}.png"]
    assert [path.name for path in output.glob("samples/nearest-*.png")] == [f"nearest-{step:07d}.png"]
    assert "holds that step's weights" in capsys.readouterr().err
    assert not (output / PIPELINE_STAGING).exists() and not (output / PIPELINE_RETIRED).exists()


def test_stop_reserves_the_measured_time_of_the_final_saves():
    cost = StopCost(model_bytes=int(DISK_BYTES_PER_SECOND), grid_passes_per_step=10.0)
    assert cost.seconds(step_seconds=0.5) == pytest.approx(4 + 0.5 * 10 + 2)
    cost.measured.update(checkpoint=1.0, grid=2.0)
    assert cost.seconds(step_seconds=0.5) == pytest.approx(1 + 2 + 2)


def record_learning_rates(monkeypatch) -> dict[int, float]:
    """The learning rate each training log line gives, by step (Accelerator.log recorded, then called)."""
    from accelerate import Accelerator

    logged, log = {}, Accelerator.log

    def recording(self, values, step=None, log_kwargs=None):
        if "lr" in values:  # a training step's log, not an evaluation's
            logged[step] = values["lr"]
        return log(self, values, step=step, log_kwargs=log_kwargs)

    monkeypatch.setattr(Accelerator, "log", recording)
    return logged


# 16 images of batch 4: 4 epochs are 16 steps, the --num_epochs bound of a plan by time (an hour allows thousands)
PLANNED_BY_TIME = ("--lr_scheduler", "warmup_stable_decay", "--lr_decay_share", "0.25", "--learning_rate", "1e-3")
PLANNED_BY_TIME += ("--max_train_time", "1h", "--num_epochs", "4", "--checkpointing_steps", "7")
PLANNED_BY_TIME += ("--logging_steps", "1", "--save_images_epochs", "100", "--save_model_epochs", "100")


def without_max_train_steps(argv):
    """The argv fixture without its --max_train_steps: the run's length is --num_epochs' or planned by time."""

    def make(*extra: str, output: Path | None = None) -> list[str]:
        made = argv(*extra, output=output)
        at = made.index("--max_train_steps")
        return made[:at] + made[at + 2 :]

    return make


def test_a_length_planned_from_max_train_time_decays_the_rate_to_zero_at_its_end_and_resumes_bit_identically(
    argv, tmp_path, monkeypatch, caplog
):
    """Steps 2-12 are timed (by step 12, where the --num_epochs bound's decay would begin) and the plan fixed:
    16 steps (that bound, under what the hour allows), the rate stable to step 12, then down to 0 at 16. Resumed
    inside the decay at step 14 without --max_train_time, the run follows the plan its checkpoint saved."""
    planned, logged = without_max_train_steps(argv), record_learning_rates(monkeypatch)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with caplog.at_level("INFO"):
        run_ok(planned(*PLANNED_BY_TIME, output=straight))
    plan = read_train_state(straight / "checkpoint-16").plan
    assert (plan["steps"], plan["decay_start"]) == (16, 12)
    assert re.fullmatch(
        r"--num_epochs' count; --max_train_time 1h would allow ~\d+ at .* s/step, timed over steps 2-\d+", plan["how"]
    )
    assert (
        "at most 16 steps (4.0 epochs), the length planned from --max_train_time 1h once steps 2-12 (or 30 s of them) are timed"
        in caplog.text
    )
    assert "run length planned: 16 steps (--num_epochs' count" in caplog.text
    assert "the learning rate decays to 0 over steps 12-16 (the last 25%)" in caplog.text
    assert read_train_state(straight / "checkpoint-14").plan == plan  # saved once fixed
    assert [logged[step] for step in (11, 12, 14, 15, 16)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 0.0], abs=1e-15)
    straight_rates = dict(logged)
    logged.clear()
    flags = tuple(flag for flag in PLANNED_BY_TIME if flag not in ("--max_train_time", "1h"))
    resume_from_the_checkpoint_before(planned, flags, straight, 16, resumed)
    assert read_train_state(resumed / "checkpoint-16").plan == plan
    assert logged == {step: straight_rates[step] for step in (15, 16)}
    assert_same_tensors(checkpoint_weights(straight / "checkpoint-16"), checkpoint_weights(resumed / "checkpoint-16"))
    assert_same_tensors(unet_weights(straight), unet_weights(resumed))


def test_export_that_fails_halfway_keeps_the_previous_pipeline_loadable(argv, tmp_path, monkeypatch):
    from pipeline_text_to_image import TextToImagePipeline

    output = tmp_path / "out"
    run_ok(argv())
    before = unet_weights(output)

    def disk_full(folder):
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr("text_to_image.checkpoints.copy_pipeline_code", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.main(argv("--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    assert (output / PIPELINE_STAGING / "unet").is_dir()  # the new UNet was written, then the writer failed
    assert_same_tensors(unet_weights(output), before)
    TextToImagePipeline.from_pretrained(output)
    monkeypatch.undo()
    run_ok(argv("--max_train_steps", "8", "--resume_from_checkpoint", "latest"))
    assert not (output / PIPELINE_STAGING).exists()
    assert "for 8 optimizer steps" in (output / "README.md").read_text()


def test_a_swap_cut_between_two_renames_is_finished_at_the_next_start(tmp_path):
    output, old, new = tmp_path / "out", "old weights", "new weights"
    staging, retired = output / PIPELINE_STAGING, output / PIPELINE_RETIRED
    for folder in (staging, retired):
        folder.mkdir(parents=True)
    # killed after unet/ was swapped, before text_encoder/ was
    (output / "unet.txt").write_text(new)
    (retired / "unet.txt").write_text(old)
    (output / "text_encoder.txt").write_text(old)
    (staging / "text_encoder.txt").write_text(new)
    finish_interrupted_export(output)
    assert (output / "unet.txt").read_text() == new and (output / "text_encoder.txt").read_text() == new
    assert not staging.exists() and not retired.exists()


def test_a_half_written_staging_folder_is_dropped_at_the_next_start(tmp_path):
    output = tmp_path / "out"
    (output / PIPELINE_STAGING).mkdir(parents=True)
    (output / PIPELINE_STAGING / "unet.txt").write_text("half")
    (output / "unet.txt").write_text("previous")
    finish_interrupted_export(output)
    assert (output / "unet.txt").read_text() == "previous" and not (output / PIPELINE_STAGING).exists()


def test_several_processes_agree_to_stop_every_few_steps_not_every_step():
    class TwoProcesses:
        num_processes, device, reductions = 2, "cpu", 0

        def reduce(self, tensor, reduction):
            self.reductions += 1
            return tensor

    stop, accelerator = StopRequest(None), TwoProcesses()
    stop.reason = "SIGTERM"
    steps = range(1, 2 * STOP_CHECK_STEPS + 1)
    assert [stop.requested(accelerator, step) for step in steps] == [step % STOP_CHECK_STEPS == 0 for step in steps]
    assert accelerator.reductions == 2


def test_push_to_hub_uploads_the_pipeline_folder_without_checkpoints(argv, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "me/shapes"

    def create_repo(repo_id, private, token, exist_ok):
        calls["create"] = (repo_id, private, token)
        return Repo()

    def upload_folder(repo_id, folder_path, token, commit_message, ignore_patterns):
        calls["upload"] = (repo_id, folder_path, ignore_patterns)
        assert (Path(folder_path) / "pipeline.py").is_file() and (Path(folder_path) / "model_index.json").is_file()

    # the network is the one thing a test may fake: there is none here
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    run_ok(
        argv(
            "--push_to_hub",
            "--hub_model_id",
            "shapes",
            "--hub_private_repo",
            "--hub_token",
            "t0k",
            "--max_train_steps",
            "1",
        )
    )
    assert calls["create"] == ("shapes", True, "t0k")
    repo_id, folder, ignored = calls["upload"]
    assert repo_id == "me/shapes" and folder == str(tmp_path / "out") and "checkpoint-*" in ignored


@pytest.mark.parametrize("requested, expected", [(None, 5), ("12", 12), ("3", 3)])
def test_captions_are_padded_to_the_longest_or_to_caption_max_length(argv, caplog, requested, expected):
    flags = ("--caption_max_length", requested) if requested else ()
    args = parse_args(argv(*flags))
    args.output_dir.mkdir(parents=True)
    run = setup_run(RunConfig.from_args(args))
    assert run.text_max_length == expected  # "a red square": start, 3 words, end
    assert run.trainer.conditioner.table.shape[1] == expected
    assert len(run.trainer.batches.source.table.cache) == 16  # decoded once
    # all but the empty caption are cut to "a", so all 8 become one
    cut = "--caption_max_length 3 cuts 8 of 9 distinct captions, and 8 of them become token-for-token identical"
    assert (cut in caplog.text) == (expected == 3)


def test_caption_max_length_beyond_the_tokenizer_is_refused(argv, capsys):
    error = run_error(argv("--caption_max_length", "500"), capsys)
    assert "--caption_max_length 500 is more than the tokenizer's maximum; use at most 32" in error


# two captions that differ only past the 4th word, one long caption alone in its kind, five short ones
LONG_CAPTIONS = [
    "a red square on the left",
    "a red square on the right",
    "a blue circle",
    "a blue circle in the middle of the picture",
    "a green square",
    "a yellow circle",
    "a green circle",
    "a yellow square",
]


def test_caption_cut_counts_the_captions_a_limit_cuts_and_those_it_makes_identical(tmp_path):
    from make_text_encoder import caption_words, write_clip_tokenizer

    tokenizer = write_clip_tokenizer(caption_words(LONG_CAPTIONS), tmp_path, max_length=32)
    tokens = caption_tokens(tokenizer, ["", *LONG_CAPTIONS])
    assert caption_max_length(tokenizer, tokens, None) == 11  # the longest: start, 9 words, end
    # 6 tokens keep 4 words: "a red square on" twice, "a blue circle in" once
    assert caption_cut(tokenizer, tokens, 6, requested=False) == CaptionCut(
        cut=3, merged=2, limit=6, captions=9, longest=11, requested=False
    )
    assert caption_cut(tokenizer, tokens, 11, requested=False).cut == 0
    # 5 tokens keep 3 words: "a blue circle" (cut) now equals "a blue circle" (whole)
    assert caption_cut(tokenizer, tokens, 5, requested=True) == CaptionCut(
        cut=3, merged=3, limit=5, captions=9, longest=11, requested=True
    )


def test_run_plan_and_a_warning_say_how_many_captions_the_encoders_token_limit_cuts_and_merges(
    tmp_path, tiny_unet_config_file, caplog
):
    from make_text_encoder import build_text_encoder as make_text_encoder

    data = write_imagefolder(tmp_path / "data", count=8, captions=LONG_CAPTIONS)
    encoder = make_text_encoder(LONG_CAPTIONS, tmp_path / "te", hidden_size=64, num_layers=1, num_heads=2, max_length=6)
    flags = ("--max_train_steps", "1", "--checkpointing_steps", "1", "--save_images_epochs", "1000")
    with caplog.at_level("INFO", logger="text_to_image"):
        run_ok(train_argv(data, encoder, tiny_unet_config_file, tmp_path / "out", *flags))
    plan = next(record.getMessage() for record in caplog.records if "padded to" in record.getMessage())
    assert (
        "padded to 6 tokens, which cuts 3 of 9 distinct captions (2 become token-for-token identical to another"
        " caption); batch 4" in plan
    )
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert (
        "the tokenizer's 6-token limit cuts 3 of 9 distinct captions, and 2 of them become token-for-token identical"
        " to another caption once cut (the longest has 11 tokens): for a caption-vocabulary encoder, rebuild it"
        " with examples/make_text_encoder.py and a larger --max_length (at least 11, or none: it then fits the"
        " longest caption); else shorten the captions"
    ) in warnings


def test_frozen_encoder_is_freed_after_caching_and_grids_match_the_encoder(argv, tiny_text_encoder_dir):
    import numpy as np

    args = parse_args(argv("--validation_prompts", "a red square", "a blue circle"))
    args.output_dir.mkdir(parents=True)
    run = setup_run(RunConfig.from_args(args))
    assert run.trainer.text_encoder is None and run.outputs.text_encoder is None  # only the cached table trains
    tokenizer, encoder = build_text_encoder(str(tiny_text_encoder_dir), None)
    unet = run.accelerator.unwrap_model(run.trainer.unet)
    with_encoder = build_pipeline(unet, encoder, tokenizer, run.outputs.noise_scheduler, run.text_max_length)
    without = build_pipeline(unet, None, tokenizer, run.outputs.noise_scheduler, run.text_max_length)
    sample = (run.outputs.grids.prompts, 4, 2, 3.0, 0)
    expected, _ = sample_images(with_encoder, *sample)
    images, captions = sample_images(without, *sample, run.outputs.grids.prompt_embeddings)
    assert captions == ["a red square", "a red square", "a blue circle", "a blue circle"]
    for image, reference in zip(images, expected, strict=True):
        assert np.abs(np.asarray(image, np.int16) - np.asarray(reference, np.int16)).max() <= 1
