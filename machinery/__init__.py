"""The machinery beside the experiment: what makes `introspection_experiment.py` resumable, portable, fast and
reported, and what a reader can skip to learn the science. It never imports the script.

  rundir    run directory: atomic writes, the lock, config.json, the manifest of verified artifacts, resume, timings
  models    model sources (aliases, GGUF assembly, hub), loading, placement, 4-bit, decoder-layer access, LM-head hooks
  fastpath  the CUDA fast path: fused LoRA and RMSNorm, the static decoder and its CUDA graph, graphed training steps
  report    metrics.json -> metrics.csv, results.md tables and figures
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import stat
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [  # the declared surface: what the script, the studies, the benchmark and paper/tables.py use
    "ConfigError", "DATA_DIR", "OneLineParser", "Progress", "cli", "config_parser", "flag", "log", "progress",
    "read_input_file", "setup_logging",
]


log = logging.getLogger("introspection")


class ConfigError(Exception):
    """Bad input: reported as one line and a non-zero exit, never a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown flag, a missing or malformed value) are ConfigErrors, so that `cli`
    reports them like every refusal: one line and exit 2."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see --help)")


class Progress:
    """A progress bar on a terminal (tqdm); elsewhere, where tqdm is off (a log file), a log line at every tenth of
    the work and at least every `every_s` seconds, with the count, the elapsed time and the time left at the rate so
    far."""

    def __init__(self, total: int, desc: str, every_s: float = 30.0):
        self.bar = tqdm(total=total, desc=desc, leave=False, disable=None)
        self.total, self.desc, self.every_s, self.done = total, desc, every_s, 0
        self.start = self.last = time.monotonic()
        self.next_tenth = 1

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        if not self.bar.disable:
            return
        now = time.monotonic()
        if self.done * 10 >= self.next_tenth * self.total or now - self.last >= self.every_s:
            elapsed = now - self.start
            log.info("%s: %d/%d (%.0f%%) after %.0f s, about %.0f s left", self.desc, self.done, self.total,
                     100 * self.done / max(self.total, 1), elapsed, elapsed * (self.total - self.done) / self.done)
            self.last = now
            while self.next_tenth * self.total <= self.done * 10:
                self.next_tenth += 1

    def close(self) -> None:
        self.bar.close()


def progress(items, desc: str):
    """Iterate over `items` (a sized collection) with a Progress."""
    bar = Progress(len(items), desc)
    for item in items:
        yield item
        bar.update()
    bar.close()


DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the shipped data files: inputs of every run


def read_input_file(path: str | Path, what: str, limit: int) -> str:
    """The UTF-8 text of an input file named on the command line (`what`: how to name it in a message), refused in one
    line unless it is a regular file of at most `limit` bytes: a FIFO or a device (/dev/zero) would hang the run or
    fill its memory, and so would a huge file. At most limit + 1 bytes are read."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # follows a link: what matters is what would be read
            raise ConfigError(f"{what} {path} is not a regular file (a FIFO, device, socket or folder)")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit:,} bytes: not an input this tool reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def setup_logging() -> None:
    """INFO logs with times; the libraries' own chatter (warnings, progress bars) off."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # from peft


def cli(action) -> int:
    """Run action() with the script's logging; bad input (a ConfigError) is one logged line and exit code 2, Ctrl-C one
    line and exit code 130 (every finished stage is already saved)."""
    setup_logging()
    try:
        action()
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted: every finished stage is saved in the run directory; the same command resumes")
        return 130
    return 0


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: --field-name, or the one its metadata names (--no-... for a switch
    that is on by default)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def config_parser(config_class, description: str | None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass `config_class` (its metadata: help, choices, a
    flag name), each defaulting to the field's default; the types come from the fields' annotations (strings)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_class):
        kwargs = dict(help=f.metadata["help"], default=f.default, dest=f.name)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.type == "bool":
            kwargs["action"] = "store_false" if f.default else "store_true"
        elif f.type.startswith("list["):
            kwargs["nargs"] = "+"
            if f.type.startswith("list[int]"):
                kwargs["type"] = int
        elif f.type in ("int", "int | None"):
            kwargs["type"] = int
        elif f.type in ("float", "float | None"):
            kwargs["type"] = float
        parser.add_argument(flag(f), **kwargs)
    return parser
