"""The adapters a server holds: those named at start (--adapter), and those it loads at run time, only from folders
inside its own --adapter-dir (never from uploaded weights). Callers hold `Scheduler.exclusive()` around changes."""

from __future__ import annotations

import os

from ..adapters import load_adapter
from ..adapters.bank import AUTO, AdapterBank
from ..errors import AdapterkitError, first_line
from .inputs import BASE, ServeError, unknown_adapter


class Catalog:
    def __init__(self, base, adapter_dir: str | None = None, force: bool = False):
        self.base = base
        self.adapter_dir = os.path.abspath(adapter_dir) if adapter_dir else None
        self.force = force
        self.bank = AdapterBank(base, force=force)
        self.sources: dict[str, str] = {}  # task -> folder it was loaded from
        self.compiled = False  # set by --compile: the bank cannot be rebuilt around a compiled UNet

    @property
    def tasks(self) -> list[str]:
        return self.bank.tasks

    def add_folder(self, folder: str) -> str:
        """Load an adapter folder into the bank (start-up and --adapter-dir); AdapterkitError for a bad one."""
        adapter = load_adapter(folder)
        if adapter.task in (AUTO, BASE):
            raise AdapterkitError(f"adapter {folder} has the task name '{adapter.task}', which the API keeps for "
                                  "routing (auto) and the base alone (base); change \"task\" in its adapter.json")
        task = self.bank.add(adapter)
        self.sources[task] = os.path.abspath(folder)
        return task

    def folders_in_dir(self) -> list[str]:
        """Names of the sub-folders of --adapter-dir, sorted (hidden ones left out)."""
        if not self.adapter_dir or not os.path.isdir(self.adapter_dir):
            return []
        return sorted(n for n in os.listdir(self.adapter_dir) if not n.startswith(".") and os.path.isdir(os.path.join(self.adapter_dir, n)))

    def load_dir(self) -> list[str]:
        """Add every adapter of --adapter-dir not loaded yet; returns 'name: problem' for folders that do not load."""
        problems = []
        loaded = set(self.sources.values())
        for name in self.folders_in_dir():
            folder = os.path.join(self.adapter_dir, name)
            if folder not in loaded:
                try:
                    self.add_folder(folder)
                except AdapterkitError as e:
                    problems.append(f"{name}: {first_line(e)}")
        return problems

    def add_from_dir(self, name: str) -> str:
        """Load `<adapter-dir>/<name>`: 403 without --adapter-dir, 400 for a name that is not a plain folder name,
        404 for a folder that is not there, 409 for a task already loaded, 400 for a folder that does not load."""
        if not self.adapter_dir:
            raise ServeError(403, "this server has no --adapter-dir; adapters are added at run time only from that "
                                  "server-side folder (restart with --adapter-dir DIR)")
        if name in ("", ".", "..") or name.startswith(".") or os.sep in name or (os.altsep and os.altsep in name):
            raise ServeError(400, f"'{name}' is not a folder name; pass the name of a folder inside --adapter-dir")
        folder = os.path.join(self.adapter_dir, name)
        if not os.path.isdir(folder):
            raise ServeError(404, f"no folder '{name}' in --adapter-dir; there: {', '.join(self.folders_in_dir()) or 'none'}")
        if os.path.abspath(folder) in self.sources.values():
            raise ServeError(409, f"'{name}' is loaded already")
        try:
            return self.add_folder(folder)
        except AdapterkitError as e:
            raise ServeError(409 if "already holds" in str(e) else 400, first_line(e)) from None

    def remove(self, task: str) -> None:
        """Remove a loaded adapter: the bank gives the pipeline back as it came and a new bank takes the others."""
        if task not in self.bank:
            raise unknown_adapter(task, self.tasks)
        if self.compiled:
            raise ServeError(409, "adapters cannot be removed from a server started with --compile; restart it without the adapter")
        keep = [self.bank.get(t) for t in self.tasks if t != task]
        self.bank.close()
        bank = AdapterBank(self.base, force=self.force)
        for adapter in keep:
            bank.add(adapter)
        self.bank = bank
        self.sources.pop(task, None)

    def describe(self) -> list[dict]:
        rows = []
        for task in self.tasks:
            adapter = self.bank.get(task)
            rows.append({"name": task, "method": adapter.method, "instructions": list(adapter.instructions),
                         "folder": os.path.basename(self.sources.get(task, "")) or None})
        return rows
