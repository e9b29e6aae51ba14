"""GPU code paths that CPU can still check: devices and dtypes the code asks for, up-front refusals, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_captions, train_argv
from test_distributed import launch
from test_train import run_error, run_ok

from text_to_image.batches import crop_and_flip
from text_to_image.checkpoints import CHECKPOINT_MARKER, list_checkpoints
from text_to_image.common import UserError
from text_to_image.config import OptimConfig, RunConfig, parse_args
from text_to_image.data import IndexedBatches, Shard, epoch_order
from text_to_image.models import (
    CachedEmbeddings,
    build_text_encoder,
    encode_captions_once,
    freeze_what_last_hidden_state_skips,
)
from text_to_image.optimization import unet_with_ema
from text_to_image.setup import make_accelerator, setup_run
from text_to_image.training import Meter


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_the_caption_table_stays_in_cpu_memory_and_a_batch_goes_to_the_device(tiny_text_encoder_dir):
    tokenizer, encoder = build_text_encoder(str(tiny_text_encoder_dir), None)
    captions = ["", *tiny_captions()]
    table = encode_captions_once(tokenizer, encoder, captions, 6, None, "cpu")
    assert table.device.type == "cpu" and table.dtype == torch.float32
    conditioner = CachedEmbeddings(captions, table, device="meta")  # a device CPU tests can name
    batch = conditioner.embed(["a red square", "", "a red square"])
    assert batch.device.type == "meta" and batch.shape == (3, 6, 64)
    assert conditioner.table.device.type == "cpu"
    on_cpu = CachedEmbeddings(captions, table, device="cpu").embed(["a red square", ""])
    assert torch.equal(on_cpu, table[[captions.index("a red square"), 0]])


def test_pixels_cross_to_the_device_as_uint8_and_are_scaled_there():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(3, 4, 4)
    crossed = []
    original = torch.Tensor.to

    def spy(tensor, *args, **kwargs):
        crossed.append(tensor.dtype)
        return original(tensor, *args, **kwargs)

    torch.Tensor.to = spy
    try:
        batch = crop_and_flip([image], 4, torch.zeros(1, 2), None, torch.device("meta"))
    finally:
        torch.Tensor.to = original
    assert crossed == [torch.uint8] and batch.device.type == "meta" and batch.dtype == torch.float32


def test_one_shuffle_per_epoch_whatever_the_order_micro_batches_are_asked_in(monkeypatch):
    from types import SimpleNamespace

    calls = []
    shuffle = epoch_order
    monkeypatch.setattr("text_to_image.data.epoch_order", lambda *args: calls.append(args[2]) or shuffle(*args))
    table = SimpleNamespace(usable_rows=torch.arange(40))
    batches = IndexedBatches(table, seed=1, shard=Shard(size=4), batches_per_epoch=10, num_workers=0)
    for index in [0, 1, 10, 2, 11, 3, 12, 20]:  # the workers' sampler runs into the next epoch
        assert batches.rows(index) == shuffle(table.usable_rows, 1, index // 10)[index % 10 * 4 :][:4].tolist()
    assert calls == [0, 1, 2]


def test_torch_compile_on_a_gpu_older_than_volta_is_refused_up_front(argv, monkeypatch, capsys):
    fake_gpu(monkeypatch, (6, 0), "Tesla P100-PCIE-16GB")
    error = run_error(argv("--torch_compile"), capsys)
    assert (
        "--torch_compile needs a GPU of compute capability 7.0 or newer (Triton); Tesla P100-PCIE-16GB is 6.0" in error
    )


@pytest.mark.parametrize("capability, warned", [((7, 5), True), ((8, 0), False)])
def test_bf16_on_a_gpu_without_native_bf16_warns_and_says_fp16(argv, monkeypatch, caplog, capability, warned):
    fake_gpu(monkeypatch, capability, "Tesla T4" if warned else "A100")
    OptimConfig.from_args(parse_args(argv("--mixed_precision", "bf16")))
    assert ("is emulated and slow; use --mixed_precision fp16" in caplog.text) == warned


def test_a_checkpoint_is_resumed_only_with_the_torch_compile_it_was_written_with(argv, tmp_path, capsys):
    run_ok(argv("--max_train_steps", "2"))
    checkpoint = tmp_path / "out" / "checkpoint-2"
    state = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    assert state["torch_compile"] is False
    state["torch_compile"] = True  # as a compiled run writes it (weights under "_orig_mod." names)
    (checkpoint / CHECKPOINT_MARKER).write_text(json.dumps(state))
    error = run_error(argv("--max_train_steps", "4", "--resume_from_checkpoint", "latest"), capsys)
    assert f"{checkpoint} was written with --torch_compile" in error and "add --torch_compile to resume it" in error


@pytest.mark.slow
def test_ema_is_placed_on_the_device_after_the_checkpoint_is_loaded(argv, monkeypatch):
    from diffusers.training_utils import EMAModel

    run_ok(argv("--use_ema", "--max_train_steps", "2"))
    events = []
    load_state = make_accelerator

    def accelerator_spy(*args):
        accelerator = load_state(*args)
        original = accelerator.load_state
        accelerator.load_state = lambda *a, **k: events.append("load_state") or original(*a, **k)
        return accelerator

    ema_to = EMAModel.to
    monkeypatch.setattr("text_to_image.setup.make_accelerator", accelerator_spy)
    monkeypatch.setattr(EMAModel, "to", lambda self, *a, **k: events.append("ema.to") or ema_to(self, *a, **k))
    args = parse_args(argv("--use_ema", "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    setup_run(RunConfig.from_args(args))
    assert events[-2:] == ["load_state", "ema.to"]  # accelerate loads custom objects onto the CPU


def test_a_nan_on_any_process_stops_every_process_at_the_same_step(tmp_path):
    meter = Meter(mean_over_processes=lambda loss: loss + float("nan"))  # another rank's NaN
    meter.add(torch.tensor(0.5), images=4)
    with pytest.raises(UserError, match="loss became NaN/inf between steps 0 and 3"):
        meter.flush(3, tmp_path)


def write_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT (with its pooler) and a word-piece vocabulary of the test captions."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    words = sorted({word for caption in tiny_captions() for word in caption.split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=16).save_pretrained(folder)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_ddp_trains_a_bert_encoder_whose_pooler_gets_no_gradient(tiny_imagefolder, tiny_unet_config_file, tmp_path):
    bert = write_tiny_bert(tmp_path / "bert")
    flags = train_argv(tiny_imagefolder, bert, tiny_unet_config_file, tmp_path / "out", "--train_text_encoder")
    flags[flags.index("--train_batch_size") + 1] = "2"
    result = launch(flags, num_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list_checkpoints(tmp_path / "out")[-1].name == "checkpoint-4"
    tokenizer, encoder = build_text_encoder(str(bert), None)
    freeze_what_last_hidden_state_skips(encoder)
    assert not any(parameter.requires_grad for parameter in encoder.pooler.parameters())


def test_a_unet_held_in_bf16_is_saved_in_fp32_with_the_unrounded_ema_weights(tiny_unet_config_file):
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    unet = UNet2DConditionModel.from_config(json.loads(tiny_unet_config_file.read_text()))
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    for shadow in ema.shadow_params:
        shadow.add_(1e-4)  # a difference bf16 cannot hold at these magnitudes
    unet.to(torch.bfloat16)  # as DeepSpeed holds it
    with unet_with_ema(unet, ema, fp32=True) as saved:
        assert all(parameter.dtype == torch.float32 for parameter in saved.parameters())
        assert all(torch.equal(p, s) for p, s in zip(saved.parameters(), ema.shadow_params, strict=True))
    assert next(unet.parameters()).dtype == torch.bfloat16  # the training copy is untouched
