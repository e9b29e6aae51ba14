"""--streaming: a datasets IterableDataset as input, shuffled, resumable, with the usual clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from test_train import assert_same_tensors, checkpoint_weights, run_error, run_ok, train_argv, unet_weights

import train_text_to_image as trainer


@pytest.fixture
def stream_argv(tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file, tmp_path):
    def make(*extra: str, output=None) -> list[str]:
        streaming = ("--streaming", "--shuffle_buffer_size", "8", *extra)
        models = (tiny_imagefolder, tiny_text_encoder_dir, tiny_unet_config_file)
        return train_argv(*models, output or tmp_path / "out", *streaming)

    return make


def test_streamed_run_trains_checkpoints_and_saves_a_pipeline(stream_argv, tmp_path, capsys):
    run_ok(stream_argv())
    output = tmp_path / "out"
    assert (output / "model_index.json").is_file() and (output / "checkpoint-4").is_dir()
    assert trainer.read_train_state(output / "checkpoint-4").step == 4
    assert "finished at step 4/4" in capsys.readouterr().out


def test_streaming_needs_max_train_steps(stream_argv, capsys):
    flags = stream_argv()
    del flags[flags.index("--max_train_steps") : flags.index("--max_train_steps") + 2]
    assert "error: --streaming needs --max_train_steps" in run_error(flags, capsys)


def test_streamed_missing_caption_column_lists_the_columns(stream_argv, capsys):
    message = run_error(stream_argv("--caption_column", "caption"), capsys)
    assert "--caption_column 'caption' not in dataset columns ['image', 'text']" in message


def test_streamed_resume_continues_where_the_stream_was(stream_argv, tmp_path):
    """16 images, batch 4: steps 5-8 are the second pass; resuming at step 6 must not restart the stream."""
    flags = ("--use_ema", "--random_flip", "--max_train_steps", "8", "--checkpointing_steps", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(stream_argv(*flags, output=straight))
    run_ok(stream_argv(*flags, output=resumed))
    shutil.rmtree(resumed / "checkpoint-8")
    (resumed / "model_index.json").unlink()
    run_ok(stream_argv(*flags, "--resume_from_checkpoint", "latest", output=resumed))
    assert_same_tensors(checkpoint_weights(straight / "checkpoint-8"), checkpoint_weights(resumed / "checkpoint-8"))
    assert_same_tensors(unet_weights(straight), unet_weights(resumed))


def test_stream_order_differs_between_passes_and_covers_every_example(tmp_path, tiny_imagefolder):
    args = trainer.parse_args(["--train_data_dir", str(tiny_imagefolder), "--streaming", "--max_train_steps", "1"])
    args.shuffle_buffer_size = 16
    stream = trainer.open_image_stream(args, process_index=0, num_processes=1, seed=0)
    first, second = stream.take(16), stream.take(16)
    names = [[json.dumps(example["image"]["path"]) for example in passed] for passed in (first, second)]
    assert sorted(names[0]) == sorted(names[1]) and len(set(names[0])) == 16
    assert names[0] != names[1]


def test_each_process_streams_its_own_share(tiny_imagefolder):
    args = trainer.parse_args(["--train_data_dir", str(tiny_imagefolder), "--streaming", "--max_train_steps", "1"])
    shares = [trainer.open_image_stream(args, rank, 2, seed=0).take(8) for rank in range(2)]
    paths = [{example["image"]["path"] for example in share} for share in shares]
    assert len(paths[0]) == len(paths[1]) == 8 and not paths[0] & paths[1]
