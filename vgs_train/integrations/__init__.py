"""Adapters that put the VGS loss into other trainers (optional extras).

* :mod:`vgs_train.integrations.trl` -- ``VGSDistillationTrainer``, a subclass of TRL's on-policy
  ``DistillationTrainer`` whose loss is VGS (the ``trl`` extra: ``pip install --no-build-isolation ".[trl]"`` from a checkout).

Frameworks that already hold logit rows (verl / OpenRLHF style) need no adapter: call
``vgs_kernels.vgs_loss`` on the four ``[N, V]`` row tensors of the response tokens and their ``[N]`` mask
(see README, "Scaling and integrations").
"""
