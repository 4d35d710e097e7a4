"""What an edge-runtime exporter (OpenVINO, ExecuTorch) reports: the files it wrote per precision
and why any precision is missing."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class RuntimeFiles:
    files: dict[str, str] = field(default_factory=dict)     # precision -> model file name
    errors: dict[str, str] = field(default_factory=dict)    # precision -> one line why not written
    version: Optional[str] = None
    calibration_images: int = 0                             # synthetic images the int8 file saw
    seconds: Optional[float] = None

    def all_files(self) -> list[str]:
        """Every file written (subclasses add the files beside a model file)."""
        return list(self.files.values())

    def to_dict(self) -> dict:
        return asdict(self)
