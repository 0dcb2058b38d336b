"""Training skeleton shared by every method: flags, the method protocol, the Trainer and its checkpoints."""
from common.train.args import add_training_args
from common.train.checkpoints import checkpoint_step, list_checkpoints
from common.train.method import TrainingMethod, compute_dtype, place_frozen
from common.train.optim import scaled_learning_rate
from common.train.rng import ItemSeededDataset, isolated_rng
from common.train.steps import StepIndex, split_step_index
from common.train.trainer import Trainer

__all__ = [
    "ItemSeededDataset",
    "StepIndex",
    "Trainer",
    "TrainingMethod",
    "add_training_args",
    "checkpoint_step",
    "compute_dtype",
    "isolated_rng",
    "list_checkpoints",
    "place_frozen",
    "scaled_learning_rate",
    "split_step_index",
]
