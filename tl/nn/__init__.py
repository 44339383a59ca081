"""Building blocks below the strategies: gradient reversal (``grl``), the domain discriminator
(``discriminator``), alignment losses with one signature (``alignment``: DANN, CDAN+E, multi-kernel
MMD, CORAL, MCC), AdaBN's BatchNorm re-estimation (``batchnorm``), the model that trains them
(``adapt_model``), label-free model-selection scores (``scores``), classifier heads beside
``nn.Linear`` (``heads``) and low-rank adapters (``lora``). Nothing here imports ``tl.strategies`` or
anything above it; the strategies that use these are in ``tl.strategies``, the Ray Train run in
``tl.runs``."""

from tl.nn.adapt_model import BN_FORWARDS, AdaptModel
from tl.nn.alignment import (Alignment, CDANLoss, CORALLoss, DANNLoss, MCCLoss, MMDLoss, coral, entropy, gaussian_mmd2,
                             minimum_class_confusion)
from tl.nn.batchnorm import ReplayBatches, batchnorm_layers, reestimate_batchnorm
from tl.nn.discriminator import DomainDiscriminator, domain_bce
from tl.nn.heads import LinearFeatureHead, MLPHead
from tl.nn.grl import SCHEDULES, GradientReversal, coefficient, ganin_lambda, grad_reverse
from tl.nn.lora import add_lora, merge_lora
from tl.nn.scores import SCORES, information_maximization, soft_neighborhood_density

__all__ = [
    "AdaptModel", "Alignment", "BN_FORWARDS", "CDANLoss", "CORALLoss", "DANNLoss", "DomainDiscriminator",
    "GradientReversal", "MCCLoss", "MMDLoss", "SCHEDULES", "SCORES", "coefficient", "coral", "domain_bce", "entropy",
    "ganin_lambda", "gaussian_mmd2", "grad_reverse", "information_maximization", "soft_neighborhood_density",
    "batchnorm_layers", "minimum_class_confusion", "reestimate_batchnorm", "ReplayBatches", "LinearFeatureHead",
    "MLPHead",
    "add_lora", "merge_lora",
]
