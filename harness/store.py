"""The results store: `results/<profile>/<method>/<sequence>/seed<s>/`.

A run folder holds `config.json`, one folder per stage (`stage_00-base` is the untrained model,
`stage_01-<task>` ... the stages), `accuracy_matrix.csv` and `summary.json`. Every file is written to
a temporary name and renamed; a stage folder is built under a temporary name and renamed when
complete, so a folder with a final name is always complete. Its metrics.json, written last, holds
the SHA-256 of every other file in the folder: a stage whose files were damaged afterwards (a
truncated copy, a disk error) fails the check and is trained again, never read as a result.
Nothing here is ever unpickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import faults
from harness.errors import HarnessError

if TYPE_CHECKING:  # torch is imported where tensors are read or written: `status`, `table` and
    import torch   # `report` read none

STAGE_FILES = ("metrics.json", "predictions.jsonl")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, each in memory of its own. `load_file`'s share one buffer, at
    addresses aligned to as little as 4 bytes, and LAPACK takes other code paths for those than for
    a computed tensor's memory: on some CPUs (AVX2) InfLoRA's SVDs of a reloaded memory differed
    bitwise, and a resumed run with them. A method's state is read with this; model weights are
    copied into the parameters anyway."""
    from safetensors.torch import load_file

    return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_is_intact(folder: Path, verify: bool = True) -> bool:
    """The stage's files are all there and match the checksums its metrics.json recorded (stages
    written before checksums existed, or imported ones, have none and pass on their files).
    `verify=False`: the recorded files are there, their contents unread (a stage of a large model
    holds gigabytes: what a resuming run checks, a look at the folder need not)."""
    if not folder.is_dir() or not all((folder / f).exists() for f in STAGE_FILES):
        return False
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        recorded = metrics.get("files", {}) if isinstance(metrics, dict) else None
        if recorded is None:
            return False
        return all((folder / name).is_file() and (not verify or sha256(folder / name) == digest)
                   for name, digest in recorded.items())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def out_of_space(error: BaseException) -> bool:
    """Whether `error` is a write that found the disk (or the quota) full: an OSError, or
    safetensors' own error, which carries the OS error's number only in its message."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(error).__name__ == "SafetensorError" and any(
        f"(os error {n})" in str(error) for n in (errno.ENOSPC, errno.EDQUOT))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HarnessError(f"{path}: unreadable result file: {exc}") from exc


def config_fingerprint(config: dict[str, Any], by_folder: bool = False) -> str:
    """The hash that names a run's configuration (`fingerprint` and `versions` aside). Its data is
    named by content (the benchmark's `data` digest), so that a run folder moved to a machine
    that mounts the data elsewhere resumes there; `by_folder` names it by `data_dir` instead, as
    runs recorded before the digest did."""
    left_out = "data" if by_folder else "data_dir"
    named = {key: value for key, value in config.items() if key not in ("fingerprint", "versions")}
    named["benchmark"] = {k: v for k, v in config["benchmark"].items() if k != left_out}
    return hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:16]


DELTAS = "deltas.safetensors"
LOCK = ".lock"


@dataclass(frozen=True)
class RunSpec:
    """What names a run: its folder is `<results>/<profile>/<method>/<sequence>/seed<s>/`
    (`seed<s>-tuned/` for a run with the settings `harness tune` chose, so the two can share a
    results folder and a table)."""

    method: str
    tasks: tuple[str, ...]
    seed: int
    profile: str
    order: int | None = None          # None for a custom --tasks sequence

    @property
    def sequence_name(self) -> str:
        if self.order is not None:
            return f"order{self.order}"
        return "tasks-" + "+".join(self.tasks)

    def folder(self, results: Path, tuned: bool = False) -> Path:
        return (Path(results) / self.profile / self.method / self.sequence_name /
                f"seed{self.seed}{'-tuned' if tuned else ''}")


def stage_name(stage: int, task: str) -> str:
    return f"stage_{stage:02d}-{task}"


@dataclass
class RunDir:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def is_complete(self) -> bool:
        return self.summary_path.exists()

    def recorded_fingerprint(self) -> str | None:
        """The fingerprint config.json records; None without a readable one (`check_config`
        refuses a torn one unless --force replaces the run)."""
        try:
            found = read_json(self.config_path) if self.config_path.exists() else None
        except HarnessError:
            return None
        return found.get("fingerprint") if isinstance(found, dict) else None

    def locked(self) -> bool:
        """Whether a process holds the folder's lock, as a runner does while it works on the run
        (the OS releases it when the process dies)."""
        lock = self.path / LOCK
        if not lock.exists():
            return False
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse to mix results of two different configurations in one folder."""
        if not self.config_path.exists():
            return
        found = read_json(self.config_path)
        if found.get("fingerprint") != config["fingerprint"]:
            raise HarnessError(
                f"{self.config_path}: this run folder holds results of another configuration "
                f"(fingerprint {found.get('fingerprint')} != {config['fingerprint']}); "
                "use another --results folder or remove it")

    def remove_leftovers(self) -> None:
        """Temporary files and stage folders of a process that was killed mid-write."""
        for tmp in self.path.glob(".*"):
            if tmp.name == LOCK:  # held by this process (runner): removing it would void the lock
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    def stage_folders(self, verify: bool = True) -> list[Path]:
        """Every intact stage folder (all files present and, with `verify`, matching their
        checksums), in order, gaps included (an imported run may lack stages)."""
        return [folder for folder in sorted(self.path.glob("stage_[0-9][0-9]-*"))
                if stage_is_intact(folder, verify)]

    def completed_stages(self, verify: bool = True) -> list[Path]:
        """The complete stage folders from stage 0 up to the first gap or damaged stage: what a
        resumed run keeps (that stage and the ones after it are run again)."""
        complete, done = set(self.stage_folders(verify)), []
        for i, folder in enumerate(sorted(self.path.glob("stage_[0-9][0-9]-*"))):
            if folder not in complete or not folder.name.startswith(f"stage_{i:02d}-"):
                break
            done.append(folder)
        return done

    def write_stage(self, name: str, metrics: dict, predictions: list[dict],
                    checkpoint: dict[str, torch.Tensor] | None = None,
                    method_state: dict[str, Any] | None = None,
                    deltas: dict[str, torch.Tensor] | None = None) -> Path:
        """Build the stage folder under a temporary name, then rename it into place. `deltas`
        (the stage's weight updates, methods.deltas) stay with the stage; the checkpoint does
        not outlive the next stage."""
        import torch
        from safetensors.torch import save_file

        final = self.path / name
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f".{name}."))
        try:
            with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as fh:
                for rec in predictions:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if checkpoint is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in checkpoint.items()},
                          str(tmp / "model.safetensors"))
            if deltas:
                save_file({k: v.detach().contiguous().cpu() for k, v in deltas.items()},
                          str(tmp / DELTAS))
            if method_state is not None:
                tensors = {k: v for k, v in method_state.items() if isinstance(v, torch.Tensor)}
                plain = {k: v for k, v in method_state.items() if not isinstance(v, torch.Tensor)}
                if tensors:
                    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                              str(tmp / "method_state.safetensors"))
                (tmp / "method_state.json").write_text(json.dumps(plain, indent=2))
            files = {f.name: sha256(f) for f in sorted(tmp.iterdir())}
            (tmp / "metrics.json").write_text(json.dumps({**metrics, "files": files}, indent=2))
            tmp.chmod(0o755)  # mkdtemp makes it private; results are meant to be shared
            faults.point("stage_write")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @staticmethod
    def load_checkpoint(stage_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        model = load_file(str(stage_dir / "model.safetensors"))
        state: dict[str, Any] = json.loads((stage_dir / "method_state.json").read_text())
        if (stage_dir / "method_state.safetensors").exists():
            state.update(read_tensors(stage_dir / "method_state.safetensors"))
        return model, state

    @staticmethod
    def drop_checkpoint(stage_dir: Path) -> None:
        """Only the latest stage's checkpoint is needed to resume; earlier ones are removed."""
        names = ("model.safetensors", "method_state.safetensors", "method_state.json")
        metrics_path = stage_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        if any(n in metrics.get("files", {}) for n in names):  # keep the checksums true
            metrics["files"] = {k: v for k, v in metrics["files"].items() if k not in names}
            write_atomic(metrics_path, json.dumps(metrics, indent=2))
        for name in names:
            (stage_dir / name).unlink(missing_ok=True)


FAILED = "failed.json"   # the error a run stopped with (`record_failure`)
STAGES = "stages.json"   # the labels of the stages a run trains, written when it starts


def record_failure(folder: Path, error: BaseException) -> None:
    """Keep the error a run stopped with (the next attempt at the run clears it). Best effort: on
    a full disk the record cannot be written, and the error itself says why the run stopped."""
    lines = traceback.format_exception(error)
    try:
        write_atomic(folder / FAILED, json.dumps({"error": f"{type(error).__name__}: {error}",
                                                  "traceback": "".join(lines)}, indent=1) + "\n")
    except OSError:
        pass
