"""mtbi-fast: multi-task behavior imitation (MTBI) for speech LLMs.

The imitation loss is importable on its own by any trainer::

    from mtbi_fast import ImitationLoss, imitation_loss
"""

from .loss import ImitationLoss, imitation_loss
from .version import __version__

__all__ = ["ImitationLoss", "imitation_loss", "__version__"]
