"""adapterkit: train, merge, evaluate and hot-swap lightweight task adapters for InstructPix2Pix."""

from .compat import quiet_third_party_logs

quiet_third_party_logs()

from .adapters import Adapter, load_adapter, save_adapter
from .adapters.bank import AdapterBank
from .base import Base, compute_fingerprint, convert_sd15_to_ip2p, load_base
from .errors import AdapterkitError
from .eval import evaluate
from .merge import merge
from .train import TrainConfig, train

__all__ = [
    "Adapter",
    "AdapterBank",
    "AdapterkitError",
    "Base",
    "compute_fingerprint",
    "convert_sd15_to_ip2p",
    "evaluate",
    "load_adapter",
    "load_base",
    "merge",
    "save_adapter",
    "train",
    "TrainConfig",
]
