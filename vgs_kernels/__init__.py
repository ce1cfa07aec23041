"""Visual Gradient Steering (VGS) loss for on-policy distillation of vision-language models."""

from .backends import backends
from .loss import VGSOutput, fused_linear_vgs_loss, vgs_loss
from .module import VGSLoss
from .options import VGSOptions
from .threshold import VDSThreshold, vds_threshold

__all__ = ["vgs_loss", "fused_linear_vgs_loss", "VGSLoss", "VGSOutput", "VGSOptions", "backends",
           "vds_threshold", "VDSThreshold"]
__version__ = "0.1.0"
