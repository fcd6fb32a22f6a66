"""One generic trainer over any stage's loss: optimizer, schedule, EMA, checkpoints, DDP."""
