"""LocalDatastore over study files: validates uploads and labels so that nothing unusable gets in."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator

from fastapi import HTTPException
from monailabel.config import settings
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.activelearning.strategies import check_strategy_info
from lib.errors import http_errors
from lib.study_support import FLAG_KEYS, study_flags
from parotid import safe_read
from parotid.cohort import split_image_name
from parotid.label_validation import check_label_info, validate_label
from parotid.labels import INFO_ROI
from parotid.study import read_study

logger = logging.getLogger(__name__)
ARCHIVE_DIR = ".archive"  # replaced studies, their labels and index entries; the datastore never reads it


class StudyDatastore(LocalDatastore):
    """Each image is one multi-sequence study file; its sequences are recorded in the image info."""

    def __init__(self, studies: str, **kwargs):
        # LocalDatastore's reconciliation iterates the index without a lock while its file watcher
        # thread reconciles too ("dictionary changed size during iteration", seen on DELETE). All
        # in-process index access goes through this lock, taken before the cross-process file lock.
        self._index_lock = threading.RLock()
        self._file_lock_depth = 0  # the thread holding _index_lock holds the file lock this many times
        self._index_bytes = b""  # the index file content the in-memory index was read from / written as
        kwargs.setdefault("auto_reload", settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD)  # sees the scoring subprocess' writes
        kwargs.setdefault("read_only", settings.MONAI_LABEL_DATASTORE_READ_ONLY)
        super().__init__(studies, extensions=("*.nii.gz", "*.nii"), **kwargs)
        if getattr(self, "_handler", None) is not None:
            self._handler.on_moved = self._on_moved_event

    # Several processes share the index: `--workers N`, replicas on one study folder, the scoring and
    # training subprocesses. LocalDatastore decides that the file changed by its mtime, which has the
    # kernel's clock-tick granularity: two writes by two processes in one tick left the second process
    # with a stale in-memory index, which its next write put back (a lost label save; reproduced by
    # tests/test_workers.py). And its reconciliation (run by the file watcher on every label file another
    # process writes) re-read and wrote the index under two separate locks, which can put back a stale
    # copy over a save made in between (read in the code; no test provokes that interleaving). Here the index is re-read whenever its bytes differ from the ones this
    # process last read or wrote, and every read-modify-write, reconciliation included, runs under one
    # hold of the file lock.

    @contextmanager
    def _index_file_lock(self) -> Iterator[None]:
        """The in-process lock, then the cross-process file lock, re-entrant (filelock refuses a second
        instance on the same file in one thread)."""
        with self._index_lock:
            if self._file_lock_depth:
                self._file_lock_depth += 1
                try:
                    yield
                finally:
                    self._file_lock_depth -= 1
                return
            with FileLock(self._lock_file):
                self._file_lock_depth = 1
                try:
                    yield
                finally:
                    self._file_lock_depth = 0

    def _load_index_if_changed(self, throw_exception: bool = False) -> None:
        """Caller holds the file lock."""
        try:
            with open(self._datastore_config_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        if data == self._index_bytes:
            return
        try:
            index = LocalDatastoreModel.model_validate_json(data)
        except ValueError as e:
            logger.error(f"+++ Failed to load datastore => {e}")
            if throw_exception:
                raise
            return
        index.base_path = self._datastore_path
        self._datastore, self._index_bytes = index, data
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _reconcile_datastore(self):
        with self._index_file_lock():
            return super()._reconcile_datastore()

    def _init_from_datastore_file(self, throw_exception=False):
        with self._index_file_lock():
            self._load_index_if_changed(throw_exception)

    def _on_moved_event(self, event) -> None:
        """Index, labels and uploads are written here by rename (atomic), which the file watcher reports
        as a move -- an event LocalDatastore does not handle. Without this the server never saw the
        scores the scoring subprocess wrote (found by tests/test_active_learning_loop.py)."""
        if os.path.realpath(event.dest_path) == os.path.realpath(self._datastore_config_path):
            self._init_from_datastore_file()  # reloads only if the file's time stamp is not our own write's
        else:
            self.refresh()

    def _to_id(self, file: str):
        """LocalDatastore's version removes every occurrence of the extension; only the suffix goes here."""
        image_id, ext = split_image_name(file)
        return (image_id, ext) if ext else super()._to_id(file)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any], overwrite: bool = False) -> str:
        """An existing study id is a 409 unless `overwrite`: then the old study file, every label file of
        that id and its index entry (label info included) move to `.archive/<id>/<UTC time>/` in the same
        transaction, and the new study's info says where (`archived`)."""
        with http_errors():  # read in a contained child process: a reader crash is a 422, not a dead server
            checked = safe_read.check_file(image_filename, "study", name=image_id or "upload")
        if not image_id or os.path.basename(image_id) != image_id or image_id.startswith("."):
            raise HTTPException(422, f"invalid study id {image_id!r}")
        _, image_ext = self._to_id(os.path.basename(image_filename))
        name = self._filename(image_id, image_ext)
        sequences = list(checked["sequences"])
        info = {**_as_info(image_info), "sequences": sequences, "ts": int(time.time()), "name": name,
                **study_flags(sequences)}  # models that cannot process this study (lib/study_support.py)
        info.pop("archived", None)
        with self._index_transaction() as index, open(image_filename, "rb") as src:
            if image_id in index.objects or self._files_of(image_id, index)[0]:
                if not overwrite:
                    raise HTTPException(409, f"study '{image_id}' already exists; to replace it (its labels and label "
                                             "info are archived) repeat the upload with overwrite=true (admin role)")
                info["archived"] = self._archive(image_id, index)
            _atomic_write(os.path.join(self._datastore.image_path(), name), src.read())
            index.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
        return image_id

    def _files_of(self, image_id: str, index: LocalDatastoreModel) -> tuple[list[str], list[str]]:
        """The study files and label files (any tag folder, indexed or not) named by `image_id`."""
        exts = [e.replace("*", "") for e in self._extensions]
        images = [os.path.join(index.image_path(), image_id + e) for e in exts]
        root = index.label_path(None)
        tags = [t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))] if os.path.isdir(root) else []
        labels = [os.path.join(root, t, image_id + e) for t in tags for e in exts]
        return [p for p in images if os.path.exists(p)], [p for p in labels if os.path.exists(p)]

    def _archive(self, image_id: str, index: LocalDatastoreModel) -> str:
        """Move a study's files and index entry out of the datastore (caller holds the index transaction);
        returns the archive folder relative to the study folder. The entry is written first, so a crash
        part-way leaves every moved file next to its info."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}"
        rel = os.path.join(ARCHIVE_DIR, image_id, stamp)
        folder = os.path.join(self._datastore_path, rel)
        os.makedirs(folder)
        old = index.objects.pop(image_id, None)
        entry = old.model_dump() if old else {}
        _atomic_write(os.path.join(folder, "entry.json"), json.dumps(entry, indent=2, default=str).encode())
        images, labels = self._files_of(image_id, index)
        for path in labels:
            tag = os.path.basename(os.path.dirname(path))
            os.makedirs(os.path.join(folder, "labels", tag), exist_ok=True)
            os.replace(path, os.path.join(folder, "labels", tag, os.path.basename(path)))
        for path in images:
            os.replace(path, os.path.join(folder, os.path.basename(path)))
        logger.info(f"study '{image_id}' replaced; previous study, {len(labels)} label(s) and info archived in {rel}")
        return rel

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(404, f"unknown study '{image_id}'")
        info = _as_info(label_info)
        with http_errors():
            study = read_study(image_uri, image_id)
            safe_read.check_file(label_filename, "volume", name="label")  # contained first, as for studies
            validate_label(label_filename, study, info)
        return self._save_label_atomically(image_id, label_filename, label_tag or DefaultLabelTag.FINAL, info)

    # LocalDatastore leaves the index update after a delete to the file watcher when auto_reload is on;
    # the watcher can lag or drop the event under load, so a deleted study stayed listed for seconds
    # (seen in CI). Deletes reconcile the index synchronously here, and unknown ids are a 404.

    def remove_image(self, image_id: str) -> None:
        if image_id not in self._datastore.objects:
            raise HTTPException(404, f"unknown study '{image_id}'")
        super().remove_image(image_id)
        self.refresh()

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        """LocalDatastore answers {} for an unknown study or tag; that is a 404 here."""
        obj = self._datastore.objects.get(label_id)
        if not obj:
            raise HTTPException(404, f"unknown study '{label_id}'")
        if label_tag not in obj.labels:
            raise HTTPException(404, f"study '{label_id}' has no label with tag '{label_tag}'")
        return obj.labels[label_tag].info

    def remove_label(self, label_id: str, label_tag: str) -> None:
        obj = self._datastore.objects.get(label_id)
        if not obj or label_tag not in obj.labels:
            raise HTTPException(404, f"study '{label_id}' has no label with tag '{label_tag}'")
        super().remove_label(label_id, label_tag)
        self.refresh()

    # ------------------------------------------------------------------ durability
    # LocalDatastore copies a label straight onto its destination and rewrites datastore_v2.json in
    # place: a crash (kill -9) in either window leaves a truncated label or an unreadable index, and
    # an unreadable index loses every label's info. Both writes are made atomic here (temp file in
    # the same folder, fsync, rename), so an acknowledged label survives a crash at any moment.

    def _save_label_atomically(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        _, label_ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, label_ext)
        with self._index_transaction() as index:
            obj = index.objects.get(image_id)
            if not obj:
                raise HTTPException(404, f"unknown study '{image_id}'")
            label_path = index.label_path(label_tag)
            os.makedirs(label_path, exist_ok=True)
            with open(label_filename, "rb") as src:
                _atomic_write(os.path.join(label_path, name), src.read())
            obj.labels[label_tag] = DataModel(info={**label_info, "ts": int(time.time()), "name": name}, ext=label_ext)
        return image_id

    # Two processes write the index: the server and MONAI Label's scoring subprocess (which stores
    # uncertainty scores in image info). LocalDatastore writes its own in-memory copy, so a write from
    # a stale copy silently dropped the other process's changes -- e.g. the tumor_class and roi of a
    # label saved while scoring ran. Every index change here is a read-modify-write under the file lock.

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        info = _as_info(info)
        if set(info) & _SERVER_IMAGE_KEYS:
            raise HTTPException(422, f"image info keys {sorted(set(info) & _SERVER_IMAGE_KEYS)} are set by the server")
        with http_errors():
            check_strategy_info(info)  # active learning's served-time record must stay readable
        with self._index_transaction() as index:
            obj = index.objects.get(image_id)
            if not obj:
                raise HTTPException(404, f"unknown study '{image_id}'")
            obj.image.info.update(info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        """Same rules as a label save: tumor_class from the label set, roi inside the study."""
        info = _as_info(info)
        if set(info) & _SERVER_LABEL_KEYS:
            raise HTTPException(422, f"label info keys {sorted(set(info) & _SERVER_LABEL_KEYS)} are set by the server")
        obj = self._datastore.objects.get(label_id)
        if not obj or label_tag not in obj.labels:
            raise HTTPException(404, f"study '{label_id}' has no label with tag '{label_tag}'")
        with http_errors():  # the study is read only when there is a box to check against its grid
            shape = read_study(self.get_image_uri(label_id), label_id).shape if info.get(INFO_ROI) is not None else None
            check_label_info(info, shape)
        with self._index_transaction() as index:
            obj = index.objects.get(label_id)
            if not obj or label_tag not in obj.labels:
                raise HTTPException(404, f"study '{label_id}' has no label with tag '{label_tag}'")
            obj.labels[label_tag].info.update(info)

    @contextmanager
    def _index_transaction(self) -> Iterator[LocalDatastoreModel]:
        """Lock, re-read the index if another process changed it, let the caller change it, write it."""
        with self._index_file_lock():
            self._load_index_if_changed(throw_exception=True)
            yield self._datastore
            self._update_datastore_file()

    def _update_datastore_file(self, lock=True):
        """Write the in-memory index (always under the file lock; `lock` is LocalDatastore's signature)."""
        with self._index_file_lock():
            self._ignore_event_config = True
            data = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str).encode()
            _atomic_write(self._datastore_config_path, data)
            self._index_bytes = data
            self._config_ts = os.stat(self._datastore_config_path).st_mtime


_SERVER_IMAGE_KEYS = {"name", "ts", "sequences", "archived", *FLAG_KEYS}  # file name, upload time, sequences, replaced study, model flags
_SERVER_LABEL_KEYS = {"name", "ts"}


def _as_info(info: Any) -> Dict[str, Any]:
    """Image/label info must be a JSON object (it reaches us from the `params` / `info` form fields)."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise HTTPException(422, f"info/params must be a JSON object, got {type(info).__name__}")
    return dict(info)


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)
