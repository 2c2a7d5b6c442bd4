"""What one server allows and how it batches: a frozen, typed dataclass, one comment per field, checked on creation."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AdapterkitError


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 8  # most requests one pipeline call edits together
    batch_wait_ms: float = 20.0  # how long the first request of a batch waits for others to join it
    queue: int = 64  # most requests waiting (not yet in a batch); one more is refused with 503
    timeout_s: float = 120.0  # most seconds a request may take, queue + compute (a request may ask for less)
    max_body_mb: float = 20.0  # largest request body; larger ones get 413
    max_pixels: int = 4096 * 4096  # largest uploaded image (width x height, read from its header); larger: 400
    max_resolution: int = 1024  # largest `resolution` a request may ask for
    max_steps: int = 100  # most denoising steps a request may ask for
    max_instruction_chars: int = 1000  # longest instruction (CLIP reads 77 tokens anyway)

    def __post_init__(self):
        checks = {
            "max_batch": self.max_batch >= 1,
            "batch_wait_ms": self.batch_wait_ms >= 0,
            "queue": self.queue >= 1,
            "timeout_s": self.timeout_s > 0,
            "max_body_mb": self.max_body_mb > 0,
            "max_pixels": self.max_pixels >= 64,
            "max_resolution": self.max_resolution >= 8,
            "max_steps": self.max_steps >= 1,
            "max_instruction_chars": self.max_instruction_chars >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise AdapterkitError(f"serve setting(s) out of range: {', '.join(f'{n}={getattr(self, n)}' for n in bad)}; "
                                  "batch, queue, steps and limits must be positive")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
