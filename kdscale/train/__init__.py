"""Training stage: parallel init, the training loop, checkpoint/resume, metrics."""
