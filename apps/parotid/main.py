"""MONAI Label app: parotid gland + tumour contouring and tumour classification on multi-sequence MRI.

    monailabel start_server --app apps/parotid --studies /data/studies --conf models all --host 127.0.0.1

`--conf models` takes a comma-separated list of config names (see `lib/configs`), or `all`;
`--conf model_dir DIR` reads and trains checkpoints in DIR instead of `<app>/model`.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Dict

import torch
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.class_utils import get_class_names

import lib.configs
import parotid
from parotid import input_check
from lib import http_api
from lib.cors import restrict_cors
from lib.datastore import StudyDatastore
from lib.errors import http_errors
from lib.image_upload import install_image_upload
from lib.infers.classify import MAY_WRITE, STUDY_ID, ClassifyStudy
from lib.infers.segmentation import SegmentStudy, UsesSegmentation
from lib.model_registry_api import install_registry_routes
from lib.model_upload import install_checkpoint_upload_check
from lib.trainers.gated import GatedTrainTask
from lib.offloaded_routes import install_offloaded_routes
from lib.sessions import StudySessions
from lib.single_training import install_single_training
from lib.study_support import skipping_unprocessable
from parotid.labels import classification_label_sets
from parotid.pacs.auth import fix_monailabel_jwt
from parotid.pacs.sr_policy import caller_may_write, install_infer_caller
from parotid.registry import ModelRegistry

fix_monailabel_jwt()  # MONAI Label 0.8.5 + PyJWT 2.x: tokens are decoded without `algorithms` (see docs/pacs.md)

logger = logging.getLogger(__name__)


def discover_configs() -> Dict[str, type]:
    """Every TaskConfig subclass defined in lib/configs, by its `model_name` (or lower-case class name).
    MONAI Label's own discovery (as in its radiology app); its `subclass` filter sees direct bases only,
    and ours derive from a private base per family, hence the issubclass test here."""
    found: Dict[str, type] = {}
    for path in get_class_names(lib.configs):
        module, _, name = path.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        if issubclass(obj, TaskConfig) and not name.startswith("_"):
            found[getattr(obj, "model_name", "") or name.lower()] = obj
    return dict(sorted(found.items()))


class ParotidApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.model_dir = os.path.abspath(conf.get("model_dir") or os.path.join(app_dir, "model"))  # serve.sh: a copy
        configs = discover_configs()
        wanted = conf.get("models", "all")
        names = sorted(configs) if wanted == "all" else [n.strip().lower() for n in wanted.split(",") if n.strip()]
        unknown = [n for n in names if n not in configs]
        if unknown:
            raise ValueError(f"unknown model config(s) {unknown}; available: {sorted(configs)} or 'all'")
        self.planner = None
        self.models: Dict[str, TaskConfig] = {}
        for n in names:
            c = configs[n]()
            c.init(n, self.model_dir, conf, self.planner)
            self.models[n] = c
        logger.info(f"+++ using models: {list(self.models)}")
        super().__init__(
            app_dir=app_dir, studies=studies, conf=conf, name="Parotid MRI",
            description="Parotid gland and tumour contouring and tumour classification on multi-sequence MRI",
            version=parotid.__version__,
        )
        for t in self._trainers.values():  # first start: the shipped checkpoints become version 1
            if isinstance(t, GatedTrainTask):
                t.registry.sync_served()

    def registry(self, model: str) -> ModelRegistry | None:
        """The model registry of a trainable model (parotid.registry), None for an unknown name."""
        t = self._trainers.get(model)
        return t.registry if isinstance(t, GatedTrainTask) else None

    def model_info(self, model):
        """MONAI Label's (checksum, modified_time, train_stats) + the served checkpoint's registry version."""
        info = super().model_info(model)
        reg = self.registry(model)
        if info and reg is not None:
            info["version"] = reg.served_version()
        return info

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            from parotid.pacs.datastore import make_dicomweb_datastore

            return make_dicomweb_datastore(self.studies.rstrip("/"), self.conf)
        return StudyDatastore(self.studies)

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for c in self.models.values():
            i = c.infer()
            infers.update(i if isinstance(i, dict) else {c.name: i})
        # pipelines: the served whole-study segmentation is a stage of the tasks that need one (input check,
        # the classifiers' automatic box), so its hot-reloaded checkpoint is the one they all use
        segmentation = infers.get("segmentation")
        for task in infers.values():
            if isinstance(task, UsesSegmentation) and isinstance(segmentation, SegmentStudy):
                task.use_segmentation(segmentation)
            if isinstance(task, ClassifyStudy):  # its output step stores the result on a PACS datastore
                task.result_store = self.datastore()
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        for c in self.models.values():
            t = c.trainer()
            if t is None:
                continue
            trainers.update(t if isinstance(t, dict) else {c.name: t})
        return trainers

    def init_strategies(self) -> Dict[str, Strategy]:
        strategies: Dict[str, Strategy] = {}
        for c in self.models.values():
            s = c.strategy()
            if s:
                strategies.update(s if isinstance(s, dict) else {f"{c.name}_{type(s).__name__.lower()}": s})
        from lib.activelearning import default_strategies

        strategies.update(default_strategies())
        return strategies

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        methods: Dict[str, ScoringMethod] = {}
        for c in self.models.values():
            s = c.scoring_method()
            if s:
                methods.update(s if isinstance(s, dict) else {f"{c.name}_{type(s).__name__.lower()}": s})
        if "segmentation" in self.models:
            from lib.activelearning.uncertainty import StudyUncertaintyScoring

            methods["study_uncertainty"] = StudyUncertaintyScoring(
                os.path.join(self.model_dir, "segmentation.pt"), os.path.join(self.model_dir, "classify_subtype.pt"))
        return methods

    def on_init_complete(self):
        super().on_init_complete()
        from monailabel.app import app as fastapi_app  # the server's FastAPI app (server mode only)

        install_checkpoint_upload_check(fastapi_app, self._infers.get, self._trainers.get)
        install_registry_routes(fastapi_app, self.registry)
        install_image_upload(fastapi_app)
        install_infer_caller(fastapi_app)  # the caller's role decides whether a classification SR is stored
        install_single_training(fastapi_app, self.model_dir)  # one training across workers and replicas
        install_offloaded_routes(fastapi_app)  # label saves and other blocking MONAI Label routes off the event loop
        if not getattr(fastapi_app.state, "parotid_http_layer", False):  # not served via parotid.asgi (before start)
            jobs = {"train": self._trainers, "scoring": self._scoring_methods, "batch/infer": self._infers}
            http_api.install(fastapi_app, lambda kind: jobs[kind].keys())
            restrict_cors(fastapi_app)  # MONAI Label allows every origin

    def info(self):
        """MONAI Label's /info plus ``label_sets``: every classification label set whose classes the datastore
        accepts as ``tumor_class`` (parotid.label_validation), so clients offer exactly those; and
        ``commissioned_sites``: the sites the input check accepts besides the training cohort."""
        meta = super().info()
        meta["label_sets"] = {n: s.to_dict() for n, s in sorted(classification_label_sets().items())}
        # sites whose scanner/protocol an admin commissioned (parotid-eval commission, docs/input-check.md)
        meta["commissioned_sites"] = input_check.commissioned_sites(self.model_dir)
        return meta

    def infer_wsi(self, request: Dict[str, Any], datastore=None):
        raise HTTPException(404, "whole-slide (pathology) inference is not offered by this MRI app; use /infer/{model}")

    def _load_sessions(self, load=False):
        return StudySessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY) if load else None

    def batch_infer(self, request: Dict[str, Any], datastore=None):
        """MONAI Label spreads batch inference over CUDA devices and takes an index modulo their count,
        a ZeroDivisionError on a CPU-only server: without CUDA it runs on the CPU. Batch results never
        replace annotators' final labels."""
        request = dict(request)
        if request.get("model") not in self._infers:
            raise HTTPException(404, f"unknown model '{request.get('model')}'; available: {sorted(self._infers)}")
        _refuse_final_tag(request)
        for key in ("max_workers", "max_batch_size"):
            if not isinstance(request.get(key, 0), int) or request.get(key, 0) < 0:
                raise HTTPException(422, f"{key} must be a non-negative integer")
        if not torch.cuda.is_available():
            request.update(multi_gpu=False, device="cpu")
        # a study the model cannot process is reported in the result and skipped, not fatal to the batch
        return self._batch_infer(request, datastore or self.datastore(), skipping_unprocessable(self.infer))

    def next_sample(self, request: Dict[str, Any]):
        """A `strategy` in the request body must be a name (MONAI Label looks it up in a dict: 500)."""
        if not isinstance(request.get("strategy"), (str, type(None))):
            raise HTTPException(422, "strategy must be the name of a strategy listed under 'strategies' in /info")
        return super().next_sample(request)

    def infer(self, request: Dict[str, Any], datastore=None):
        """Check the model and study first so that bad requests get 4xx JSON, not a 500. The one place
        where inference's domain errors become HTTP errors (lib/errors.py)."""
        model = request.get("model")
        if request.get("save_label"):
            _refuse_final_tag(request)
        if model not in self._infers:
            raise HTTPException(404, f"unknown model '{model}'; available: {sorted(self._infers)}")
        image = request.get("image")
        # keys only the app sets (a client's params land in the request too)
        request = {**{k: v for k, v in request.items() if k != STUDY_ID}, MAY_WRITE: caller_may_write()}
        if isinstance(image, str) and not os.path.exists(image):
            ds = datastore or self.datastore()
            uri = ds.get_image_uri(image) if image else ""  # resolved once per request (a PACS query)
            if not uri:
                raise HTTPException(404, f"unknown study '{image}'")
            datastore = ResolvedStudy(ds, image, uri)
            request = {**request, STUDY_ID: image}  # the task's output steps (PACS write-back) need the id
        with http_errors():
            return super().infer(request, datastore)


class ResolvedStudy:
    """The app's datastore for one /infer request whose study is resolved already: MONAI Label's infer asks
    it for the image URI again, a PACS datastore would query the PACS again. Everything else is the
    datastore's."""

    def __init__(self, datastore: Datastore, image_id: str, uri: str):
        self._datastore, self._image_id, self._uri = datastore, image_id, uri

    def get_image_uri(self, image_id: str) -> str:
        return self._uri if image_id == self._image_id else self._datastore.get_image_uri(image_id)

    def __getattr__(self, name: str):
        return getattr(self._datastore, name)


def _refuse_final_tag(request: Dict[str, Any]) -> None:
    """Model output is saved under `original` (or another tag); `final` belongs to the annotators."""
    tag = request.get("label_tag", DefaultLabelTag.ORIGINAL)
    if str(getattr(tag, "value", tag)) == DefaultLabelTag.FINAL.value:
        raise HTTPException(422, "model output cannot be saved as the 'final' label; final labels come from annotators")
