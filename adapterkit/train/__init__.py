"""How an adapter is made: `train(TrainConfig)` on an edit dataset (see config.py, data.py, loop.py)."""

from .config import TrainConfig
from .data import EditDataset, EditExample, load_edit_dataset
from .loop import train

__all__ = ["EditDataset", "EditExample", "TrainConfig", "load_edit_dataset", "train"]
