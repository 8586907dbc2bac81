"""The training configs: ``configs/base.yaml``, what every variant shares (trainer, data, the fused
models' network), and one overlay per variant, ``configs/variants/NAME.yaml``, read over it; the
CLI merges them in order, a later value winning::

    fusion fit --config configs/base.yaml --config configs/variants/mbt_mid.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from fusion.errors import InputError
from fusion.models.classifier import NetConfig

CONFIG_DIR = Path("configs")  # as the commands name it, from the checkout
CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # whatever the working folder
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


def net_config(files: Sequence[Path]) -> NetConfig:
    """The network settings (``model.net``) of ``files`` read in order, as the CLI reads them: a
    later file's value wins, field by field; a misspelt field is an error."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=NetConfig)
    settings = parser.get_defaults()
    for path in files:
        net = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("net")
        if net is not None:
            settings = parser.parse_object({"net": net}, namespace=settings)
    return NetConfig(**settings.net.as_dict())
