"""The loops: the trainer with its micro-steps (distillation, GRPO), checkpoints, gamma calibration, and the
preparation of the embedded default (its supervised warm-up and cache)."""
