"""The run directory: atomic artifacts, one process at a time (a lock), config.json and a manifest of verified
artifacts (sha256 and the inputs they came from), resume, stage timings, the environment."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from machinery import DATA_DIR, ConfigError, log
from machinery.models import DEVICE_MAP_STRATEGIES

__all__ = [  # the declared surface: what the script, the studies, the benchmark and paper/tables.py use
    "CONFIG_FILE", "Manifest", "RunState", "Timer", "atomic_path", "claim_run_dir", "claim_seeds_dir", "config_hash",
    "environment", "finished_metrics", "load_or_build_dataset", "load_or_train_adapter", "model_slug", "peak_gpu_gib",
    "prepare_run_dir", "prepare_seeds_dir", "read_artifact", "read_finished_trials", "read_json_or_none", "read_jsonl",
    "record_environment", "require_complete", "reset_gpu_peaks", "run_dir_lock", "run_status", "synchronize_gpus",
    "undone_on_refusal", "write_json", "write_jsonl", "to_dataset", "save_vectors", "load_vectors",
]


TEMPORARY_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: Path):
    """Yield a path for the block to create (a file or a folder) inside a uniquely named temporary sibling folder, and
    rename it into place only if the block succeeds: concurrent writers never share a temporary, and readers see the
    old artifact or the new one, never a partial one."""
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX))
    tmp = staging / path.name
    try:
        yield tmp
        if path.is_dir():  # a folder cannot be replaced by rename: move the old one out of the way first
            os.replace(path, staging / (path.name + ".old"))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


OPT_IN_EXPERIMENTS = ("introspection_controls",)  # switches that only add experiments to a run


def run_settings(config: dict) -> dict:
    """A config (as a dict) as it defines a run: every field but the folder the run is written to and the permission
    to run odd strengths (it changes no result), and without an opt-in experiment switch that is off (a run without
    it is the run as before the switch existed: same hash, and its run directories resume)."""
    return {k: v for k, v in config.items() if k not in ("output_dir", "force_strengths")
            and not (k in OPT_IN_EXPERIMENTS and not v)}


def config_hash(cfg, length: int = 8) -> str:
    """A content address of a run: its settings and the contents of every input file (run_input_files)."""
    identity = {"settings": run_settings(dataclasses.asdict(cfg)), "inputs": input_digests(cfg)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:length]


def config_diff(saved: dict, cfg) -> list[str]:
    """The fields in which a run directory's saved config (config.json's "config") differs from `cfg`."""
    previous, current = run_settings(saved), run_settings(dataclasses.asdict(cfg))
    return sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))


def model_slug(model: str) -> str:
    """A --model value as a folder name: the last part of a hub id or path, without .gguf, lower case."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(model.rstrip("/")).name.removesuffix(".gguf")).strip("-").lower()


def default_run_dir(cfg) -> Path:
    return Path(f"runs/{model_slug(cfg.model)}-{config_hash(cfg)}")


def run_dir_of(cfg) -> Path:
    """--output-dir, or the default run directory of `cfg`."""
    return Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg)


def prepare_run_dir(cfg) -> Path:
    """The run directory of `cfg`, first checked without writing anything (check_run_dir: absent, empty, or this
    config's run; anything else is refused in one line and left as it was), then created if absent and probed for
    writing."""
    run_dir = run_dir_of(cfg)
    check_run_dir(run_dir, cfg)
    return writable(run_dir)


def prepare_seeds_dir(cfg) -> Path:
    """The folder of a --seeds run, checked like prepare_run_dir's (check_seeds_dir), then created and probed."""
    base = run_dir_of(cfg)
    check_seeds_dir(base)
    return writable(base)


def writable(folder: Path) -> Path:
    """`folder`, created if absent, after a write probe that leaves no file (one line if it is not writable)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a uniquely named probe: processes starting together never collide
    except OSError as e:
        raise ConfigError(f"output directory {folder} is not writable: {e.strerror or e}") from None
    return folder


LOCK_FILE = ".lock"

CONFIG_FILE = "config.json"

MANIFEST_FILE = "manifest.json"

ENVIRONMENT_FILE = "environment.json"

DAMAGED = "delete {dir} and rerun, or choose another --output-dir"  # what to do about a damaged run directory


@contextmanager
def undone_on_refusal(run_dir: Path | None):
    """A ConfigError in the block (a model refused from its tokenizer, odd strengths) removes what a fresh run wrote
    to `run_dir` (config, environment, timings, vectors), so that the fixed command runs in the same directory;
    None (a resumed run) removes nothing."""
    try:
        yield
    except ConfigError:
        for name in (CONFIG_FILE, MANIFEST_FILE, ENVIRONMENT_FILE, "timings.json", "vectors.safetensors") if run_dir else ():
            (run_dir / name).unlink(missing_ok=True)
        raise


def run_input_files(cfg) -> dict[str, Path]:
    """Every file whose contents a run reads, besides the model: the concepts file, a --device-map file and all files
    shipped in data/."""
    files = {"concepts_file": Path(cfg.concepts_file)} if cfg.concepts_file else {}
    if cfg.device_map is not None and cfg.device_map not in DEVICE_MAP_STRATEGIES:
        files["device_map"] = Path(cfg.device_map)
    files.update({f"data/{p.name}": p for p in sorted(DATA_DIR.iterdir()) if p.is_file()})
    return files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_digest(path: Path) -> str | None:
    """sha256 of a file, or of a folder's files (relative names and contents, in name order); None if absent."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def rows_digest(rows: list[dict]) -> str | None:
    """sha256 of rows as write_jsonl writes them (so rows read back give the same digest); None for no rows."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest() if rows else None


def json_digest(value) -> str | None:
    return None if value is None else hashlib.sha256(
        json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def input_digests(cfg) -> dict[str, str]:
    """sha256 of each input file's contents (run_input_files)."""
    try:
        return {name: sha256_file(path) for name, path in run_input_files(cfg).items()}
    except OSError as e:
        raise ConfigError(f"cannot read input file {e.filename}: {e.strerror or e}") from None


def read_artifact(path: Path, read):
    """read(path), an unreadable (truncated or corrupted) file reported in one line."""
    try:
        return read(path)
    except Exception as e:  # whatever the parser raises on damaged bytes
        raise ConfigError(f"{path.name} in {path.parent} is unreadable ({type(e).__name__}: truncated or modified); "
                          + DAMAGED.format(dir=path.parent)) from None


def read_json(path: Path):
    return json.loads(path.read_text())


def read_object(path: Path) -> dict:
    """A JSON file holding an object (ValueError otherwise)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def read_objects(path: Path) -> list[dict]:
    """A JSON-lines file of objects (ValueError otherwise)."""
    rows = read_jsonl(path)
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("a line is not a JSON object")
    return rows


def read_json_or_none(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def is_temporary(name: str) -> bool:
    """Whether `name` is one of atomic_path's temporaries (".<name>.<8 random characters>.tmp"), left by a killed run."""
    return re.fullmatch(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX), name) is not None


def artifacts_in(run_dir: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Names in a run directory other than the lock, temporaries (is_temporary) and `ignore`."""
    skip = {LOCK_FILE, *ignore}
    return sorted(p.name for p in run_dir.iterdir() if p.name not in skip and not is_temporary(p.name))


def remove_temporaries(folder: Path) -> None:
    """Remove the temporaries a killed run left in `folder`: only once the folder is claimed, with the lock held."""
    for leftover in folder.iterdir():
        if is_temporary(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)


def check_lock_file(path: Path, status: os.stat_result | None = None) -> None:
    """Refuse, in one line, a lock file that is not a plain file of its folder (a symbolic link, a folder, a special
    file, a hard link to another file): it is never followed, written or truncated. An absent one is fine."""
    try:
        status = status or os.lstat(path)
    except FileNotFoundError:
        return
    kind = ("a symbolic link" if stat.S_ISLNK(status.st_mode) else "a directory" if stat.S_ISDIR(status.st_mode)
            else "a special file" if not stat.S_ISREG(status.st_mode)
            else "a file with other hard links" if status.st_nlink != 1 else None)
    if kind:
        raise ConfigError(f"{path} is {kind}, not a lock file of this run; it is left as it is: remove it or choose "
                          "another --output-dir")


def check_folder(folder: Path) -> bool:
    """Whether `folder` exists; refused in one line if it is not a directory or its lock file is not a plain file."""
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise ConfigError(f"--output-dir {folder} is not a directory; choose another --output-dir")
    check_lock_file(folder / LOCK_FILE)
    return True


@contextmanager
def run_dir_lock(run_dir: Path):
    """Hold an exclusive lock (flock on run_dir/.lock) for the block; a second process gets one line naming the
    holder. The lock file is opened without following a link and must be a plain file of the folder
    (check_lock_file); the holder line is written only once the lock is held, and emptied when it is released."""
    import fcntl
    import socket
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        check_lock_file(path)  # a link or a folder: named as such
        raise ConfigError(f"cannot open the lock file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "r+") as handle:
        check_lock_file(path, os.fstat(fd))
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"{run_dir} is in use by {holder}; wait for it to finish or choose another "
                              "--output-dir") from None
        try:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


class Manifest:
    """manifest.json of a run directory: each finished artifact (a file, a folder, or one part of a file such as one
    evaluation's rows) with its sha256 and the hash of the inputs it was made from, and the stage times. An entry is
    written after its artifact, so an artifact without one is from a run that stopped before recording it."""

    def __init__(self, run_dir: Path, input_hash: str, artifacts: dict | None = None, timings: dict | None = None):
        self.dir, self.input_hash = run_dir, input_hash
        self.artifacts, self.timings = artifacts or {}, timings or {}

    @classmethod
    def open(cls, run_dir: Path, input_hash: str) -> Manifest:
        """The saved manifest of a claimed run directory (a new one if the directory holds no artifacts)."""
        path = run_dir / MANIFEST_FILE
        if not path.exists():
            if leftovers := artifacts_in(run_dir, ignore=(CONFIG_FILE,)):
                raise ConfigError(f"{run_dir} holds {', '.join(leftovers)} but no {MANIFEST_FILE} to verify them (made "
                                  "by an older version, or the manifest was deleted); " + DAMAGED.format(dir=run_dir))
            return cls(run_dir, input_hash).save()
        data = read_artifact(path, read_json)
        if not (isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("artifacts", "timings"))):
            raise ConfigError(f"{path} is not a manifest (no artifacts/timings); " + DAMAGED.format(dir=run_dir))
        manifest = cls(run_dir, input_hash, data["artifacts"], data["timings"])
        for name in manifest.artifacts:  # whole files and folders now; parts of a file when it is read (verify_parts)
            if "[" not in name:
                manifest.reusable_file(name)
        return manifest

    def save(self) -> Manifest:
        write_json(self.dir / MANIFEST_FILE, {"input_hash": self.input_hash, "artifacts": self.artifacts,
                                              "timings": self.timings})
        return self

    def reusable(self, name: str, digest: str | None) -> bool:
        """Whether the artifact `name`, whose current sha256 is `digest` (None: absent), is finished and intact.
        False means compute it; a damaged or foreign artifact is refused in one line."""
        entry = self.artifacts.get(name)
        if digest is None and entry is None:
            return False
        if entry is None:
            log.info("%s in %s has no manifest entry (its run stopped before recording it): recomputing that stage",
                     name, self.dir)
            return False
        if digest is None:
            raise ConfigError(f"{name} is recorded in {MANIFEST_FILE} but missing from {self.dir}; "
                              + DAMAGED.format(dir=self.dir))
        if entry.get("inputs") != self.input_hash:
            raise ConfigError(f"{name} in {self.dir} was made from other inputs than this run's (input hash "
                              f"{str(entry.get('inputs'))[:8]} in the manifest, {self.input_hash[:8]} now); "
                              + DAMAGED.format(dir=self.dir))
        if entry.get("sha256") != digest:
            raise ConfigError(f"{name} in {self.dir} does not match its checksum in {MANIFEST_FILE} (truncated or "
                              "modified after it was written); " + DAMAGED.format(dir=self.dir))
        return True

    def record(self, name: str, digest: str) -> None:
        self.artifacts[name] = {"sha256": digest, "inputs": self.input_hash}
        self.save()

    def verify_parts(self, file: str, digests: dict[str, str]) -> None:
        """Check every recorded part of `file` ("file[part]") against `digests`, the digest of each part it holds."""
        for name in self.artifacts:
            if name.startswith(file + "["):
                self.reusable(name, digests.get(name))

    def reusable_file(self, name: str) -> bool:
        return self.reusable(name, artifact_digest(self.dir / name))

    def record_file(self, name: str) -> None:
        self.record(name, artifact_digest(self.dir / name))


def saved_run_diff(saved, cfg, record: dict) -> list[str]:
    """What differs between a run directory's config.json and this run's record (resolved config fields, input file
    contents)."""
    diff = config_diff(saved["config"], cfg)
    if not isinstance(saved.get("inputs"), dict):
        return diff + ["input contents not recorded (a run of an older version)"]
    inputs, current = saved["inputs"], record["inputs"]
    return diff + [f"contents of {k}" for k in sorted(inputs.keys() | current.keys())
                   if inputs.get(k) != current.get(k)]


def code_files() -> list[Path]:
    """The code a run executes, besides the installed packages: the script and the machinery package's modules."""
    return [DATA_DIR.parent / "introspection_experiment.py", *sorted(Path(__file__).resolve().parent.glob("*.py"))]


def code_hash() -> str:
    """sha256 of the code (code_files: each file's name and contents): the version of the code that made a run."""
    listing = "".join(f"{path.name}\0{sha256_file(path)}\n" for path in code_files())
    return hashlib.sha256(listing.encode()).hexdigest()


def run_record(cfg) -> dict:
    """config.json's content: the resolved config, the sha256 of each input file and the code hash (code_hash)."""
    return {"config": dataclasses.asdict(cfg), "inputs": input_digests(cfg), "code": code_hash()}


def check_run_dir(run_dir: Path, cfg) -> bool:
    """Without writing anything: True if run_dir holds this config's run (config.json matches: the resolved config,
    the input contents and the code hash), False if it is absent or empty (nothing but a lock file and temporaries of a killed run).
    Anything else is refused in one line: another config's run, or files that no matching config.json vouches for
    (another run's adapter/, a repository folder)."""
    if not check_folder(run_dir):
        return False
    path = run_dir / CONFIG_FILE
    if path.exists():
        saved = read_artifact(path, read_json)
        if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)):
            raise ConfigError(f"{path} is not a run config (no 'config' object); " + DAMAGED.format(dir=run_dir))
        record = run_record(cfg)
        if diff := saved_run_diff(saved, cfg, record):
            raise ConfigError(f"{run_dir} holds a run with a different config ({', '.join(diff)}); "
                              "choose another --output-dir")
        if saved.get("code") != record["code"]:
            made = f"code hash {saved['code'][:12]}" if isinstance(saved.get("code"), str) else "no code hash"
            raise ConfigError(f"{run_dir} holds a run made by other code ({made} in {CONFIG_FILE}, {record['code'][:12]} "
                              "now: the script or machinery/ changed), which a resume would mix with this code's "
                              "results; choose another --output-dir, or delete it to rerun")
        return True
    if leftovers := artifacts_in(run_dir):
        raise ConfigError(f"{run_dir} holds {', '.join(leftovers)} but no {CONFIG_FILE}: they cannot be matched to "
                          "a config, so they are not reused; choose another --output-dir (or empty it)")
    return False


def claim_run_dir(run_dir: Path, cfg) -> Manifest:
    """Before any stage, with the lock held: check_run_dir again (another process may have written since), then, the
    folder being this run's, remove temporaries of a killed run; open its manifest, or, in an empty folder, write
    config.json (then a new manifest: a config without a manifest is resumed as a run with no artifacts)."""
    input_hash = config_hash(cfg, length=64)
    resume = check_run_dir(run_dir, cfg)
    remove_temporaries(run_dir)
    if resume:
        return Manifest.open(run_dir, input_hash)
    write_json(run_dir / CONFIG_FILE, run_record(cfg))
    return Manifest(run_dir, input_hash).save()


SEEDS_FILES = ("seeds.json", "seeds.md")


def check_seeds_dir(base: Path) -> None:
    """Without writing anything: refuse, in one line, a --seeds folder that holds anything but seed-N folders, the
    seeds summary (SEEDS_FILES), a lock file and temporaries of a killed run (each seed-N folder is checked as a run
    directory when its seed runs)."""
    if not check_folder(base):
        return
    foreign = [name for name in artifacts_in(base, ignore=SEEDS_FILES)
               if not (re.fullmatch(r"seed-\d+", name) and (base / name).is_dir())]
    if foreign:
        raise ConfigError(f"{base} holds {', '.join(foreign)}: not a --seeds folder (seed-N folders and "
                          f"{', '.join(SEEDS_FILES)} only); choose another --output-dir")


def claim_seeds_dir(base: Path) -> None:
    """With the lock held: check_seeds_dir again, then remove temporaries of a killed run."""
    check_seeds_dir(base)
    remove_temporaries(base)


def trials_part(experiment: str, state: str) -> str:
    """The manifest name of one evaluation's rows in trials.jsonl."""
    return f"trials.jsonl[{experiment}/{state}]"


def row_part(row: dict) -> str:
    return trials_part(row.get("experiment"), row.get("state"))


def replaced_part(trials: list[dict], name: str, rows: list[dict]) -> list[dict]:
    """`trials` with the rows of evaluation `name` replaced by `rows` in their place (appended if it had none), so a
    recomputed evaluation leaves trials.jsonl in the order of an uninterrupted run."""
    at = next((i for i, t in enumerate(trials) if row_part(t) == name), len(trials))
    kept = [t for t in trials if row_part(t) != name]
    return kept[:at] + rows + kept[at:]


def trial_part_digests(trials: list[dict]) -> dict[str, str]:
    """The digest of each evaluation's rows in `trials`, by manifest name (trials_part)."""
    groups: dict[str, list[dict]] = {}
    for row in trials:
        groups.setdefault(row_part(row), []).append(row)
    return {name: rows_digest(rows) for name, rows in groups.items()}


def capability_part(state: str) -> str:
    return f"capability.json[{state}]"


def run_status(manifest: Manifest, complete: bool) -> dict:
    """The completion mark of metrics.json: complete, or partial, with the finished artifacts."""
    return {"status": "complete" if complete else "partial", "stages_done": list(manifest.artifacts)}


def require_complete(metrics, source) -> dict:
    """A run's metrics, refused in one line unless the run finished (status complete). Metrics written before runs
    carried a status are accepted with a warning."""
    if not (isinstance(metrics, dict) and isinstance(metrics.get("results"), dict) and "settings" in metrics):
        raise ConfigError(f"{source} is not a run's metrics (no results or settings)")
    status = metrics.get("status")
    if status is None:
        log.warning("%s has no completion mark (written before runs recorded one): assuming it is complete", source)
    elif status != "complete":
        done = ", ".join(metrics.get("stages_done") or []) or "nothing"
        raise ConfigError(f"{source} is from a run that did not finish (status {status}; done: {done}); rerun the "
                          "same command to finish it")
    return metrics


def read_finished_trials(path: Path) -> list[dict]:
    """A finished run's trials.jsonl for a reader (paper/tables.py), checked as a resumed run checks it: each
    evaluation recorded in the manifest.json beside it must be there with the rows it recorded (one ConfigError line
    otherwise). A folder without a manifest (a run copied without it, such as figures/) is read unchecked."""
    trials = read_artifact(path, read_objects)
    manifest_path = path.with_name(MANIFEST_FILE)
    if manifest_path.exists():
        data = read_artifact(manifest_path, read_object)
        if not isinstance(data.get("artifacts"), dict):
            raise ConfigError(f"{manifest_path} is not a manifest (no artifacts); " + DAMAGED.format(dir=path.parent))
        manifest = Manifest(path.parent, data.get("input_hash"), data["artifacts"])
        manifest.verify_parts(path.name, trial_part_digests(trials))
    return trials


def finished_metrics(run_dir: Path, cfg) -> dict | None:
    """The metrics of a finished run of exactly this config and these input contents in run_dir, or None (absent,
    another config, or not finished: the caller resumes it)."""
    saved, metrics = read_json_or_none(run_dir / CONFIG_FILE), read_json_or_none(run_dir / "metrics.json")
    same = isinstance(saved, dict) and isinstance(saved.get("config"), dict) and not config_diff(saved["config"], cfg)
    if not same or saved.get("inputs") != input_digests(cfg) or not isinstance(metrics, dict):
        return None
    if metrics.get("status") != "complete":
        log.info("%s did not finish (status %s): resuming it", run_dir, metrics.get("status"))
        return None
    return metrics


def environment() -> dict:
    """The software and hardware a run executes on (environment.json)."""
    import importlib.metadata as md
    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "gguf", "numpy", "matplotlib",
                "safetensors", "tqdm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "processor": processor(),
            "packages": versions, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads()}


# the CPU features that decide which bf16/fp32 kernels run on the CPU: results are byte-comparable only between
# processors with the same ones (and the same packages)
KERNEL_ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
              "amx_int8")


def processor() -> dict:
    """The CPU: its model name (/proc/cpuinfo, else platform.processor()), architecture, which of KERNEL_ISA it has,
    and the vector capability torch's CPU kernels use."""
    model, flags = None, set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model or platform.processor() or None, "machine": platform.machine(),
            "isa": [f for f in KERNEL_ISA if f in flags], "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def record_environment(run_dir: Path, fresh: bool) -> None:
    """environment.json keeps the environment that produced the run: written when the run starts `fresh`, never
    rewritten on resume. A resume in another environment writes it to environment_resume.json and logs the fields
    that differ (another processor kind: bf16 results are not byte-comparable)."""
    current = environment()
    if fresh:
        write_json(run_dir / ENVIRONMENT_FILE, current)
        return
    saved = read_json_or_none(run_dir / ENVIRONMENT_FILE)
    if saved != current:
        changed = sorted(k for k in current if not isinstance(saved, dict) or saved.get(k) != current[k])
        log.info("Resuming in another environment than %s's (%s): recorded in environment_resume.json",
                 ENVIRONMENT_FILE, ", ".join(changed))
        write_json(run_dir / "environment_resume.json", current)


def synchronize_gpus() -> None:
    """Wait for the work queued on every GPU (a split model runs on several); nothing without CUDA."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def reset_gpu_peaks() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def peak_gpu_gib() -> float:
    """The highest peak of allocated memory of any GPU since reset_gpu_peaks, in GiB (a split model's fullest GPU)."""
    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30


class Timer:
    """Seconds (and, on CUDA, peak GPU memory: the fullest GPU's) per stage, kept in the run's manifest (timings.json is a copy) so a
    resumed run still reports the original stage times. CUDA work is synchronised at the stage boundaries so that the
    times are real."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path, self.manifest, self.times = path, manifest, manifest.timings
        if read_json_or_none(path) != self.times and (self.times or path.exists()):
            log.info("%s did not match the stage times in %s: rewritten from them", path, MANIFEST_FILE)
            write_json(path, self.times)

    @contextmanager
    def stage(self, name: str):
        cuda = torch.cuda.is_available()
        if cuda:
            synchronize_gpus()
            reset_gpu_peaks()
        start = time.perf_counter()
        yield
        if cuda:
            synchronize_gpus()
            self.times[f"{name}_peak_gib"] = round(peak_gpu_gib(), 2)
        self.times[name] = round(time.perf_counter() - start, 3)
        self.manifest.save()
        write_json(self.path, self.times)


class RunState:
    """A run's directory and what the run has produced so far: the stage timer, the trials (trials.jsonl) and the
    capability measurements (capability.json). Each evaluation and each measurement runs once; a resumed run loads
    them instead."""

    def __init__(self, run_dir: Path, manifest: Manifest):
        self.run_dir, self.manifest = run_dir, manifest
        self.timer = Timer(self.run_dir / "timings.json", manifest)
        self.trials_path, self.capability_path = self.run_dir / "trials.jsonl", self.run_dir / "capability.json"
        self.trials = read_artifact(self.trials_path, read_objects) if self.trials_path.exists() else []
        self.capability = read_artifact(self.capability_path, read_object) if self.capability_path.exists() else {}
        manifest.verify_parts(self.trials_path.name, trial_part_digests(self.trials))
        manifest.verify_parts(self.capability_path.name,
                              {capability_part(k): json_digest(v) for k, v in self.capability.items()})

    def evaluate_once(self, experiment: str, state: str, produce) -> None:
        """Run one (experiment, model state) evaluation, produce() -> trial records, unless trials.jsonl holds all its
        rows as the manifest recorded them."""
        name = trials_part(experiment, state)
        if self.manifest.reusable(name, trial_part_digests(self.trials).get(name)):
            log.info("Loaded %s evaluation of %s from %s", experiment, state, self.trials_path)
            return
        with self.timer.stage(f"eval_{experiment}_{state}"):
            rows = produce()
            self.trials = replaced_part(self.trials, name, rows)
            write_jsonl(self.trials_path, self.trials)
        self.manifest.record(name, rows_digest(rows))

    def measure_once(self, state: str, produce) -> None:
        """One model state's capability measurement, produce() -> a JSON object, unless capability.json holds it as
        the manifest recorded it."""
        name = capability_part(state)
        if not self.manifest.reusable(name, json_digest(self.capability.get(state))):
            with self.timer.stage(f"capability_{state}"):
                self.capability[state] = produce()
            write_json(self.capability_path, self.capability)
            self.manifest.record(name, json_digest(self.capability[state]))

    def trials_of(self, experiment: str) -> list[dict]:
        return [t for t in self.trials if t["experiment"] == experiment]


def load_or_build_dataset(path: Path, build, manifest: Manifest):
    """The dataset saved at `path` (if its manifest entry matches), or build() saved there atomically."""
    from datasets import load_from_disk
    if manifest.reusable_file(path.name):
        return load_from_disk(str(path))
    dataset = build()
    with atomic_path(path) as tmp:
        dataset.save_to_disk(str(tmp))
    manifest.record_file(path.name)
    return dataset


def load_or_train_adapter(model, path: Path, timer: Timer, stage: str, train, manifest: Manifest):
    """The adapter saved at `path` loaded onto `model` (no retraining; adapter and loss log as in the manifest), or
    train() saved there with its loss log."""
    from peft import PeftModel
    loss_path = path.with_name(path.name + "_train_log.json")
    if all([manifest.reusable_file(path.name), manifest.reusable_file(loss_path.name)]):  # both checked

        log.info("Loaded adapter from %s (no retraining)", path)
        return PeftModel.from_pretrained(model, str(path)).eval(), json.loads(loss_path.read_text())
    with timer.stage(stage):
        peft_model, losses = train()
    with atomic_path(path) as tmp:
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
    write_json(loss_path, losses)
    manifest.record_file(loss_path.name)
    manifest.record_file(path.name)
    log.info("Trained %d optimizer steps; final loss %.4f; saved %s", len(losses), losses[-1]["loss"], path)
    return peft_model, losses


def to_dataset(rows: list[dict]):
    """A datasets.Dataset whose fingerprint is a hash of its rows (datasets would otherwise pickle the table)."""
    import pyarrow as pa
    from datasets import Dataset
    return Dataset(pa.Table.from_pylist(rows), fingerprint=hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16])


def save_vectors(path: Path, vectors: dict[str, torch.Tensor], baseline_mean: torch.Tensor, meta: dict) -> None:
    """Concept vectors (in meta["concepts"] order), the baseline mean and their metadata as one safetensors file."""
    from safetensors.torch import save_file
    tensors = {"vectors": torch.stack([vectors[w] for w in meta["concepts"]]).contiguous(),
               "baseline_mean": baseline_mean.contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})


def load_vectors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """save_vectors' file: {concept: vector} and the metadata."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        stacked = f.get_tensor("vectors")
    return {w: stacked[i] for i, w in enumerate(meta["concepts"])}, meta
