"""Domain adaptation: gradient reversal, a domain discriminator that returns logits, alignment
losses with one signature (DANN, CDAN+E, multi-kernel MMD, CORAL), the model that trains them,
and unsupervised model-selection scores. The Ray Train run with two input streams is
``tl.adapt.run``; the strategies that use all this are in ``tl.strategies.adapt``."""

from tl.adapt.grl import GradientReversal, SCHEDULES, coefficient, ganin_lambda, grad_reverse
from tl.adapt.losses import (
    Alignment, CDANLoss, CORALLoss, DANNLoss, DomainDiscriminator, MMDLoss, coral, domain_bce, entropy, gaussian_mmd2,
)
from tl.adapt.model import BN_FORWARDS, AdaptModel
from tl.adapt.select import SCORES, information_maximization, soft_neighborhood_density

__all__ = [
    "AdaptModel", "Alignment", "BN_FORWARDS", "CDANLoss", "CORALLoss", "DANNLoss", "DomainDiscriminator",
    "GradientReversal", "MMDLoss", "SCHEDULES", "SCORES", "coefficient", "coral", "domain_bce", "entropy",
    "ganin_lambda", "gaussian_mmd2", "grad_reverse", "information_maximization", "soft_neighborhood_density",
]
