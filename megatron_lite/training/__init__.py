"""Training: the pretraining loop, optimizer and LR schedule, data sampling, logging, checkpoints and FLOPs."""
