"""The machinery beside the experiment: what makes `introspection_experiment.py` resumable, portable, fast and
reported, and what a reader can skip to learn the science. It never imports the script.

  rundir    run directory: atomic writes, the lock, config.json, the manifest of verified artifacts, resume, timings
  models    model sources (aliases, GGUF assembly, hub), loading, placement, 4-bit, decoder-layer access, LM-head hooks
  fastpath  the CUDA fast path: fused LoRA and RMSNorm, the static decoder and its CUDA graph, graphed training steps
  report    metrics.json -> metrics.csv, results.md tables and figures
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [  # the declared surface: what the script, the studies, the benchmark and paper/tables.py use
    "ConfigError", "DATA_DIR", "OneLineParser", "Progress", "cli", "log", "progress", "setup_logging",
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
