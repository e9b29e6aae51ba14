"""The trainer behind train_text_to_image.py, one concern per module, in the order a run meets them:

    metrics       each evaluation metric named once
    config        each flag declared once, in the frozen config of its group; --config YAML
    run_config    OUTPUT_DIR/run_config.yaml: the flags as the run resolved them, to read back and repeat
    data          image tables, decoding, unreadable images, the batch sources and their resume contract
    batches       a micro-batch's random draws: captions, crop/flip, augmentation
    models        text encoder and caption cache, UNet, noise scheduler
    loss          what a step minimizes: weighting and timestep sampling as objects, targets
    optimization  optimizer, learning rates, EMA
    checkpoints   atomic checkpoints and exports, resume, stopping
    evaluation    held-out loss, copies, FD/KID/CLIP
    outputs       grids, GIF, pipeline folder, model card, Hub
    training      the Trainer (one step), the schedule, the loop
    setup         a run built from its configuration

pipeline_text_to_image.py (beside this package) stays standalone: an output folder loads it alone.
"""
