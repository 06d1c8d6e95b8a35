r"""Tools for test time: exact recalibration of running statistics (PreciseBN; AdaBN on
target-domain data), prior mixing and prediction-time batch norm, freezing, folding batch norm
into the layer before it, and a diagnosis of how far running statistics are from some data's.

Each method has one implementation here, on normkit's moments and their exact merge
(:mod:`normkit.functional.statistics`); a framework's models reach it through an adapter that
finds their normalization layers (:mod:`normkit.testtime.sites`): PyTorch modules through
``normkit_torch.testtime``, Keras models through ``normkit_tensorflow.testtime``, and
normkit's own layers driven by a forward function the caller gives. Folding and freezing
rebuild a model, so their framework halves live in ``normkit_torch`` and ``normkit_tensorflow``
(``fold``, ``frozen``), with the arithmetic of folding here (:func:`fold_weights`).
"""

from normkit.testtime.diagnose import LayerShift, ShiftReport, diagnose
from normkit.testtime.fold import fold, fold_weights
from normkit.testtime.freeze import freeze
from normkit.testtime.prior import PriorMixing, prior_mixing
from normkit.testtime.recalibrate import ESTIMATORS, recalibrate
from normkit.testtime.sites import find_batch_norms

__all__ = [
    "ESTIMATORS",
    "LayerShift",
    "PriorMixing",
    "ShiftReport",
    "diagnose",
    "find_batch_norms",
    "fold",
    "fold_weights",
    "freeze",
    "prior_mixing",
    "recalibrate",
]
