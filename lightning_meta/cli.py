"""The `lightning-meta` command: LightningCLI as the composition root.

Algorithms, backbones and DataModules are chosen by import path in YAML (`class_path`), so the
CLI is the registry and a new algorithm needs no code here. What this file adds to Lightning's
CLI: defaults that meta-learning needs (`inference_mode=False`, since evaluation adapts with
gradients; W&B + CSV logging, W&B offline unless the user is logged in; a checkpoint callback
that keeps `last.ckpt`), the number of ways linked to the backbone's output size, and
`--test_after_fit`.
"""

from __future__ import annotations

import importlib
import netrc
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.data.datamodule import EpisodicDataModule


def wandb_logged_in() -> bool:
    """Whether W&B has credentials: `WANDB_API_KEY`, or an api.wandb.ai entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _get(namespace: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if namespace is None or key not in namespace:
            return None
        namespace = namespace[key]
    return namespace


class LightningMetaCLI(LightningCLI):
    """LightningCLI with meta-learning defaults; see the module docstring."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after `fit`, run the test tasks on the final weights and print the results",
        )
        # Always a checkpoint callback, configurable as `checkpoint.*`; `last.ckpt` is what a
        # resumed or tested run points at (`--ckpt_path .../last.ckpt`).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "trainer.inference_mode": False,
                "trainer.logger": [
                    {
                        "class_path": "pytorch_lightning.loggers.WandbLogger",
                        "init_args": {"project": "lightning-meta", "save_dir": "logs"},
                    },
                    {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
                ],
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "WANDB_MODE" not in os.environ and not wandb_logged_in():
            # The environment variable, not wandb.init(mode=...): only it also keeps W&B's
            # telemetry off the network (shared/STACK.md).
            os.environ["WANDB_MODE"] = "offline"
            print("lightning-meta: W&B is not logged in; logging offline (`wandb sync` uploads later)")
        self._link_ways_to_head(config)

    @staticmethod
    def _link_ways_to_head(config: Any) -> None:
        """Give a head-based algorithm's backbone `out_features = data ways`, or refuse a mismatch."""
        model_class = _get(config, "model.class_path")
        ways = _get(config, "data.init_args.ways")
        backbone_args = _get(config, "model.init_args.backbone.init_args")
        if model_class is None or ways is None or backbone_args is None or "out_features" not in backbone_args:
            return
        if not getattr(_import(model_class), "uses_output_head", False):
            return
        train_ways = _get(config, "data.init_args.train_ways")
        if train_ways not in (None, ways):
            raise ValueError(
                f"data.init_args.train_ways={train_ways} differs from data.init_args.ways={ways}, but "
                f"{model_class} classifies with a fixed-size output head: set them equal"
            )
        out = backbone_args["out_features"]
        if out is None:
            backbone_args["out_features"] = ways
        elif out != ways:
            raise ValueError(
                f"model.init_args.backbone.init_args.out_features={out} but data.init_args.ways={ways}: "
                "the head must have one output per way; remove out_features to link it to the ways"
            )

    def after_fit(self) -> None:
        if self.config.fit.test_after_fit:
            # The final weights, not a reloaded checkpoint: what was just trained is tested.
            self.trainer.test(self.model, datamodule=self.datamodule)


def run_cli(args: list[str] | None = None, run: bool = True) -> LightningMetaCLI:
    """Parse `args` like the `lightning-meta` command, build everything, and run the subcommand.

    Args:
        args: command-line arguments (default: the process's own, `sys.argv[1:]`).
        run: run the subcommand; False only parses and instantiates (no subcommand then), to
            build a configured model, DataModule and Trainer from code or tests.
    """
    # Lightning 2.6's CLI calls jsonargparse APIs deprecated in 4.49: noise for our users.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    return LightningMetaCLI(
        MetaLearner,
        EpisodicDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """Entry point of `lightning-meta` and `python -m lightning_meta`."""
    run_cli()
