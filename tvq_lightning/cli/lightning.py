"""``tvq fit | validate | test | predict``: a :class:`~lightning.pytorch.cli.LightningCLI` over our modules.

Models and data modules are chosen by class path (subclass mode), so a config reads::

    model:
      class_path: tvq_lightning.modules.adamerging.AdaMerging
      init_args: {store: runs/tiny/store, ...}
    data:
      class_path: tvq_lightning.data.ToyTasks
      init_args: {tasks: [a, b], ...}

The task list is given once, on the data module: ``data.init_args.tasks`` is linked (at parse
time) to ``model.init_args.tasks``. The link only applies when the chosen model class takes a
``tasks`` argument, so single-task or task-agnostic modules work unchanged; a ``--model.tasks``
given by hand is replaced by the data module's list. ``--print_config`` output re-runs as is
(``tvq fit -c printed.yaml``), and the resolved config of every run is saved next to its logs.

``test_after_fit: true`` (or ``--test_after_fit true``) runs ``test`` on the fitted module right
after ``fit``, with the same trainer and data (test-time adaptation recipes: adapt, then report
the per-task accuracy). Every sub-command accepts it, so one config serves ``fit`` and ``test``.

:func:`run_lightning` is what ``tvq`` calls for these sub-commands; a
:class:`~tvq_lightning.errors.TvqError` raised while building or running the model (jsonargparse
wraps errors raised during instantiation) is reported as one line, ``tvq: error: ...``, exit 2.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..errors import TvqError
from .options import format_error


class TvqArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, tolerant of factory functions nested in a linked model.

    jsonargparse (4.53) hands the link targets of the model (``linked_targets={"tasks"}``) to the
    parser of a nested ``class_path`` and, when that path is a factory function (e.g.
    ``tvq_lightning.models.encoders.tiny_encoder``), ``add_function_arguments`` rejects the keyword:
    ``--model.task b`` on such a config then fails. The keyword only clears "required" marks, which
    jsonargparse does itself after this call, so it is dropped here.
    """

    def add_function_arguments(self, function: Any, *args: Any, linked_targets: Any = None, **kwargs: Any) -> list[str]:
        return super().add_function_arguments(function, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """A config error (unknown key, with "did you mean"; missing file; bad type) as one line,
        ``tvq: error: ...``, exit 2, instead of jsonargparse's usage dump."""
        if not self.exit_on_error:  # jsonargparse is trying alternatives and wants the exception
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"tvq: error: {format_error(message, parser)}", file=sys.stderr)
        raise SystemExit(2)


class TvqLightningCLI(LightningCLI):
    """LightningCLI with subclass-mode ``model``/``data`` and the ``tasks`` argument link.

    Args:
        args: the command line after ``tvq`` (e.g. ``["fit", "-c", "configs/x.yaml"]``); None
            reads ``sys.argv[1:]``.
        run: run the sub-command after instantiation (False: only parse and instantiate;
            then ``args`` must not start with a sub-command).
        **kwargs: passed on to :class:`~lightning.pytorch.cli.LightningCLI` (override defaults).
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        options: dict[str, Any] = dict(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=TvqArgumentParser,
            parser_kwargs={"prog": "tvq", "description": "tvq_lightning: Lightning sub-commands (LightningCLI)."},
        )
        options.update(kwargs)
        super().__init__(args=None if args is None else list(args), run=run, **options)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's task list to the model's (only for models that take ``tasks``)."""
        parser.link_arguments("data.init_args.tasks", "model.init_args.tasks", apply_on="parse")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, run test on the fitted module (same trainer and datamodule)")

    def after_fit(self) -> None:
        """``test_after_fit``: test the module as fitted (current weights, not a checkpoint)."""
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (without LightningCLI's warning about ``args`` and ``sys.argv`` both set:
        the ``tvq`` entry point always passes the command line through ``args``)."""
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)


def find_tvq_error(exc: BaseException | None, depth: int = 32) -> TvqError | None:
    """The first :class:`TvqError` in ``exc``'s chain of causes/contexts (jsonargparse wraps errors
    raised while instantiating a class in a ``ValueError``), or None."""
    seen: set[int] = set()
    while exc is not None and depth > 0 and id(exc) not in seen:
        if isinstance(exc, TvqError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
        depth -= 1
    return None


def run_lightning(argv: Sequence[str]) -> int:
    """Run ``tvq <fit|validate|test|predict> ...``; returns the exit status.

    ``--help``/``--print_config`` raise :class:`SystemExit` as jsonargparse does; a config error
    prints one line ``tvq: error: ...`` and raises ``SystemExit(2)`` (:meth:`TvqArgumentParser.error`).
    """
    try:
        TvqLightningCLI(args=list(argv))
    except Exception as e:  # noqa: BLE001 - re-raised unless it carries one of our errors
        err = find_tvq_error(e)
        if err is None:
            raise
        print(f"tvq: error: {err}", file=sys.stderr)
        return 2
    return 0
