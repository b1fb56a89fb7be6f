"""What makes two fc7 vectors comparable: the index's model identity.

Two images' fc7 can be compared only if they were computed by the same weights, the same
architecture, the same preprocessing, at the same layer and precision, and stored after the same
reduction and normalisation. An index records all of it (``manifest.json``, ``identity``); a query
or an update whose model differs in any part is refused with one line naming that part, instead of
silently searching other vectors. Plain data, no torch: ``retrieve info`` reads it for free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# ModelArgs fields that change what fc7 is; dropout does not (it is off at inference).
_ARCH_FIELDS_IGNORED = ("dropout",)
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Identity:
    weights_sha256: str
    arch: dict[str, Any]
    preprocessing: dict[str, Any]
    dim: int
    layer: str = "fc7"
    precision: str = "fp32"
    reduce: str | None = None
    normalize: bool = False
    # Parts an old index did not record, taken as their defaults (shown by `retrieve info`).
    assumed: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("assumed")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "assumed"}
        return cls(**known)

    def model_arch(self) -> dict[str, Any]:
        return {k: v for k, v in self.arch.items() if k not in _ARCH_FIELDS_IGNORED}

    def difference(self, other: Identity) -> str | None:
        """The first part in which ``other`` differs, said for a person; None if they agree."""
        checks = (
            ("weights", self.weights_sha256[:12], other.weights_sha256[:12]),
            ("architecture", _arch_text(self.model_arch()), _arch_text(other.model_arch())),
            ("layer", self.layer, other.layer),
            ("fc7 width", self.dim, other.dim),
            ("preprocessing", _prep_text(self.preprocessing), _prep_text(other.preprocessing)),
            ("precision", self.precision, other.precision),
            ("reduction", self.reduce or "none", other.reduce or "none"),
            ("normalisation", _on(self.normalize), _on(other.normalize)),
        )
        for name, ours, theirs in checks:
            if ours != theirs:
                return f"{name}: the index has {ours}, this model gives {theirs}"
        return None


def _arch_text(arch: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(arch.items()))


def _prep_text(prep: dict[str, Any]) -> str:
    mean = "/".join(f"{float(v):.3f}" for v in prep.get("mean", ()))
    std = "/".join(f"{float(v):.3f}" for v in prep.get("std", ()))
    return (
        f"resize {prep.get('resize')} crop {prep.get('crop')} {prep.get('channels')} ch "
        f"{prep.get('interpolation')} mean {mean} std {std}"
    )


def _on(flag: bool) -> str:
    return "on" if flag else "off"
