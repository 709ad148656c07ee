"""Meta-learning algorithms, one LightningModule each, all on the `MetaLearner` base.

Usable on their own in any Lightning project whose DataModule yields `TaskBatch`es:
`from lightning_meta.algorithms import MAML`.
"""

from lightning_meta.algorithms.anil import ANIL
from lightning_meta.algorithms.base import MetaLearner, TaskOutput, mean_and_ci95, supervised_loss
from lightning_meta.algorithms.cavia import CAVIA
from lightning_meta.algorithms.maml import MAML
from lightning_meta.algorithms.maml_rl import MAMLRL
from lightning_meta.algorithms.mamlpp import MAMLPlusPlus
from lightning_meta.algorithms.matching import MatchingNetworks
from lightning_meta.algorithms.metasgd import MetaSGD
from lightning_meta.algorithms.pearl import PEARL
from lightning_meta.algorithms.protonet import ProtoNet
from lightning_meta.algorithms.relation import RelationNetworks
from lightning_meta.algorithms.reptile import Reptile
from lightning_meta.algorithms.rl2 import RL2
from lightning_meta.algorithms.rl_base import MetaRLLearner
from lightning_meta.algorithms.siamese import Siamese

__all__ = [
    "ANIL",
    "CAVIA",
    "MAML",
    "MAMLRL",
    "PEARL",
    "RL2",
    "MAMLPlusPlus",
    "MatchingNetworks",
    "MetaLearner",
    "MetaRLLearner",
    "MetaSGD",
    "ProtoNet",
    "RelationNetworks",
    "Reptile",
    "Siamese",
    "TaskOutput",
    "mean_and_ci95",
    "supervised_loss",
]
