#!/usr/bin/env bash
# The quickstart: draw a captioned shapes dataset, make a small text encoder from its captions,
# train a text-to-image model on them (4-10 minutes on a 2-core CPU, by machine) and score whether it draws
# what the prompts ask for. Needs no download and no GPU.
#
#   bash examples/quickstart.sh                          # everything, with examples/quickstart.yaml
#   bash examples/quickstart.sh --max_train_time 30m     # extra flags go to train_text_to_image.py
#
# DATA_DIR (default data) and OUTPUT_DIR (default out/shapes) say where things are written;
# EVALUATE_ARGS adds flags to evaluate_shapes.py (e.g. "--images_per_prompt 8").
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir="${DATA_DIR:-data}"
output_dir="${OUTPUT_DIR:-out/shapes}"

python examples/make_shapes_dataset.py --output_dir "$data_dir/shapes" --resolution 16 --count 3600
python examples/make_text_encoder.py --captions "$data_dir/shapes/metadata.jsonl" \
  --output_dir "$data_dir/shapes-text-encoder" --hidden_size 128 --num_layers 2 --num_heads 4 --max_length 16
python train_text_to_image.py --config examples/quickstart.yaml \
  --train_data_dir "$data_dir/shapes" --text_encoder_name_or_path "$data_dir/shapes-text-encoder" \
  --output_dir "$output_dir" "$@"
# shellcheck disable=SC2086  # EVALUATE_ARGS is a list of flags
python examples/evaluate_shapes.py --model "$output_dir" --grid "$output_dir/evaluation.png" ${EVALUATE_ARGS:-}
echo "sample grids: $output_dir/samples/ (progress.gif shows them over the run); model: $output_dir"
echo "generate: python pipeline_text_to_image.py --model $output_dir --prompt 'a large blue triangle' --output grid.png"
