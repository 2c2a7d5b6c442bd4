"""The embedded default: procedural edit tasks and the bundled tiny pretrained IP2P base (`builtin:tiny`).

`tasks` makes (input, instruction, target) triples for general edits (which the bundled base learned) and held-out
tasks (derain, cartoonize, denoise, lowlight: adapters learn them), and writes any task as an imagefolder dataset.
"""

from .tasks import GENERAL_TASKS, HELDOUT_TASKS, TASKS, make_example, make_examples, write_task_dataset

__all__ = ["GENERAL_TASKS", "HELDOUT_TASKS", "TASKS", "make_example", "make_examples", "write_task_dataset"]
