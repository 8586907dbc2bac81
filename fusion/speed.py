"""How fast the frozen ViT runs when predicting: fewer tokens, lower precision, compiled.

The ViT is almost all of a prediction's time. :class:`Speed` holds the options of ``fusion
predict --speed`` and ``fusion bench --parts speed``, applied to a trained model without
retraining it:

- ``merge``: ``r`` tokens merged per frozen block (ToMe, :mod:`fusion.models.tome`);
- ``int8``: the frozen ViT's linear layers quantised to int8 with dynamic activation scales
  (``torch.ao.quantization.quantize_dynamic``; CPU only: its kernels are fbgemm/oneDNN);
- ``bf16``: bfloat16 autocast of the whole forward (Lightning's ``bf16-mixed`` precision; fast
  where the CPU has AVX512-BF16/AMX or on a recent GPU);
- ``compile``: the frozen part compiled with ``torch.compile`` (its first batches pay the
  compilation).

Presets: ``exact`` (none of them: the model as trained) and ``fast`` (bf16: of the settings
``fusion bench --parts speed`` measured, the fastest within 1 point of exact's macro-F1 on
held-out places; chosen on those rows, see the README's Cost section). Token merging and int8
cost more accuracy on this model than they gain speed (the same table).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fusion.models.tome import check_mergeable


@dataclass(frozen=True)
class Speed:
    """Inference options of the frozen ViT (see the module docstring)."""

    merge: int = 0
    int8: bool = False
    bf16: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        """A short label: ``exact``, or the options joined by ``+`` (``tome16+int8``)."""
        parts = [f"tome{self.merge}"] if self.merge else []
        parts += [n for n in ("int8", "bf16", "compile") if getattr(self, n)]
        return "+".join(parts) or "exact"

    @property
    def precision(self) -> str:
        """Lightning's ``Trainer(precision=...)`` for these options."""
        return "bf16-mixed" if self.bf16 else "32-true"


EXACT = Speed()
# fast: the fastest measured setting within 1 point of exact's held-out macro-F1 (README, Cost).
PRESETS = {"exact": EXACT, "fast": Speed(bf16=True)}
# What fusion bench --parts speed measures by default.
MEASURED = ("exact", "int8", "bf16", "tome8", "tome16", "tome16+int8", "tome24+int8")


def parse_speed(name: str) -> Speed:
    """A setting's name (``exact``, ``fast``, or options joined by ``+``: ``tome16+int8``,
    ``bf16``, ``compile``) as a :class:`Speed`."""
    if name in PRESETS:
        return PRESETS[name]
    merge, flags = 0, set()
    for part in name.split("+"):
        if part.startswith("tome") and part[4:].isdigit():
            merge = int(part[4:])
        elif part in ("int8", "bf16", "compile"):
            flags.add(part)
        else:
            raise ValueError(f"unknown speed setting '{part}' in '{name}'")
    return Speed(merge=merge, **{flag: True for flag in flags})


def apply_speed(net: nn.Module, speed: Speed, device: str) -> None:
    """Set ``speed``'s ViT options on a trained classifier ``net`` (a
    :class:`~fusion.models.classifier.FusionClassifier`, in place; ``device``: ``cpu`` or
    ``gpu``, where it will run). Merging, int8 and compile need a frozen ViT and are refused
    for a model without one; applying the same ``speed`` again changes nothing."""
    if speed == EXACT or getattr(net, "applied_speed", None) == speed:
        return  # nothing to do, or done already (a bench applies it before its clock starts)
    encoder = getattr(net, "image_encoder", None)
    needs_vit = speed.merge or speed.int8 or speed.compile  # bf16 is the trainer's precision
    if needs_vit and (encoder is None or not encoder.cacheable):
        raise ValueError(
            f"--speed {speed.name} needs a model with a frozen ViT (this one has "
            f"{'no image branch' if encoder is None else 'a fully trained ViT'})"
        )
    if speed.merge:
        if speed.merge < 0:
            raise ValueError(f"tokens merged per block must be >= 0, got {speed.merge}")
        check_mergeable(encoder.backbone)
        encoder.merge = speed.merge
    if speed.int8:
        if device != "cpu":
            raise ValueError("int8 quantisation runs on the CPU only (--device cpu)")
        with warnings.catch_warnings():  # torch.ao's deprecation notices, once per layer
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(
                encoder.backbone, {nn.Linear}, dtype=torch.qint8, inplace=True
            )
    if speed.compile:
        encoder.frozen_part = torch.compile(encoder.frozen_part, dynamic=True)
    net.applied_speed = speed
