"""Moving tensors from another family's state dict into ours, accounting for every one.

An `Importer` hands out source tensors (`take`), places ours (`put`, shape-checked against the
target model), records what is deliberately left behind (`ignore`, with the reason), and at the
end (`finish`) refuses any source tensor nobody took or ignored, then names the parts of our
model that start fresh. Nothing is matched by guesswork: an unknown key is an error.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


class ConversionError(ValueError):
    """The source is not what the importer knows how to convert; the message says what."""


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """A PyTorch (`.bin`, `.pth`, `.pt`) or safetensors file -> {name: tensor}. Pickles are read
    with `weights_only=True`: a checkpoint from the internet must not run code."""
    if not path.is_file():
        raise ConversionError(f"no file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated download, an HTML error page, a foreign pickle
            raise ConversionError(
                f"{path.name} is not a readable PyTorch checkpoint: {exc}"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path.name} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


@dataclass
class Report:
    """What a conversion did, for the command's output and `conversion.json`."""

    mapped: list[tuple[str, str]] = field(default_factory=list)  # (ours, from)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (source key, why)
    fresh: list[tuple[str, str]] = field(default_factory=list)  # (our key, why)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """Human-readable lines: counts, then every reason with the keys it covers."""
        out = [f"mapped {len(self.mapped)} tensors"]
        for title, rows in (("ignored", self.ignored), ("initialised fresh", self.fresh)):
            by_reason: dict[str, list[str]] = {}
            for key, why in rows:
                by_reason.setdefault(why, []).append(key)
            out.append(f"{title} {len(rows)} tensors" + (":" if rows else ""))
            for why, keys in by_reason.items():
                shown = ", ".join(keys[:3]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
                )
                out.append(f"  - {why}: {shown}")
        out += [f"note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict:
        return {
            "mapped": dict(self.mapped),
            "ignored": dict(self.ignored),
            "fresh": dict(self.fresh),
            "notes": self.notes,
        }


class Importer:
    def __init__(self, source: dict[str, Tensor], target: dict[str, Tensor], origin: str) -> None:
        self.source = source
        self.target = target  # our fresh model's state dict: names and shapes
        self.origin = origin  # e.g. "BiomedCLIP", for messages
        self.out: dict[str, Tensor] = {}
        self.used: set[str] = set()
        self.report = Report()

    def has(self, key: str) -> bool:
        return key in self.source

    def take(self, key: str) -> Tensor:
        if key not in self.source:
            raise ConversionError(f"{self.origin} checkpoint has no {key}")
        self.used.add(key)
        return self.source[key].detach().to(torch.float32)

    def put(self, ours: str, value: Tensor, origin: str) -> None:
        if ours not in self.target:
            raise ConversionError(f"internal: our model has no {ours} (from {origin})")
        want = tuple(self.target[ours].shape)
        if tuple(value.shape) != want:
            raise ConversionError(
                f"{origin} has shape {tuple(value.shape)}, but {ours} needs {want}: the "
                f"{self.origin} checkpoint does not match the config derived from it"
            )
        self.out[ours] = value.contiguous()
        self.report.mapped.append((ours, origin))

    def copy(self, ours: str, theirs: str) -> None:
        self.put(ours, self.take(theirs), theirs)

    def ignore(self, pattern: str, why: str) -> None:
        """Source keys matching `pattern` (fnmatch) stay behind, for `why`."""
        for key in fnmatch.filter(self.source, pattern):
            if key not in self.used:
                self.used.add(key)
                self.report.ignored.append((key, why))

    def finish(
        self, fresh_reasons: Iterable[tuple[str, str]], kept: Collection[str] = ()
    ) -> dict[str, Tensor]:
        """Refuse leftovers; name our tensors that were not imported (first matching pattern's
        reason), except those in `kept` (taken from another checkpoint by the caller), and
        return the imported tensors."""
        left = [k for k in self.source if k not in self.used]
        if left:
            shown = ", ".join(left[:8]) + (f" (and {len(left) - 8} more)" if len(left) > 8 else "")
            raise ConversionError(
                f"{len(left)} tensors of the {self.origin} checkpoint have no place in MedP-CLIP "
                f"and no known reason to be dropped: {shown}. Is this the layout the importer "
                "expects (see python -m medpclip.convert --help)?"
            )
        reasons = list(fresh_reasons)
        kept = set(kept)
        for key in self.target:
            if key in self.out or key in kept:
                continue
            why = next((w for p, w in reasons if fnmatch.fnmatch(key, p)), None)
            if why is None:
                raise ConversionError(f"internal: nothing maps or explains {key}")
            self.report.fresh.append((key, why))
        return self.out
