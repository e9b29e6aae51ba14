"""TextToImagePipeline: shapes, guidance, seeds, every sampler x beta schedule x prediction type, flow matching,
loading, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import made_once
from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline_text_to_image import (
    SCHEDULER_NAMES,
    IncompatibleSampler,
    ProgressionRecorder,
    TextToImagePipeline,
    copy_pipeline_code,
    default_sampler,
    encode_text,
    main,
    make_captioned_grid,
    make_sampling_scheduler,
    parse_args,
    progression_steps,
)

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
TEXT_MAX_LENGTH = 8
PROMPTS = ["a red square", "a blue circle"]
FIT_STEPS = 20


@pytest.fixture(scope="session")
def text_parts(tiny_text_encoder_dir):
    return CLIPTokenizer.from_pretrained(tiny_text_encoder_dir), CLIPTextModel.from_pretrained(tiny_text_encoder_dir)


@pytest.fixture(scope="session")
def random_unet(tiny_unet_config_file) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(json.loads(tiny_unet_config_file.read_text())).eval()


def coloured_squares(count: int = 8, size: int = 16) -> torch.Tensor:
    """Images in [-1, 1]: a coloured square on a mid-grey background, far from the clipping range."""
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(count, 3, size, size)
    for index in range(count):
        images[index, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = torch.rand(
            3, 1, 1, generator=generator
        )
    return images * 1.2 - 0.6


def fit_unet(config: dict, prediction_type: str, steps: int = FIT_STEPS) -> UNet2DConditionModel:
    """A UNet fitted for a few steps: unlike random weights, its predictions agree with x_t, as a trained model's do."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    images = coloured_squares()
    context = torch.zeros(len(images), TEXT_MAX_LENGTH, config["cross_attention_dim"])
    for _ in range(steps):
        noise, timesteps = torch.randn_like(images), torch.randint(0, 1000, (len(images),))
        noisy = scheduler.add_noise(images, noise, timesteps)
        targets = {"epsilon": noise, "sample": images, "v_prediction": scheduler.get_velocity(images, noise, timesteps)}
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, context).sample, targets[prediction_type])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet.eval()


def fitted_once(tmp_path_factory, config: dict, name: str, fit) -> UNet2DConditionModel:
    """`fit()`'s UNet, fitted by one worker and loaded by the others (the fit is seeded: the same weights)."""

    def save(folder: Path) -> None:
        torch.save(fit().state_dict(), folder / "unet.pt")

    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(torch.load(made_once(tmp_path_factory, name, save) / "unet.pt"))
    return unet.eval()


@pytest.fixture(scope="session")
def fitted_unets(tiny_unet_config_file, tmp_path_factory) -> dict[str, UNet2DConditionModel]:
    config = json.loads(tiny_unet_config_file.read_text())
    return {
        prediction_type: fitted_once(
            tmp_path_factory, config, f"fitted-{prediction_type}", lambda kind=prediction_type: fit_unet(config, kind)
        )
        for prediction_type in PREDICTION_TYPES
    }


def build_pipeline(unet, text_parts, scheduler_name="dpm", beta_schedule="linear", prediction_type="epsilon"):
    tokenizer, text_encoder = text_parts
    training_scheduler = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    scheduler = make_sampling_scheduler(scheduler_name, training_scheduler.config)
    pipe = TextToImagePipeline(unet, scheduler, text_encoder, tokenizer, text_max_length=TEXT_MAX_LENGTH)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(random_unet, text_parts) -> TextToImagePipeline:
    return build_pipeline(random_unet, text_parts)


def generate(pipe, prompts=PROMPTS, seed=0, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 3, "output_type": "np", **kwargs}
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), **kwargs).images


def saturated_share(images: np.ndarray) -> float:
    return float(((images == 0) | (images == 1)).mean())


@pytest.fixture(scope="session")
def saved_pipeline(tmp_path_factory, random_unet, text_parts) -> Path:
    output_dir = tmp_path_factory.mktemp("trained") / "output"
    build_pipeline(random_unet, text_parts).save_pretrained(output_dir)
    copy_pipeline_code(output_dir)
    return output_dir


# ---- shapes and output types


def test_batched_prompts_times_images_per_prompt_give_one_image_each(pipe):
    images = generate(pipe, num_images_per_prompt=3)
    assert images.shape == (6, 16, 16, 3)
    assert images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1


def test_pt_output_is_nchw_in_unit_range_and_pil_output_is_rgb_images(pipe):
    tensors = generate(pipe, output_type="pt", num_images_per_prompt=2)
    assert tuple(tensors.shape) == (4, 3, 16, 16)
    assert tensors.min() >= 0 and tensors.max() <= 1
    pils = generate(pipe, output_type="pil")
    assert [(image.mode, image.size) for image in pils] == [("RGB", (16, 16))] * 2


def test_a_list_of_prompts_runs_the_unet_once_per_step_as_one_batch(pipe):
    batch_sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        generate(pipe, num_images_per_prompt=2, guidance_scale=3.0)
    finally:
        hook.remove()
    assert batch_sizes == [8, 8, 8]  # 2 prompts x 2 images x (conditional + unconditional), 3 steps


def test_guidance_scale_of_one_skips_the_unconditional_branch(pipe):
    batch_sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        generate(pipe, guidance_scale=1.0)
    finally:
        hook.remove()
    assert batch_sizes == [2, 2, 2]


def test_prompts_are_encoded_once_per_call(pipe):
    calls = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        generate(pipe, negative_prompt="a yellow square", num_inference_steps=4)
    finally:
        hook.remove()
    assert calls == [4]  # 2 prompts + 2 negative prompts in one text-encoder call


# ---- guidance and seeds


def test_guidance_on_and_off_give_different_images(pipe):
    assert not np.array_equal(generate(pipe, guidance_scale=1.0), generate(pipe, guidance_scale=4.0))


def test_negative_prompt_replaces_the_empty_unconditional_prompt(pipe):
    plain = generate(pipe, guidance_scale=4.0)
    negative = generate(pipe, guidance_scale=4.0, negative_prompt="a yellow square")
    assert not np.array_equal(plain, negative)


@torch.no_grad()
def test_guided_output_is_unconditional_plus_scale_times_the_difference(pipe, text_parts):
    tokenizer, text_encoder = text_parts
    conditional = encode_text(tokenizer, text_encoder, PROMPTS, TEXT_MAX_LENGTH)
    negative = encode_text(tokenizer, text_encoder, ["a yellow square"] * 2, TEXT_MAX_LENGTH)
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(3)
    timestep = pipe.scheduler.timesteps[1]
    pipe._guidance_scale = 4.0
    guided, _ = pipe.predict(latents, timestep, torch.cat([negative, conditional]), clip_denoised=False)
    model_input = pipe.scheduler.scale_model_input(latents, timestep)
    apart = [pipe.unet(model_input, timestep, encoder_hidden_states=text).sample for text in (negative, conditional)]
    assert torch.allclose(guided, apart[0] + 4.0 * (apart[1] - apart[0]), atol=1e-5)
    assert not torch.allclose(guided, apart[1] + 4.0 * (apart[0] - apart[1]), atol=1e-3)  # the order matters


def test_the_unconditional_branch_is_the_negative_prompts_embedding(pipe, text_parts):
    tokenizer, text_encoder = text_parts
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    try:
        generate(pipe, guidance_scale=4.0, negative_prompt="a yellow square", num_inference_steps=1)
        generate(pipe, guidance_scale=4.0, num_inference_steps=1)
    finally:
        hook.remove()
    with torch.no_grad():
        prompts = encode_text(tokenizer, text_encoder, PROMPTS, TEXT_MAX_LENGTH)
        negative = encode_text(tokenizer, text_encoder, ["a yellow square"] * 2, TEXT_MAX_LENGTH)
        empty = encode_text(tokenizer, text_encoder, ["", ""], TEXT_MAX_LENGTH)
    assert torch.allclose(seen[0], torch.cat([negative, prompts]), atol=1e-6)
    assert torch.allclose(seen[1], torch.cat([empty, prompts]), atol=1e-6)


def test_precomputed_prompt_embeds_give_the_same_images_as_prompts(pipe, text_parts):
    tokenizer, text_encoder = text_parts
    with torch.no_grad():
        embeds = encode_text(tokenizer, text_encoder, PROMPTS, TEXT_MAX_LENGTH)
        negative = encode_text(tokenizer, text_encoder, ["", ""], TEXT_MAX_LENGTH)
    from_embeds = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert np.array_equal(from_embeds, generate(pipe))


def test_same_seed_gives_bit_identical_images_with_a_stochastic_sampler(random_unet, text_parts):
    pipe = build_pipeline(random_unet, text_parts, scheduler_name="ddpm")
    first, second = generate(pipe, seed=7), generate(pipe, seed=7)
    assert torch.equal(torch.from_numpy(first), torch.from_numpy(second))
    assert not np.array_equal(first, generate(pipe, seed=8))


def test_a_list_of_generators_gives_one_image_per_generator(random_unet, text_parts):
    pipe = build_pipeline(random_unet, text_parts, scheduler_name="ddpm")
    generators = [torch.Generator().manual_seed(seed) for seed in (11, 12)]
    batch = pipe(
        ["a red square"], num_images_per_prompt=2, generator=generators, num_inference_steps=3, output_type="pt"
    )
    alone = pipe(["a red square"], generator=torch.Generator().manual_seed(12), num_inference_steps=3, output_type="pt")
    # batch 2 and batch 1 take different BLAS paths: ~1e-5 apart, while another seed is ~1 apart
    torch.testing.assert_close(batch.images[1:], alone.images, atol=1e-4, rtol=0)
    assert not torch.allclose(batch.images[0], batch.images[1])


def test_a_generator_list_of_the_wrong_length_is_refused(pipe):
    with pytest.raises(ValueError, match="generators"):
        pipe(PROMPTS, generator=[torch.Generator().manual_seed(0)], num_inference_steps=2)


# ---- every sampler, beta schedule and prediction type


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("scheduler_name", SCHEDULER_NAMES)
def test_every_sampler_gives_finite_unsaturated_images(
    fitted_unets, text_parts, scheduler_name, beta_schedule, prediction_type
):
    pipe = build_pipeline(fitted_unets[prediction_type], text_parts, scheduler_name, beta_schedule, prediction_type)
    images = generate(pipe, num_inference_steps=4)
    assert images.shape == (2, 16, 16, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert saturated_share(images) < 0.5


def test_without_x0_clipping_euler_saturates_with_cosine_betas(fitted_unets, text_parts):
    """Why clip_denoised exists: alpha_bar(T) ~ 0 makes Euler's x0 = (x - s eps) / a explode."""
    pipe = build_pipeline(fitted_unets["epsilon"], text_parts, "euler", "squaredcos_cap_v2", "epsilon")
    assert saturated_share(generate(pipe, num_inference_steps=4, clip_denoised=False)) > 0.9
    assert saturated_share(generate(pipe, num_inference_steps=4)) < 0.5


def test_sampling_scheduler_keeps_the_training_betas_and_prediction_type():
    config = DDPMScheduler(
        num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    ).config
    for name in SCHEDULER_NAMES:
        scheduler = make_sampling_scheduler(name, config)
        assert (scheduler.config.num_train_timesteps, scheduler.config.beta_schedule) == (500, "squaredcos_cap_v2")
        assert scheduler.config.prediction_type == "v_prediction"
    dpm = make_sampling_scheduler("dpm", config)
    assert (dpm.config.algorithm_type, dpm.config.thresholding, dpm.config.lambda_min_clipped) == (
        "dpmsolver++",
        True,
        -5.1,
    )


def test_pixels_map_from_minus_one_one_to_unit_range_without_a_vae_factor():
    latents = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    images = TextToImagePipeline.postprocess(latents, "np")
    assert images[0, 0, :, 0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


# ---- text conditioning


def test_encode_text_pads_every_prompt_to_max_length(text_parts):
    tokenizer, text_encoder = text_parts
    with torch.no_grad():
        embeddings = encode_text(tokenizer, text_encoder, ["", "a red square on a white background"], 6)
    assert tuple(embeddings.shape) == (2, 6, 64)


def test_text_max_length_round_trips_through_save_pretrained(saved_pipeline):
    assert json.loads((saved_pipeline / "model_index.json").read_text())["text_max_length"] == TEXT_MAX_LENGTH
    loaded = TextToImagePipeline.from_pretrained(saved_pipeline)
    assert loaded.config.text_max_length == TEXT_MAX_LENGTH
    assert loaded.text_max_length == TEXT_MAX_LENGTH
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"


# ---- grids and the denoising strip


def test_captioned_grid_upscales_small_images_and_leaves_room_for_captions():
    images = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    grid = make_captioned_grid(images, ["a red square", "a green circle", "a blue square"], columns=2)
    assert grid.width == 2 * 128
    assert grid.height > 2 * 128
    assert grid.getpixel((5, 5)) == (255, 0, 0)
    assert grid.getpixel((128 + 5, 5)) == (0, 128, 0)


def test_progression_strip_has_a_row_per_image_and_a_column_per_chosen_step(pipe):
    steps = progression_steps(6, count=3)
    recorder = ProgressionRecorder(steps)
    images = pipe(PROMPTS, num_inference_steps=6, callback_on_step_end=recorder, output_type="pt").images
    assert steps == [0, 2, 5]
    assert recorder.recorded_steps == steps
    assert torch.equal(recorder.frames[-1], images)  # the last column is the final image itself
    strip = recorder.strip(PROMPTS)
    assert strip.width == 3 * 128
    assert strip.height > 2 * 128


# ---- loading and the CLI


@pytest.mark.slow
def test_custom_pipeline_loads_in_a_fresh_process_outside_the_repo(saved_pipeline, tmp_path):
    script = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "out = sys.argv[1]\n"
        "pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=out, trust_remote_code=True)\n"
        "images = pipe('a red square', num_inference_steps=2, output_type='np', generator=torch.manual_seed(0)).images\n"
        "print(type(pipe).__name__, type(pipe).__module__, images.shape, pipe.text_max_length)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-c", script, str(saved_pipeline)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name, module, *rest = result.stdout.split()
    assert name == "TextToImagePipeline"
    assert module != "pipeline_text_to_image"  # the copy in the output folder, not this repo's file
    assert " ".join(rest) == f"(1, 16, 16, 3) {TEXT_MAX_LENGTH}"


def test_cli_writes_a_captioned_grid_and_a_progression_strip(saved_pipeline, tmp_path, capsys):
    grid, strip = tmp_path / "grid.png", tmp_path / "strip.png"
    argv = ["--model", str(saved_pipeline), "--prompt", "a red square", "--prompt", "a blue circle"]
    argv += ["--num_images_per_prompt", "2", "--num_inference_steps", "3", "--scheduler", "euler", "--seed", "1"]
    main(argv + ["--device", "cpu", "--output", str(grid), "--progression", str(strip)])
    assert Image.open(grid).size[0] == 2 * 128
    assert Image.open(strip).size[0] == 3 * 128
    assert f"wrote 4 images to {grid}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "given",
    [
        ["--prompt", "a red square", "a blue circle", "a red circle"],
        ["--prompt", "a red square", "--prompt", "a blue circle", "--prompt", "a red circle"],
        ["--prompt", "a red square", "a blue circle", "--prompt", "a red circle"],
    ],
)
def test_cli_takes_prompts_after_one_flag_or_one_flag_each(saved_pipeline, given):
    args = parse_args(["--model", str(saved_pipeline), *given])
    assert args.prompt == ["a red square", "a blue circle", "a red circle"]


def test_cli_names_a_model_folder_without_model_index_json(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--prompt", "a red square"])
    assert f"--model {tmp_path} has no model_index.json" in capsys.readouterr().err


def test_under_autocast_guidance_and_the_sampler_update_run_in_the_latents_precision(pipe):
    pipe._guidance_scale = 3.0  # as __call__ sets it
    latents = torch.randn(1, 3, 16, 16)
    embeddings = torch.randn(2, 5, 64)
    pipe.scheduler.set_timesteps(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, denoised = pipe.predict(latents, pipe.scheduler.timesteps[0], embeddings, clip_denoised=True)
    assert output.dtype == denoised.dtype == torch.float32  # the UNet's own output is bf16 here


def test_the_cli_loads_the_pipeline_in_the_asked_dtype_rather_than_casting_it_after(saved_pipeline, monkeypatch):
    import pipeline_text_to_image as module

    asked = {}
    load = module.TextToImagePipeline.from_pretrained

    def spy(path, **kwargs):
        asked.update(kwargs)
        return load(path, **kwargs)

    monkeypatch.setattr(module.TextToImagePipeline, "from_pretrained", spy)
    loaded = module.load_pipeline(saved_pipeline, None, "cpu", torch.float16)
    assert asked == {"torch_dtype": torch.float16} and loaded.unet.dtype == torch.float16


# ---- flow matching: FlowMatchEulerDiscreteScheduler, the UNet's timestep t * num_train_timesteps


def fit_flow_unet(config: dict, steps: int = FIT_STEPS) -> UNet2DConditionModel:
    """fit_unet for flow matching, as the trainer trains it: the velocity noise - x0 at x_t = (1 - t) x0 + t noise."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    images = coloured_squares()
    context = torch.zeros(len(images), TEXT_MAX_LENGTH, config["cross_attention_dim"])
    for _ in range(steps):
        noise, t = torch.randn_like(images), torch.rand(len(images))
        noisy = (1 - t.view(-1, 1, 1, 1)) * images + t.view(-1, 1, 1, 1) * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, t * 1000, context).sample, noise - images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet.eval()


@pytest.fixture(scope="session")
def flow_unet(tiny_unet_config_file, tmp_path_factory) -> UNet2DConditionModel:
    config = json.loads(tiny_unet_config_file.read_text())
    return fitted_once(tmp_path_factory, config, "fitted-flow", lambda: fit_flow_unet(config))


def build_flow_pipeline(unet, text_parts, shift: float = 1.0) -> TextToImagePipeline:
    """The trainer's flow-matching export: its training scheduler's config, sampled by the default sampler."""
    tokenizer, text_encoder = text_parts
    config = FlowMatchEulerDiscreteScheduler(shift=shift).config
    scheduler = make_sampling_scheduler(default_sampler(config), config)
    pipe = TextToImagePipeline(unet, scheduler, text_encoder, tokenizer, text_max_length=TEXT_MAX_LENGTH)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def saved_flow_pipeline(tmp_path_factory, flow_unet, text_parts) -> Path:
    output_dir = tmp_path_factory.mktemp("flow") / "output"
    build_flow_pipeline(flow_unet, text_parts, shift=2.0).save_pretrained(output_dir)
    copy_pipeline_code(output_dir)
    return output_dir


def test_a_flow_matching_model_samples_finite_unsaturated_images_with_guidance_and_a_negative_prompt(
    flow_unet, text_parts
):
    pipe = build_flow_pipeline(flow_unet, text_parts)
    images = generate(pipe, num_inference_steps=4, guidance_scale=3.0, negative_prompt="a green square")
    assert images.shape == (2, 16, 16, 3)
    assert np.isfinite(images).all()
    assert saturated_share(images) < 0.5
    assert not np.array_equal(images, generate(pipe, num_inference_steps=4, guidance_scale=3.0))


def test_flow_sampling_starts_from_unit_noise_and_feeds_the_unet_t_times_num_train_timesteps(random_unet, text_parts):
    pipe = build_flow_pipeline(random_unet, text_parts, shift=3.0)
    seen = []
    hook = random_unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].clone(), float(args[1]))), with_kwargs=True
    )
    try:
        generate(pipe, num_inference_steps=4)
    finally:
        hook.remove()
    first_input, _ = seen[0]
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first_input, torch.cat([noise, noise]))  # x_1 is the noise itself: no init_noise_sigma
    sigmas = pipe.scheduler.sigmas[:-1]  # t of each step, 1 first, shifted by 3 as training shifts them
    assert [timestep for _, timestep in seen] == pytest.approx((sigmas * 1000).tolist())
    assert seen[0][1] == 1000.0


def test_a_flow_matching_model_samples_with_its_euler_and_refuses_the_ddpm_samplers_in_one_line():
    config = FlowMatchEulerDiscreteScheduler(num_train_timesteps=500, shift=3.0).config
    euler = make_sampling_scheduler("euler", config)
    assert type(euler) is FlowMatchEulerDiscreteScheduler
    assert (euler.config.num_train_timesteps, euler.config.shift) == (500, 3.0)
    for name in sorted(set(SCHEDULER_NAMES) - {"euler"}):
        with pytest.raises(IncompatibleSampler, match=f"scheduler '{name}' samples DDPM-trained models.*use 'euler'"):
            make_sampling_scheduler(name, config)
    assert (default_sampler(config), default_sampler(DDPMScheduler().config)) == ("euler", "dpm")


def test_a_saved_flow_matching_folder_loads_as_a_custom_pipeline_and_samples_with_guidance(saved_flow_pipeline):
    pipe = DiffusionPipeline.from_pretrained(
        saved_flow_pipeline, custom_pipeline=str(saved_flow_pipeline), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "TextToImagePipeline" and type(pipe).__module__ != "pipeline_text_to_image"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 2.0
    images = pipe(
        PROMPTS,
        negative_prompt="a green square",
        guidance_scale=3.0,
        num_images_per_prompt=2,
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (4, 16, 16, 3) and np.isfinite(images).all()


# what both CLIs (pipeline_text_to_image.py, evaluate_shapes.py) print for --scheduler dpm on a flow-matching model
REFUSED_DPM = (
    "error: --scheduler: scheduler 'dpm' samples DDPM-trained models, but this model was trained with flow"
    " matching; use 'euler' (FlowMatchEulerDiscreteScheduler)"
)


def test_evaluate_shapes_samples_a_flow_matching_model_with_its_euler_and_refuses_dpm_in_one_line(
    saved_flow_pipeline, capsys
):
    import evaluate_shapes

    flags = ["--model", str(saved_flow_pipeline), "--images_per_prompt", "1", "--num_inference_steps", "2"]
    shares = evaluate_shapes.main(flags)
    assert set(shares) == {"colour", "shape", "size", "all"}
    assert "36 generated images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate_shapes.main([*flags, "--scheduler", "dpm"])
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.endswith(REFUSED_DPM)


def test_the_cli_refuses_a_ddpm_sampler_for_a_flow_matching_model_in_one_line(saved_flow_pipeline):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved_flow_pipeline), "--prompt", "a red square", "--scheduler", "dpm", "--device", "cpu"])
    assert str(exit_info.value.code) == REFUSED_DPM
