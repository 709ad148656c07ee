"""The `lightning-meta` command: LightningCLI as the composition root.

Algorithms, backbones and DataModules are chosen by import path in YAML (`class_path`), so the
CLI is the registry and a new algorithm needs no code here. What this file adds to Lightning's
CLI: defaults that meta-learning needs (`inference_mode=False`, since evaluation adapts with
gradients; W&B + CSV logging, W&B offline unless the user is logged in; a checkpoint callback
that keeps `last.ckpt`, written atomically), the number of ways linked to the backbone's
output size, `--test_after_fit`, a "did you mean" for a mistyped option, and the project's own
error messages as one `error:` line instead of tracebacks (`LIGHTNING_META_TRACEBACK=1` shows them).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import linecache
import netrc
import os
import re
import sys
from multiprocessing.pool import RemoteTraceback
from pathlib import Path
from typing import IO, Any, NoReturn

import jsonargparse
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.trainer.states import TrainerStatus
from torch.utils.data import DataLoader

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.predictor import prediction_probabilities
from lightning_meta.callbacks import EvaluationProtocol
from lightning_meta.checkpoint_io import AtomicCheckpointIO
from lightning_meta.data.datamodule import EpisodicDataModule
from lightning_meta.data.predict import format_table, load_folder_task, write_predictions

TRACEBACK_VARIABLE = "LIGHTNING_META_TRACEBACK"
_PACKAGE_DIR = Path(__file__).resolve().parent
_JSONARGPARSE_DIR = Path(jsonargparse.__file__).resolve().parent


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


def _signature_names(class_path: str) -> list[str]:
    try:
        cls = _import(class_path)
    except (ImportError, AttributeError, ValueError):
        return []
    return [name for name in inspect.signature(cls).parameters if name not in ("self", "args", "kwargs")]


def unknown_option_hint(message: str, known: list[str]) -> str | None:
    """A "did you mean" line for jsonargparse's unknown-option errors, or None.

    Args:
        message: jsonargparse's error message.
        known: the parser's option names (dotted, without dashes).
    """
    if (match := re.search(r"Option '([^']+)' is not accepted", message)) and "class_path '" in message:
        # A class's own argument: its candidates are the class's signature.
        bad = match.group(1)
        classes = re.findall(r"class_path '([\w.]+)'", message)
        candidates = [name for path in classes for name in _signature_names(path)]
        where = f" of {classes[-1]}" if classes else ""
        group = re.search(r'Parser key "([^"]+)"', message)
        more = f"`lightning-meta fit --{group.group(1)}.help {classes[-1]}`" if group and classes else None
    elif match := re.search(r"(Group|Subcommand) '([^']+)' does not accept option '([^']+)'", message):
        kind, group, bad = match.groups()
        return _dotted_hint(f"{group}.{bad}" if kind == "Group" else bad, known)
    elif match := re.search(
        r"(?:Key|Option) '([^']+)' is not (?:expected|accepted)|unrecognized arguments: (\S+)", message
    ):
        return _dotted_hint((match.group(1) or match.group(2)).lstrip("-").split("=")[0], known)
    else:
        return None
    close = difflib.get_close_matches(bad, candidates, n=3, cutoff=0.6)
    if close:
        return f"'{bad}' is not an option{where}; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"'{bad}' is not an option{where}; {more or '`lightning-meta fit --help`'} lists the options"


def _dotted_hint(bad: str, known: list[str]) -> str:
    """Suggest for the first segment of a dotted key that no known option starts with."""
    parts = bad.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i])
        children = {k.split(".")[i] for k in known if k.split(".")[:i] == parts[:i] and len(k.split(".")) > i}
        if parts[i] in children:
            continue
        close = difflib.get_close_matches(parts[i], sorted(children), n=3, cutoff=0.6)
        where = f" of {prefix}" if prefix else ""
        if close:
            options = " or ".join(repr(".".join([*parts[:i], c])) for c in close)
            return f"'{bad}': '{parts[i]}' is not an option{where}; did you mean {options}?"
        return f"'{bad}': '{parts[i]}' is not an option{where}; `lightning-meta fit --help` lists the options"
    return f"'{bad}' is not an option; `lightning-meta fit --help` lists the options"


def _raised_at(err: BaseException) -> tuple[Path, str] | None:
    """The file and source line of the innermost frame of `err`'s traceback, where it was raised."""
    remote = err.__cause__
    if isinstance(remote, RemoteTraceback) and (frames := re.findall(r'File "([^"]+)", line (\d+)', remote.tb)):
        # A worker's exception, re-raised by multiprocessing.pool with the worker's traceback as text.
        filename, lineno = frames[-1][0], int(frames[-1][1])
    else:
        tb = err.__traceback__
        if tb is None:
            return None
        while tb.tb_next is not None:
            tb = tb.tb_next
        filename, lineno = tb.tb_frame.f_code.co_filename, tb.tb_lineno
    return Path(filename).resolve(), linecache.getline(filename, lineno).strip()


def user_error_message(err: BaseException) -> str | None:
    """The message of an error that tells the user what to change, or None for anything else.

    That is a `raise` statement of lightning-meta itself (its checks of config values, data and
    training, whatever the exception type), or Lightning's `MisconfigurationException`, found
    under the wrappers jsonargparse puts around errors of the classes it instantiates. Anything
    else (an error raised by a failing operation rather than a `raise`, or from code that is not
    lightning-meta's) may be a bug: None, so that its traceback is shown.

    Args:
        err: the exception that ended the command.
    """
    # jsonargparse re-raises a constructor's error as "Does not validate against any of the Union
    # subtypes ... Given value: Namespace(...)" from the original.
    while err.__cause__ is not None and (where := _raised_at(err)) and where[0].is_relative_to(_JSONARGPARSE_DIR):
        err = err.__cause__
    if not isinstance(err, MisconfigurationException):
        where = _raised_at(err)
        if where is None or not where[0].is_relative_to(_PACKAGE_DIR) or not where[1].startswith("raise "):
            return None
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])  # str() of a KeyError quotes its message
    return str(err)


class MetaArgumentParser(LightningArgumentParser):
    """Errors end with a "did you mean" for a mistyped option, after a one-line usage (not the
    full list of every option, which buries the error)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # Only where the error is printed (a subcommand's parser raises to the main one).
        if self.exit_on_error and (hint := unknown_option_hint(message, self._option_names())):
            message = f"{message}\n{hint}"
        super().error(message, ex)

    def _option_names(self) -> list[str]:
        parsers, names = [self], []
        while parsers:
            parser = parsers.pop()
            for action in parser._actions:
                names.append(action.dest)
                parsers.extend(getattr(action, "_name_parser_map", {}).values())
        return names

    def print_usage(self, file: IO[str] | None = None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog.replace(' [options]', '')} [--help] [--config CONFIG] ...\n")


class LightningMetaCLI(LightningCLI):
    """LightningCLI with meta-learning defaults; see the module docstring.

    Args:
        args: `LightningCLI`'s positional arguments.
        report_errors: print an error that tells the user what to change (`user_error_message`)
            as the usage line and one `error:` line, and exit with status 2, as a mistyped option
            does; unless the environment variable `LIGHTNING_META_TRACEBACK` is set (and not 0),
            which raises it with its traceback. False (for code and tests) always raises.
        kwargs: `LightningCLI`'s keyword arguments.
    """

    def __init__(self, *args: Any, report_errors: bool = False, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except Exception as err:
            if not report_errors or os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
                raise
            if (message := user_error_message(err)) is None:
                raise
            trainer = getattr(self, "trainer", None)
            if (
                trainer is not None
                and trainer.state.status == TrainerStatus.INTERRUPTED
                and trainer.progress_bar_callback
            ):
                print(flush=True)  # end the progress bar's line (on stdout), or the error starts on it
            if hasattr(self, "parser"):
                self._parser(getattr(self, "subcommand", None)).print_usage(sys.stderr)
            sys.stderr.write(f"error: {message}\n")
            raise SystemExit(2) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after `fit`, run the test tasks on the final weights and print the results",
        )
        # A checkpoint callback unless `--trainer.enable_checkpointing=false`, configurable as
        # `checkpoint.*`; `last.ckpt` is what a resumed or tested run points at
        # (`--ckpt_path .../last.ckpt`).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Always the evaluation protocol, so every run's config says which one its numbers used.
        parser.add_lightning_class_args(EvaluationProtocol, "protocol")
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
        if self.subcommand in ("fit", None):  # every subcommand has test_after_fit; only fit uses it
            self._check_inference_mode(config)
        self._check_checkpoint_options(config)
        if self.subcommand == "predict":
            self.save_config_callback = None  # a prediction is no run to record: no config.yaml in the folder

    def _check_checkpoint_options(self, config: Any) -> None:
        """Refuse `checkpoint.*` options that `trainer.enable_checkpointing=false` would ignore."""
        if _get(config, "trainer.enable_checkpointing") is not False:
            return
        defaults = self._parser(self.subcommand).get_defaults().get("checkpoint")
        given = {key: value for key, value in config["checkpoint"].items() if value != defaults.get(key)}
        if given:
            options = ", ".join(f"checkpoint.{key}={value}" for key, value in given.items())
            raise ValueError(
                f"trainer.enable_checkpointing=false writes no checkpoint, so the checkpoint options "
                f"{options} would be ignored: remove them, or --trainer.enable_checkpointing=false"
            )

    @staticmethod
    def _check_inference_mode(config: Any) -> None:
        """Refuse before training what would fail only at the test after hours of it."""
        model_class = _get(config, "model.class_path")
        if not (config.get("test_after_fit") and _get(config, "trainer.inference_mode") and model_class):
            return
        if getattr(_import(model_class), "adapts_with_gradients", False):
            raise ValueError(
                f"trainer.inference_mode=true with --test_after_fit: {model_class} adapts with gradients "
                "at test time, which inference mode forbids; use --trainer.inference_mode=false (the default)"
            )

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

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # LightningCLI.instantiate_trainer, but without the `checkpoint` callback when checkpointing
        # is off: Lightning refuses a ModelCheckpoint with enable_checkpointing=False.
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        trainer = self._instantiate_trainer(config, callbacks)
        # Atomic checkpoint writes, unless the user chose a CheckpointIO of their own.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters into the config here, before anything
        # else: a file that is not a checkpoint would fail with the unpickler's message alone.
        try:
            super()._parse_ckpt_path()
        except Exception as e:
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            raise ValueError(
                f"--ckpt_path {ckpt_path} could not be read as a Lightning checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}): give the last.ckpt of a `lightning-meta fit` run"
            ) from e

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument(
                "--folders",
                type=str | None,
                default=None,
                help="a task of your own: FOLDER/support/<class name>/*.png|jpg and FOLDER/query/*.png|jpg",
            )
            parser.add_argument(
                "--output", type=str | None, default=None, help="the CSV to write (default FOLDER/predictions.csv)"
            )
        return parser

    def predict(self, model: MetaLearner, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """`lightning-meta predict`: adapt the checkpoint's learner on `--folders`' support set and
        classify its queries (`predict_step`), writing a CSV and printing a short table."""
        config = self.config["predict"]
        folders = config.get("folders")
        if folders is None:
            raise ValueError(
                "lightning-meta predict needs --folders FOLDER, laid out as FOLDER/support/<class name>/*.png "
                "and FOLDER/query/*.png (README 'Predicting on your own data')"
            )
        # The weights alone: the fit's callback states (its checkpoint folder) mean nothing here, and
        # the evaluation protocol is this command's (`--protocol.evaluation`).
        model.load_state_dict(check_checkpoint(model, ckpt_path))
        image_format = getattr(self.datamodule, "image_format", lambda: None)()
        if image_format is None:
            raise ValueError(
                f"the config's data, {type(self.datamodule).__name__}, does not say how its images are decoded, so "
                "new images cannot be read as the model's were: predict from a config whose data is "
                "OmniglotDataModule, or FewShotDataModule with ImageFolderClasses"
            )
        task = load_folder_task(folders, image_format)
        loader = DataLoader([task.as_batch()], batch_size=None)
        predictions = self.trainer.predict(model, dataloaders=loader)[0][0]
        rows = write_predictions(
            output := Path(config.get("output") or Path(folders) / "predictions.csv"),
            task,
            prediction_probabilities(model, predictions.float()),
        )
        print(format_table(rows))
        print(
            f"{len(rows)} query images, {len(task.class_names)} classes ({len(task.support_y)} support images): "
            f"predictions written to {output}"
        )

    def after_fit(self) -> None:
        if self.config.fit.test_after_fit:
            # The final weights, not a reloaded checkpoint: what was just trained is tested.
            self.trainer.test(self.model, datamodule=self.datamodule)


def check_checkpoint(model: MetaLearner, ckpt_path: str | None) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (its `state_dict`); a missing or unreadable checkpoint, or one whose
    weights are not this model's, is refused naming the path and the fix (Lightning's own error is
    a list of tensor names)."""
    if ckpt_path is None:
        raise ValueError("lightning-meta predict needs --ckpt_path: the checkpoint of a meta-trained model (last.ckpt)")
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path} is not a file: give the last.ckpt of a `lightning-meta fit` run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as e:
        raise ValueError(
            f"--ckpt_path {path} could not be read as a Lightning checkpoint ({type(e).__name__}: {e}): give the "
            "last.ckpt of a `lightning-meta fit` run"
        ) from e
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {list(state[k].shape)} ≠ {list(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{len(found)} {what} (e.g. {', '.join(found[:2])})"
            for found, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
            if found
        ]
        raise ValueError(
            f"--ckpt_path {path} does not hold the weights of the model this config builds "
            f"({type(model).__name__}, backbone {type(model.backbone).__name__}): {'; '.join(problems)}. Pass the "
            "config the checkpoint was trained with (the run's config.yaml), or a checkpoint of this config"
        )
    return state


def run_cli(args: list[str] | None = None, run: bool = True, report_errors: bool = False) -> LightningMetaCLI:
    """Parse `args` like the `lightning-meta` command, build everything, and run the subcommand.

    Args:
        args: command-line arguments (default: the process's own, `sys.argv[1:]`).
        run: run the subcommand; False only parses and instantiates (no subcommand then), to
            build a configured model, DataModule and Trainer from code or tests.
        report_errors: print the project's error messages as the command does and exit with
            status 2 (see `LightningMetaCLI`); False raises them.
    """
    # Lightning 2.6's CLI calls jsonargparse APIs deprecated in 4.49: noise for our users.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    return LightningMetaCLI(
        # Any LightningModule: the supervised `MetaLearner`s and the meta-RL `MetaRLLearner`s.
        pl.LightningModule,
        EpisodicDataModule,
        parser_class=MetaArgumentParser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        report_errors=report_errors,
    )


def main() -> None:
    """Entry point of `lightning-meta` and `python -m lightning_meta`."""
    run_cli(report_errors=True)
