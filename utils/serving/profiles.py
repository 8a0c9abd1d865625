"""Product profiles: a product's normal reference images, its settings and the reference memory
built from them, kept on disk under one folder so that a line keeps them across restarts
(docs/app.md, "Product profiles").

    profiles = Profiles(Path("results/app/profiles"))  # first recovers what a killed run left
    profiles.save("bracket-7", [(path, "good_1.png"), ...], settings, memory, key)
    profile = profiles.read("bracket-7")              # its settings and reference images
    memory = profiles.memory(profile, key, device)    # the cached memory, None if not this model's
    profiles.list(); profiles.delete("bracket-7")

On disk, a profile is one folder::

    <folder>/.lock                              held while anything below is written or recovered
    <folder>/<name>/profile.json                its settings (threshold, scoring, fusion, coreset,
                                                tile, ...), when it was made, its references' names
    <folder>/<name>/references/00000.png ...    the reference images as they were given
    <folder>/<name>/memory-<key>.safetensors    the reference memory built by the model and
                                                tiling ``key`` (``model_key``, then the tiling
                                                when tiled), one tensor per tapped layer

A profile is written whole in ``.new-<name>-<id>/`` and renamed into place; one that it replaces
is first renamed aside to ``.old-<name>-<id>/`` and removed once the new one is in place; a
deleted one is renamed to ``.del-<name>-<id>/`` before it is removed. So a kill at any moment
leaves the old profile or the new one: the next start removes a half-written profile, puts back
an old one whose replacement never arrived and removes one that was replaced, and says so.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from utils.errors import OutputError, UsageError
from utils.serving.errors import LimitError, NotFound

__all__ = ["ProfileLimits", "Profile", "Profiles", "check_name", "model_key"]

log = logging.getLogger("vcp.profiles")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SETTINGS = "profile.json"
SUMMARY = ("name", "made", "references", "reference_names", "threshold", "scoring", "fusion",
           "tile")  # the keys of profile.json a listing shows as they are
INTERNAL = ("reference_files", "version")  # and those it leaves out
REFERENCES = "references"
MiB = 2 ** 20


def check_name(name: str) -> str:
    """``name`` when it can name a profile: 1 to 64 letters, digits, ``-`` or ``_``."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(str(name)[:40] + ("..." if len(str(name)) > 40 else ""))
        raise UsageError(f"profile name {shown}: expected 1 to 64 letters, digits, '-' or '_'",
                         option="profile")
    return name


def model_key(runtime) -> str:
    """A key of what a reference memory depends on: every weight of the model (hashed, about
    1.5 s a GiB on a CPU core), its config, the precision and the device type. A memory cached
    under another key is not used."""
    model = runtime.model
    h = hashlib.sha256(json.dumps([model.cfg.to_dict(), runtime.precision,
                                   runtime.device.type], default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class ProfileLimits:
    """What the profiles of one folder may hold."""

    profiles: int = 100
    references: int = 200  # reference images of one profile
    disk_bytes: int = 4096 * MiB  # every profile's images and cached memory


@dataclass(frozen=True)
class Profile:
    """One profile as read: ``settings`` is its profile.json."""

    name: str
    folder: Path
    settings: dict

    @property
    def references(self) -> list[tuple[Path, str]]:
        """(path, name as it was given) of each reference image."""
        return [(self.folder / REFERENCES / f, n)
                for f, n in zip(self.settings["reference_files"], self.settings["reference_names"])]

    def summary(self) -> dict:
        """What a listing shows: the settings without the file names, the scoring's options
        under ``options``."""
        s = self.settings
        options = {k: v for k, v in s.items() if k not in (*SUMMARY, *INTERNAL)}
        return {**{k: s.get(k) for k in SUMMARY}, "options": options}


class Profiles:
    """The profiles under ``folder`` (made when the first one is saved)."""

    def __init__(self, folder: str | Path, limits: ProfileLimits = ProfileLimits()):
        self.folder, self.limits = Path(folder), limits
        self._thread_lock = threading.RLock()
        if self.folder.is_dir():
            recovered = self.recover()
            if recovered:
                log.warning("profiles in %s: %s (a server was stopped while writing them)",
                            self.folder, "; ".join(recovered))

    # -- reading ------------------------------------------------------------------------------
    def list(self) -> list[dict]:
        """Every profile's summary, by name."""
        with self._locked():
            return [self._read(p.name).summary() for p in self._folders()]

    def read(self, name: str) -> Profile:
        with self._locked():
            return self._read(check_name(name))

    def memory(self, profile: Profile, key: str, device) -> list[torch.Tensor] | None:
        """The reference memory that the model ``key`` built for ``profile``, on ``device``; None
        when there is none (another model's, not yet built, or unreadable). A profile replaced or
        deleted since it was read is an error."""
        path = profile.folder / _memory_file(key)
        with self._locked():
            if self._version(profile.name) != profile.settings["version"]:
                raise UsageError(f"profile {profile.name!r} was replaced or deleted after this "
                                 "job was queued: run it again", option="profile")
            if not path.is_file():
                return None
            try:
                tensors = load_file(path, device=str(device))
            except Exception as e:  # cut short or damaged: built again, and replaced
                log.warning("profile %s: its cached memory cannot be read (%s); building it "
                            "again", profile.name, type(e).__name__)
                return None
        return [tensors[f"layer{k}"] for k in range(len(tensors))]

    def keep_memory(self, profile: Profile, key: str, memory: list[torch.Tensor]) -> None:
        """Cache the memory the model ``key`` built for ``profile`` (replacing another model's),
        unless the profile was replaced or deleted meanwhile."""
        with self._locked():
            if self._version(profile.name) != profile.settings["version"]:
                return
            for old in profile.folder.glob("memory-*.safetensors"):
                old.unlink()
            _write_memory(profile.folder / _memory_file(key), memory)

    # -- writing ------------------------------------------------------------------------------
    def check_room(self, name: str, references: int, size: int) -> None:
        """Refuse, before any work, a profile ``name`` of ``references`` images taking ``size``
        bytes that the limits cannot take."""
        check_name(name)
        with self._locked():
            self._check_room(name, references, size)

    def save(self, name: str, references: list[tuple[Path, str]], settings: dict,
             memory: list[torch.Tensor] | None = None, key: str | None = None) -> dict:
        """Create or replace the profile ``name``: the reference images (path, name as given),
        ``settings`` (JSON), the memory the model ``key`` built from them; its summary."""
        check_name(name)
        with self._locked():
            size = sum(p.stat().st_size for p, _ in references)
            size += sum(t.numel() * t.element_size() for t in memory or ())
            self._check_room(name, len(references), size)
            new = self.folder / f".new-{name}-{uuid.uuid4().hex[:8]}"
            try:
                profile = self._write(new, name, references, settings, memory, key)
                self._swap(new, self.folder / name)
            except OSError as e:  # a full disk, a folder made read-only: the old one stays
                raise OutputError(f"profile {name!r}: cannot write it "
                                  f"({e.strerror or type(e).__name__})") from None
            finally:
                shutil.rmtree(new, ignore_errors=True)
            return Profile(name, self.folder / name, profile).summary()

    def delete(self, name: str) -> None:
        with self._locked():
            self._read(check_name(name))
            aside = self.folder / f".del-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(self.folder / name, aside)
            _sync_folder(self.folder)
            shutil.rmtree(aside)

    def recover(self) -> list[str]:
        """Finish or undo what a killed run left (see the module's docstring); what was done."""
        done = []
        with self._locked():
            for entry in sorted(self.folder.iterdir()):
                match = re.fullmatch(r"\.(new|old|del)-(.+)-[0-9a-f]{8}", entry.name)
                if match is None:
                    for tmp in entry.glob(".*.tmp") if entry.is_dir() else ():
                        tmp.unlink()  # a memory cache cut short
                        done.append(f"removed a half-written memory of {entry.name}")
                    continue
                what, name = match.groups()
                if what == "old" and not (self.folder / name).exists():
                    os.rename(entry, self.folder / name)
                    done.append(f"put back {name}, whose replacement was not finished")
                    continue
                shutil.rmtree(entry)
                done.append({"new": f"removed a half-written {name}",
                             "old": f"removed {name}'s replaced version",
                             "del": f"finished deleting {name}"}[what])
            _sync_folder(self.folder)
        return done

    # -- inside the lock ----------------------------------------------------------------------
    @contextmanager
    def _locked(self):
        """This folder to ourselves: against other threads, and other processes that share it."""
        with self._thread_lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _folders(self) -> list[Path]:
        """The profiles' folders (a folder of another kind, or without settings, is left be)."""
        return sorted(p for p in self.folder.iterdir()
                      if NAME.fullmatch(p.name) and (p / SETTINGS).is_file())

    def _read(self, name: str) -> Profile:
        try:
            settings = json.loads((self.folder / name / SETTINGS).read_text())
        except FileNotFoundError:
            raise NotFound(f"no profile {name!r} on this server") from None
        return Profile(name, self.folder / name, settings)

    def _version(self, name: str) -> str | None:
        try:
            return self._read(name).settings["version"]
        except NotFound:
            return None

    def _size(self, exclude: str) -> int:
        return sum(f.stat().st_size for p in self._folders() if p.name != exclude
                   for f in p.rglob("*") if f.is_file())

    def _check_room(self, name: str, references: int, size: int) -> None:
        limits, names = self.limits, {p.name for p in self._folders()}
        if name not in names and len(names) >= limits.profiles:
            raise LimitError(f"this server keeps at most {limits.profiles} profiles (the profiles "
                             "limit): delete one first")
        if references > limits.references:
            raise LimitError(f"{references} reference images: a profile holds at most "
                             f"{limits.references} (the references-per-profile limit)")
        held = self._size(exclude=name)
        if held + size > limits.disk_bytes:
            raise LimitError(f"this profile needs {size / MiB:.1f} MiB beside the "
                             f"{held / MiB:.1f} MiB that the other profiles hold: more than the "
                             f"profiles' disk limit of {limits.disk_bytes / MiB:.0f} MiB")

    def _write(self, folder: Path, name: str, references, settings: dict, memory,
               key: str | None) -> dict:
        """The whole profile in ``folder``, its settings last; every file synced."""
        (folder / REFERENCES).mkdir(parents=True)
        files = []
        for k, (path, _) in enumerate(references):
            files.append(f"{k:05d}{Path(path).suffix.lower()}")
            shutil.copyfile(path, folder / REFERENCES / files[-1])
            _sync_file(folder / REFERENCES / files[-1])
        if memory is not None:
            _write_memory(folder / _memory_file(key), memory)
        profile = {**settings, "name": name,
                   "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "references": len(files), "reference_names": [n for _, n in references],
                   "reference_files": files, "version": uuid.uuid4().hex}
        (folder / SETTINGS).write_text(json.dumps(profile, indent=1))
        for f in (folder / SETTINGS, folder / REFERENCES, folder):
            _sync_file(f)
        return profile

    def _swap(self, new: Path, target: Path) -> None:
        """``new`` in the place of ``target``, the old one renamed aside first (a kill between
        the renames leaves it aside, where ``recover`` puts it back)."""
        old = None
        if target.exists():
            old = self.folder / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(new, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
            raise
        _sync_folder(self.folder)
        if old is not None:
            shutil.rmtree(old)


def _memory_file(key: str) -> str:
    return f"memory-{key}.safetensors"


def _write_memory(path: Path, memory: list[torch.Tensor]) -> None:
    """One tensor per tapped layer, ``layer<k>``, on the CPU; written aside and renamed."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file({f"layer{k}": t.detach().cpu().contiguous() for k, t in enumerate(memory)}, tmp)
    _sync_file(tmp)
    os.replace(tmp, path)


def _sync_file(path: Path) -> None:
    """Flush a file or folder to the disk (a power cut then keeps what a rename shows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    _sync_file(folder)
