"""The pieces of one distillation step: prompts and the four views, rollouts, decoder passes, the loss on both
lm_heads (``pipe.Pipeline``), multi-process helpers, evaluation, training-health signals and gradient tools."""
