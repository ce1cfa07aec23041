"""On-policy VGS distillation of vision-language models on accelerate (SPEC.md section 4).

Entry points: ``vgs-train`` / ``python -m vgs_train`` (:mod:`vgs_train.cli`), ``vgs-eval``, and
``python -m vgs_train.demo`` (the embedded CPU demo)."""
