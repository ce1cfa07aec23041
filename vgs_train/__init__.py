"""On-policy VGS distillation of vision-language models on accelerate (docs/training.md).

Entry points: ``vgs-train`` / ``python -m vgs_train`` (:mod:`vgs_train.cli`), ``vgs-eval``, and
``python -m vgs_train.tools.demo`` (the embedded CPU demo)."""
