"""The trainer behind train_text_to_image.py, one concern per module, in the order a run meets them (each module
imports only from those above it):

    common        UserError (a user's mistake: one line, no traceback) and one-line helpers
    metrics       each evaluation metric named once
    config        each flag declared once, in the frozen config of its group; --config YAML
    run_config    OUTPUT_DIR/run_config.yaml: the flags as the run resolved them, to read back and repeat
    layouts       the dataset layouts read into one table of images and captions
    data          image tables, decoding, unreadable images, the batch sources and their resume contract
    batches       a micro-batch's random draws: captions, crop/flip, augmentation; drawn on the host (HostBatches)
    models        text encoder and caption cache, UNet, noise scheduler
    resident      --data_on_device: the same micro-batches drawn on the device (ResidentBatches)
    loss          what a step minimizes: weighting and timestep sampling as objects, targets, one step's loss
    optimization  optimizer, learning rates, EMA
    checkpoints   atomic checkpoints and exports, resume, stopping
    evaluation    held-out loss, copies, FD/KID/CLIP
    outputs       grids, GIF, pipeline folder, model card, Hub
    captured      --cuda_graphs: one optimizer step's device work as one function, one CUDA graph
    training      the Trainer (one step), the schedule, the loop
    setup         a run built from its configuration: the data (indexed or streamed), the models, the trainer

pipeline_text_to_image.py (beside this package) stays standalone: an output folder loads it alone.
"""
