"""Adapters that plug the VGS loss into other trainers' loss interfaces (each imports its framework
lazily: importing this package needs none of them)."""
