"""A run's log. While a run works, every log record of its process also goes to `<run>/run.log`,
and the warnings of the methods and the engine (say, InfLoRA's "fewer free input directions than
the rank", once per stage) are collected instead of printed among the progress bars: the runner
stores each stage's in its `metrics.json`, the summary lists them all, and the run prints one line
about them when it ends. A plugin's own package counts as the methods' (`sources`).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

RUN_LOG = "run.log"
QUIET = ("harness_methods", "harness")  # loggers whose warnings a run collects, not prints


def configure_process_logging() -> None:
    """How every process of the harness logs (the command line, a job process, an array task):
    INFO and up on stderr, other libraries' chatter and the deprecations nobody can act on off."""
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "peft", "DeepSpeed", "fontTools", "mlflow",
                  "alembic"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # peft still calls a transformers API deprecated for v6; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # DeepSpeed's ZeRO calls a torch.distributed API deprecated in torch 2.x; nothing to act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def _ours(record: logging.LogRecord, sources: tuple[str, ...]) -> bool:
    return record.levelno == logging.WARNING and record.name.split(".")[0] in sources


class _Collector(logging.Handler):
    def __init__(self, sources: tuple[str, ...]):
        super().__init__(logging.WARNING)
        self.sources = sources
        self.messages: list[str] = []
        self.count, self.first = 0, ""

    def emit(self, record: logging.LogRecord) -> None:
        if _ours(record, self.sources):
            self.messages.append(record.getMessage())
            self.count += 1
            self.first = self.first or record.getMessage()


class _QuietFile(logging.FileHandler):
    """A full disk must not turn every later log line into a printed traceback: the run's own
    error says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class RunLog:
    """The context of one run: `take()` returns the warnings collected since the last call.
    `write`: rank 0 writes the file and collects; other ranks only keep the warnings quiet.
    `sources`: the top-level logger names whose warnings are collected."""

    def __init__(self, run_path: Path, write: bool = True, sources: tuple[str, ...] = QUIET):
        self.path = run_path / RUN_LOG
        self.write = write
        self.sources = tuple(sources)
        self.collector = _Collector(self.sources)
        self.file: logging.FileHandler | None = None
        self.console: list[logging.Handler] = []

    def __enter__(self) -> "RunLog":
        root = logging.getLogger()
        self.console = list(root.handlers)
        for handler in self.console:
            handler.addFilter(self._quiet)
        if self.write:
            self.file = _QuietFile(self.path, encoding="utf-8")
            self.file.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(self.file)
            root.addHandler(self.collector)
        return self

    def _quiet(self, record: logging.LogRecord) -> bool:
        return not _ours(record, self.sources)

    def take(self) -> list[str]:
        messages, self.collector.messages = self.collector.messages, []
        return messages

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        for handler in self.console:
            handler.removeFilter(self._quiet)
        for handler in (self.file, self.collector):
            if handler is not None and handler in root.handlers:
                root.removeHandler(handler)
        if self.file is not None:
            self.file.close()
        if self.collector.count:  # the one line a run prints about them, after its progress bars
            log.warning("%s: %d warning(s), the first: %s (all in summary.json and %s)",
                        self.path.parent, self.collector.count, self.collector.first, RUN_LOG)
