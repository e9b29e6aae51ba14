"""--streaming: a datasets IterableDataset as input, shuffled, decoded per batch, resumable, with the usual clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_argv, write_imagefolder
from test_train import assert_same_tensors, checkpoint_weights, run_error, run_ok, unet_weights

import text_to_image.data
from text_to_image.checkpoints import read_train_state
from text_to_image.config import DataConfig, parse_args
from text_to_image.evaluation import EVALUATION_LOG
from text_to_image.models import LiveEncoder, build_text_encoder


def write_parquet_shards(folder: Path, images: Path, shards: int = 2) -> Path:
    """The imagefolder's rows as parquet shards with PNG bytes in an Image column, the way Hub datasets store them."""
    from datasets import Dataset, Features, Image, Value

    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    table = {
        "image": [{"bytes": (images / row["file_name"]).read_bytes(), "path": None} for row in rows],
        "text": [row["text"] for row in rows],
    }
    dataset = Dataset.from_dict(table, features=Features({"image": Image(), "text": Value("string")}))
    folder.mkdir(parents=True)
    for index in range(shards):
        dataset.shard(shards, index).to_parquet(str(folder / f"train-{index:05d}-of-{shards:05d}.parquet"))
    return folder


@pytest.fixture
def stream_argv(tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path):
    def make(*extra: str, output: Path | None = None, data: Path | None = None) -> list[str]:
        streaming = ("--streaming", "--shuffle_buffer_size", "8", *extra)
        models = (data or tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file)
        return train_argv(*models, output or tmp_path / "out", *streaming)

    return make


def as_dataset_name(argv: list[str]) -> list[str]:
    """The same run with its data passed as --dataset_name (a folder load_dataset understands)."""
    index = argv.index("--train_data_dir")
    return [*argv[:index], "--dataset_name", *argv[index + 1 :]]


def stream_args(data: Path, *extra: str):
    return parse_args(["--train_data_dir", str(data), "--streaming", "--max_train_steps", "1", *extra])


def open_stream(args, rank: int = 0, processes: int = 1):
    return text_to_image.data.open_stream(DataConfig.from_args(args), rank, processes, seed=0, start_micro_index=0)


# ---------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.slow
def test_streamed_parquet_shards_train_with_decoding_workers_and_save_a_pipeline(
    stream_argv, tiny_imagefolder, tmp_path, capsys
):
    shards = write_parquet_shards(tmp_path / "parquet", tiny_imagefolder)
    run_ok(as_dataset_name(stream_argv("--dataloader_num_workers", "2", "--max_train_steps", "2", data=shards)))
    output = tmp_path / "out"
    assert (output / "model_index.json").is_file() and (output / "unet" / "config.json").is_file()
    assert read_train_state(output / "checkpoint-2").step == 2
    assert "finished at step 2/2" in capsys.readouterr().out


@pytest.mark.slow
def test_streamed_resume_continues_where_the_stream_was(stream_argv, tmp_path):
    """8 images, batch 4: a pass is 2 steps, so resuming at step 3 must skip 1.5 passes, not restart the stream."""
    data = write_imagefolder(tmp_path / "eight", count=8)
    flags = ("--use_ema", "--random_flip", "--max_train_steps", "4", "--checkpointing_steps", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(stream_argv(*flags, output=straight, data=data))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    run_ok(stream_argv(*flags, "--resume_from_checkpoint", "latest", output=resumed, data=data))
    assert_same_tensors(checkpoint_weights(straight / "checkpoint-4"), checkpoint_weights(resumed / "checkpoint-4"))
    assert_same_tensors(unet_weights(straight), unet_weights(resumed))  # EMA weights


# ---------------------------------------------------------------------------------------------
# Refusals: one clear line


def test_streaming_needs_max_train_steps(stream_argv, capsys):
    flags = stream_argv()
    del flags[flags.index("--max_train_steps") : flags.index("--max_train_steps") + 2]
    assert "error: --streaming needs --max_train_steps" in run_error(flags, capsys)


def test_streamed_missing_caption_column_lists_the_columns(stream_argv, capsys):
    message = run_error(stream_argv("--caption_column", "caption"), capsys)
    assert "--caption_column 'caption' not in dataset columns ['image', 'text']" in message


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [("train.jsonl", "has no rows"), ("train.parquet", "streams no rows for this process")],
)
def test_empty_stream_is_refused(stream_argv, tmp_path, capsys, file_name, expected):
    from datasets import Dataset, Features, Image, Value

    empty = tmp_path / "empty"
    empty.mkdir()
    if file_name.endswith(".jsonl"):
        (empty / file_name).write_text("")  # no row to infer the columns from
    else:  # columns known from the schema, but no rows
        features = Features({"image": Image(), "text": Value("string")})
        Dataset.from_dict({"image": [], "text": []}, features=features).to_parquet(str(empty / file_name))
    message = run_error(as_dataset_name(stream_argv(data=empty)), capsys)
    assert f"error: the dataset {empty} {expected}" in message and "Traceback" not in message


# ---------------------------------------------------------------------------------------------
# The stream itself


def test_stream_order_differs_between_passes_and_covers_every_example(tiny_imagefolder):
    stream = open_stream(stream_args(tiny_imagefolder, "--shuffle_buffer_size", "16"))
    first, second = stream.take(16), stream.take(16)
    names = [[example["image"]["path"] for example in passed] for passed in (first, second)]
    assert sorted(names[0]) == sorted(names[1]) and len(set(names[0])) == 16
    assert names[0] != names[1]


def test_each_process_streams_its_own_share(tiny_imagefolder):
    shares = [open_stream(stream_args(tiny_imagefolder), rank, 2).take(8) for rank in range(2)]
    paths = [{example["image"]["path"] for example in share} for share in shares]
    assert len(paths[0]) == len(paths[1]) == 8 and not paths[0] & paths[1]


def test_decoding_workers_return_the_same_batches_in_the_same_order(tmp_path):
    captions = [["a red square", "a red circle"], None, ["a blue circle"], []] * 3
    data = write_imagefolder(tmp_path / "data", count=12, captions=captions)
    (data / "003.png").write_bytes(b"not a png")  # stood in for by another image of its batch

    def batches(workers: str) -> list:
        args = stream_args(data, "--train_batch_size", "4", "--resolution", "16", "--dataloader_num_workers", workers)
        stream = open_stream(args)
        examples = [stream.examples(index) for index in range(4)]  # over a pass boundary
        skipped.append(stream.skipped)
        return [(batch.images, batch.caption_options) for batch in examples]

    skipped = []
    in_process, in_workers = batches("0"), batches("2")
    assert skipped[0] == skipped[1] >= 1
    for (images, options), (worker_images, worker_options) in zip(in_process, in_workers, strict=True):
        assert options == worker_options and len(images) == 4
        assert all(torch.equal(image, other) for image, other in zip(images, worker_images, strict=True))
    seen = {text for _, options in in_process for option in options for text in option}
    assert seen == {"a red square", "a red circle", "a blue circle", ""}


def test_streamed_captions_are_encoded_per_batch_without_autograd(tiny_text_encoder_dir):
    from pipeline_text_to_image import encode_text

    tokenizer, encoder = build_text_encoder(str(tiny_text_encoder_dir), None)
    encoder.requires_grad_(False)
    frozen = LiveEncoder(tokenizer=tokenizer, encoder=encoder, max_length=8, trains=False, device="cpu")
    texts = ["a red square", "", "a red square", "a blue circle"]
    embeddings = frozen.embed(texts)
    assert not embeddings.requires_grad
    with torch.no_grad():
        expected = encode_text(tokenizer, encoder, ["a red square", "", "a blue circle"], 8)
    torch.testing.assert_close(embeddings, expected[[0, 1, 0, 2]])
    encoder.requires_grad_(True)
    trained = LiveEncoder(tokenizer=tokenizer, encoder=encoder, max_length=8, trains=True, device="cpu")
    assert trained.embed(texts).requires_grad


@pytest.mark.slow
def test_two_process_streamed_launch_trains_and_checkpoints_each_process(stream_argv, tmp_path):
    from test_distributed import launch

    output = tmp_path / "out"
    flags = stream_argv("--max_train_steps", "2", "--train_batch_size", "2", output=output)
    result = launch(flags, num_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 2 x 2 processes x 1 accumulation = 4 per step" in result.stderr
    assert sorted(path.name for path in (output / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (output / "model_index.json").is_file()


def test_a_stream_is_validated_on_validation_data_dir_and_skips_the_memorization_check(stream_argv, tmp_path, caplog):
    from conftest import write_imagefolder

    held_out = write_imagefolder(tmp_path / "held_out", count=4)
    run_ok(stream_argv("--validation_data_dir", str(held_out), "--max_train_steps", "2", "--validation_steps", "1"))
    lines = (tmp_path / "out" / EVALUATION_LOG).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["step"] for record in records] == [1, 2]
    assert all("val/loss" in record and "memorization/copy_rate" not in record for record in records)
    assert "no memorization check" in caplog.text
