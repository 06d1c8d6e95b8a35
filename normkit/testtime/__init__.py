r"""Tools for test time: exact recalibration of running statistics (PreciseBN; AdaBN on
target-domain data), with more to come (prior mixing, freezing, folding, a diagnosis).

Each method has one implementation here, on normkit's moments and their exact merge
(:mod:`normkit.functional.statistics`); a framework's models reach it through an adapter that
finds their normalization layers. This module serves normkit's own layers, driven by a forward
function the caller gives.
"""

from normkit.testtime.recalibrate import ESTIMATORS, recalibrate

__all__ = ["ESTIMATORS", "recalibrate"]
