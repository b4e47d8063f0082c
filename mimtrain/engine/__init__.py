"""Training engine: the Accelerate loop, optimizer and schedule, checkpoints, logs."""
