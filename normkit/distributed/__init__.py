r"""Synchronized batch norm: every data-parallel replica normalizes with the statistics of the
global batch, by one all-gather of each replica's moments and Chan's exact merge in rank order
(:mod:`normkit.distributed.sync`), over any engine that implements a small
:class:`Communicator` (:mod:`normkit.distributed.communicator`): MPI in
:mod:`normkit.distributed.mpi` (``normkit[mpi]``), ``torch.distributed`` in
``normkit_torch.distributed``, ``tf.distribute`` in ``normkit_tensorflow``.

Importing this package imports no engine (no ``torch.distributed``, no MPI).
"""

from normkit.distributed.communicator import Communicator, CommunicatorError
from normkit.distributed.sync import check_layout, sync_batch_norm, synchronized_moments

__all__ = ["Communicator", "CommunicatorError", "check_layout", "sync_batch_norm", "synchronized_moments"]
