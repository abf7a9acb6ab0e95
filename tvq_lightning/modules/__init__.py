"""LightningModules: fine-tuning, merged evaluation and test-time adaptation on quantized stores."""
from .adamerging import AdaMerging, read_coefficients
from .evaluate import MergedEvaluation
from .finetune import FineTuneModule
from .pretrain import ContrastivePretraining
from .surgery import Surgery
from .tinting import Tinting

__all__ = ["AdaMerging", "ContrastivePretraining", "FineTuneModule", "MergedEvaluation", "Surgery", "Tinting", "read_coefficients"]
