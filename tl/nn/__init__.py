"""Building blocks below the strategies: gradient reversal (``grl``), the domain discriminator
(``discriminator``), alignment losses with one signature (``alignment``: DANN, CDAN+E, multi-kernel
MMD, CORAL), the model that trains them (``adapt_model``) and label-free model-selection scores
(``scores``). Nothing here imports ``tl.strategies`` or anything above it; the strategies that use
these are in ``tl.strategies.adapt``, the Ray Train run in ``tl.runs``."""

from tl.nn.adapt_model import BN_FORWARDS, AdaptModel
from tl.nn.alignment import Alignment, CDANLoss, CORALLoss, DANNLoss, MMDLoss, coral, entropy, gaussian_mmd2
from tl.nn.discriminator import DomainDiscriminator, domain_bce
from tl.nn.grl import SCHEDULES, GradientReversal, coefficient, ganin_lambda, grad_reverse
from tl.nn.scores import SCORES, information_maximization, soft_neighborhood_density

__all__ = [
    "AdaptModel", "Alignment", "BN_FORWARDS", "CDANLoss", "CORALLoss", "DANNLoss", "DomainDiscriminator",
    "GradientReversal", "MMDLoss", "SCHEDULES", "SCORES", "coefficient", "coral", "domain_bce", "entropy",
    "ganin_lambda", "gaussian_mmd2", "grad_reverse", "information_maximization", "soft_neighborhood_density",
]
