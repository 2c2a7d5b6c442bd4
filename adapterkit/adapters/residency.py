"""Which adapters of a bank hold their tensors on the UNet's device: at most `max_resident`, least recently used
paged out to CPU (as S-LoRA and LoRAX page LLM adapters). On a CPU-only base there is nothing to move: the order
is still kept, so `resident` reads the same everywhere, and every adapter stays usable (pages back in on use)."""

from __future__ import annotations

from collections import OrderedDict

import torch


def state_bytes(adapter) -> int:
    """Bytes of the adapter's tensors (what one resident adapter costs on the device)."""
    return sum(t.numel() * t.element_size() for t in adapter.tensors.values())


def _move(adapter, device: torch.device) -> None:
    if device.type == "cpu":  # page out; pinned host memory makes the later page-in fast and asynchronous
        pin = torch.cuda.is_available()
        adapter.tensors = {k: v.to("cpu").pin_memory() if pin else v.to("cpu") for k, v in adapter.tensors.items()}
    else:
        adapter.tensors = {k: v.to(device, non_blocking=True) for k, v in adapter.tensors.items()}


class Residency:
    def __init__(self, device: torch.device, max_resident: int | None = None):
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_resident must be at least 1 (or None for no bound), got {max_resident}")
        self.device = torch.device(device)
        self.max_resident = max_resident
        self._order: OrderedDict[str, object] = OrderedDict()  # resident task -> adapter, least recent first
        self.page_ins = 0  # counters for tests and benchmarks
        self.page_outs = 0

    @property
    def resident(self) -> list[str]:
        """Tasks on the device, least recently used first."""
        return list(self._order)

    def touch(self, adapter) -> bool:
        """Make the adapter resident and most recent; page out the least recent beyond the bound.
        True when any tensor moved (callers drop what they cached from the old tensors)."""
        moved = False
        if adapter.task in self._order:
            self._order.move_to_end(adapter.task)
        else:
            if self.device.type != "cpu":
                _move(adapter, self.device)
                moved = True
            self.page_ins += 1
            self._order[adapter.task] = adapter
        while self.max_resident is not None and len(self._order) > self.max_resident:
            _task, old = self._order.popitem(last=False)
            if self.device.type != "cpu":
                _move(old, torch.device("cpu"))
            self.page_outs += 1
        return moved

    def is_resident(self, task: str) -> bool:
        return task in self._order

    def forget(self, task: str) -> None:
        self._order.pop(task, None)
