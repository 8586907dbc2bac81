"""The training configs: ``configs/base.yaml``, what every variant shares (trainer, data, the fused
models' network), and one overlay per variant, ``configs/variants/NAME.yaml``, read over it; the
CLI merges them in order, a later value winning::

    fusion fit --config configs/base.yaml --config configs/variants/mbt_mid.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fusion.errors import InputError

CONFIG_DIR = Path("configs")  # as the commands name it, from the checkout
BASE = "base.yaml"
VARIANTS = "variants"


def variant_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The variants of ``config_dir`` (its ``variants/*.yaml``), sorted."""
    return sorted(path.stem for path in (config_dir / VARIANTS).glob("*.yaml"))


def config_files(name: str | Path, config_dir: Path = CONFIG_DIR) -> tuple[Path, Path]:
    """The files of a variant in the order they are read: ``config_dir/base.yaml``, then the
    overlay ``config_dir/variants/NAME.yaml``, or ``name`` itself when it is a YAML file."""
    custom = Path(name).suffix in (".yaml", ".yml")
    overlay = Path(name) if custom else config_dir / VARIANTS / f"{name}.yaml"
    if not overlay.is_file():
        known = "" if custom else f" (variants: {', '.join(variant_names(config_dir))})"
        raise InputError(f"config not found{known}", file=overlay)
    return config_dir / BASE, overlay


def config_args(files: Sequence[Path]) -> list[str]:
    """``--config FILE`` for each file, in order."""
    return [arg for path in files for arg in ("--config", str(path))]
