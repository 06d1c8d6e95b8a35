r"""Tools for test time: exact recalibration of running statistics (PreciseBN; AdaBN on
target-domain data), prior mixing and prediction-time batch norm, freezing, with more to come (folding, a
diagnosis).

Each method has one implementation here, on normkit's moments and their exact merge
(:mod:`normkit.functional.statistics`); a framework's models reach it through an adapter that
finds their normalization layers (:mod:`normkit.testtime.sites`): PyTorch modules through
``normkit_torch.testtime``, Keras models through ``normkit_tensorflow.testtime``, and
normkit's own layers driven by a forward function the caller gives.
"""

from normkit.testtime.freeze import freeze
from normkit.testtime.prior import PriorMixing, prior_mixing
from normkit.testtime.recalibrate import ESTIMATORS, recalibrate
from normkit.testtime.sites import find_batch_norms

__all__ = ["ESTIMATORS", "PriorMixing", "find_batch_norms", "freeze", "prior_mixing", "recalibrate"]
