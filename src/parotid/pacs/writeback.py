"""DICOM write-back with highdicom: label maps as DICOM SEG, classification results as a
Comprehensive 3D SR (TID 1500 measurement report), and STOW-RS.

Segmentation: the uint8 label map lives on the study's reference grid (1 parotid gland, 2 tumour).
The SEG references the *source series* — the series of the reference sequence — and every frame is
the label map resampled (nearest neighbour, in physical space) onto the plane of one source instance,
so the SEG is correct whatever the slice order, and also when the label grid differs from the source's.

Classification SR (TID 1500): one measurement group (TID 1411, volumetric ROI; finding Neoplasm SCT
108369006, finding site Parotid gland SCT 45289007) holding
  * one Probability (DCM 122157) per class, qualified (HAS CONCEPT MOD) by Associated morphology
    (SCT 116676008) = the class: SNOMED CT where it has the tumour type (pleomorphic adenoma, primary
    malignant neoplasm, squamous cell / adenoid cystic carcinoma), else a code of the private scheme
    ``99PAROTID`` (Warthin tumour, basal cell adenoma, benign, ...),
  * the malignancy probability as Probability of cancer (DCM 111047),
  * qualitative evaluations: Finding (DCM 121071) = the predicted class, undetermined (``99PAROTID``
    ``UNDET`` = SCT Yes/No) and, when the result has an input check, in distribution
    (``99PAROTID`` ``INDIST`` = Yes/No) with its score, threshold and reasons,
  * the tumour box as the ellipsoid inscribed in it (SCOORD3D ELLIPSOID, patient coordinates: the
    centres of the box's six faces) — exact round trip to ``roi`` given the reference grid,
  * the model as Algorithm Identification (TID 4019): name, version ``<version>+<checksum[:12]>``
    (changes with every checkpoint), parameters ``checkpoint SHA256:<hex>`` (and training date).
``99PAROTID`` is declared in the SR's Coding Scheme Identification Sequence. UIDs are derived from
(study, model, checkpoint checksum) for the series and (series, source series, box) for the instance,
so every server replica names the same result the same way (see :func:`sr_uids`).
``read_classification_sr`` parses it back to the same dictionary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.coding import CodedConcept
from highdicom.sr.enum import RelationshipTypeValues
from highdicom.sr.value_types import CodeContentItem, TextContentItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from parotid import __version__
from parotid.labels import GLAND, TUMOR
from parotid.study import StudyError, check_roi

logger = logging.getLogger(__name__)

MANUFACTURER = "parotid-mri"
SCHEME = "99PAROTID"  # private coding scheme, declared in every SR written here (PRIVATE_SCHEME)


SOFTWARE_VERSION = __version__
PRIVATE_SCHEME = CodingSchemeIdentificationItem(
    designator=SCHEME, name="parotid-mri private codes", version="1",
    responsible_organization="parotid-mri project (docs/pacs.md lists the codes)")


def _std(code) -> CodedConcept:
    """A pydicom codedict entry (DCM, SCT, LN: standard schemes that need no declaration) as a concept."""
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
PAROTID_GLAND = _std(codes.SCT.ParotidGland)
NEOPLASM = _std(codes.SCT.Neoplasm)
SEGMENTS = {
    GLAND: dict(label="Parotid gland", category=ANATOMICAL_STRUCTURE, type=PAROTID_GLAND),
    TUMOR: dict(label="Tumor", category=CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure"),
                type=NEOPLASM),
}
MR_PROCEDURE = CodedConcept("113091000", "SCT", "Magnetic resonance imaging")
PROBABILITY = _std(codes.DCM.Probability)                     # DCM 122157
PROBABILITY_OF_CANCER = _std(codes.DCM.ProbabilityOfCancer)   # DCM 111047
ASSOCIATED_MORPHOLOGY = _std(codes.SCT.AssociatedMorphology)  # SCT 116676008
FINDING = _std(codes.DCM.Finding)                             # DCM 121071
ALGORITHM_PARAMETERS = "111002"
NO_UNITS = CodedConcept("1", "UCUM", "no units")
YES, NO = _std(codes.SCT.Yes), _std(codes.SCT.No)
# private codes: DICOM / SNOMED CT have no concept for these
C_UNDET = CodedConcept("UNDET", SCHEME, "Classification undetermined")
C_INDIST = CodedConcept("INDIST", SCHEME, "Input within the model's training distribution")
C_ICSCORE = CodedConcept("ICSCORE", SCHEME, "Input check score")
C_ICTHRESH = CodedConcept("ICTHRESH", SCHEME, "Input check threshold")
C_ICREASON = CodedConcept("ICREASON", SCHEME, "Input check finding")
# which reference the images matched: "training" or "site:<name>" (a site an admin commissioned, docs/input-check.md)
C_ICREF = CodedConcept("ICREF", SCHEME, "Input check reference")

# tumour classes of the shipped label sets: SNOMED CT (pydicom's codedict) where it has the type
SCT_CLASSES = {
    "pleomorphic_adenoma": _std(codes.SCT.PleomorphicAdenoma),          # 8360001
    "malignant": _std(codes.SCT.MalignantNeoplasmPrimary),              # 86049000
    "squamous_cell_carcinoma": _std(codes.SCT.SquamousCellCarcinoma),   # 28899001
    "adenoid_cystic_carcinoma": _std(codes.SCT.AdenoidCysticCarcinoma),  # 11671000
}
PRIVATE_CLASSES = {
    "warthin": CodedConcept("WARTHIN", SCHEME, "Warthin tumor"),
    "basal_cell_adenoma": CodedConcept("BCADENOMA", SCHEME, "Basal cell adenoma"),
    "benign": CodedConcept("BENIGN", SCHEME, "Benign neoplasm"),
    "olfactory_neuroblastoma": CodedConcept("ONB", SCHEME, "Olfactory neuroblastoma"),
}
_CLASS_OF = {(c.value, c.scheme_designator): k for k, c in {**SCT_CLASSES, **PRIVATE_CLASSES}.items()}


def class_code(cls: str) -> CodedConcept:
    """The code of a tumour class; a class of a site's own label set gets a private code derived from
    its name (CodeValue is at most 16 characters) whose meaning is the name."""
    if cls in SCT_CLASSES:
        return SCT_CLASSES[cls]
    if cls in PRIVATE_CLASSES:
        return PRIVATE_CLASSES[cls]
    return CodedConcept("C" + hashlib.sha1(cls.encode()).hexdigest()[:12].upper(), SCHEME, cls[:64])


def class_of_code(value: str, scheme: str, meaning: str) -> str:
    return _CLASS_OF.get((str(value), str(scheme)), str(meaning))


def _sorted_sources(source_datasets: Sequence[Dataset]) -> list[Dataset]:
    if not source_datasets:
        raise StudyError("no source images to reference")
    for ds in source_datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise StudyError("multi-frame source images are not supported for SEG write-back")
        for attr in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if attr not in ds:
                raise StudyError(f"source image lacks {attr}; cannot place a segmentation on it")
    return sorted(source_datasets, key=lambda d: int(d.get("InstanceNumber", 0) or 0))


def _plane_grid(ds: Dataset) -> sitk.Image:
    """A one-slice 3D image with the geometry of one source instance (ITK index i = column, j = row)."""
    row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])  # direction of increasing column
    col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])  # direction of increasing row
    normal = np.cross(row_dir, col_dir)
    img = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkUInt8)
    img.SetOrigin([float(v) for v in ds.ImagePositionPatient])
    img.SetSpacing([float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 1.0])
    img.SetDirection(np.stack([row_dir, col_dir, normal], axis=1).ravel().tolist())
    return img


def label_on_sources(label: sitk.Image, sources: Sequence[Dataset]) -> np.ndarray:
    """(frames, rows, columns) uint8 label map, one frame per source instance (in the given order)."""
    lab = sitk.Cast(label, sitk.sitkUInt8)
    frames = []
    for ds in sources:
        plane = sitk.Resample(lab, _plane_grid(ds), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        frames.append(sitk.GetArrayFromImage(plane)[0])  # (rows, columns)
    return np.stack(frames).astype(np.uint8)


def write_seg(
    label: sitk.Image | str,
    source_datasets: Sequence[Dataset],
    *,
    algorithm: tuple[str, str] | None = None,
    series_number: int = 9901,
    series_description: str = "Parotid segmentation",
) -> hd.seg.Segmentation:
    """DICOM SEG (BINARY, one segment per label present in the map's label set) for `label`
    (uint8 map on any grid, 1 gland, 2 tumour) referencing the source series `source_datasets`.
    ``algorithm=(name, version)`` marks it AUTOMATIC, otherwise MANUAL."""
    if isinstance(label, str):
        label = sitk.ReadImage(label)
    if label.GetNumberOfComponentsPerPixel() != 1 or label.GetDimension() != 3:
        raise StudyError("label map must be a 3D scalar image")
    values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
    unknown = values - {0, GLAND, TUMOR}
    if unknown:
        raise StudyError(f"label map holds values {sorted(unknown)}; expected 0 background, {GLAND} gland, {TUMOR} tumour")
    sources = _sorted_sources(source_datasets)
    frames = label_on_sources(label, sources)
    if algorithm:
        algo = hd.AlgorithmIdentificationSequence(name=algorithm[0], version=algorithm[1], family=codes.DCM.ArtificialIntelligence)
        alg_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    else:
        algo, alg_type = None, hd.seg.SegmentAlgorithmTypeValues.MANUAL
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=num,
            segment_label=SEGMENTS[num]["label"],
            segmented_property_category=SEGMENTS[num]["category"],
            segmented_property_type=SEGMENTS[num]["type"],
            algorithm_type=alg_type,
            algorithm_identification=algo,
        )
        for num in (GLAND, TUMOR)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm[0] if algorithm else "manual annotation",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=True,
    )
    logger.info("SEG built: %d frames on %d source instances, labels %s", seg.NumberOfFrames, len(sources), sorted(values - {0}))
    return seg


def read_seg(seg: Dataset, source_datasets: Sequence[Dataset]) -> np.ndarray:
    """Label map (frames, rows, columns) on `source_datasets` (sorted like ``write_seg`` sorts them)."""
    seg = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    sources = _sorted_sources(source_datasets)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False, assert_missing_frames_are_empty=True
    )
    return arr.astype(np.uint8)


# --------------------------------------------------------------------------- classification SR
WRITE_SR_MODES = ("auto", "always", "never")


def _get(result: Mapping[str, Any], *names, default=None):
    for n in names:
        if n in result and result[n] is not None:
            return result[n]
    return default


def model_version_of(version: str, checksum: str | None) -> str:
    """``<version>+<first 12 hex digits of the checkpoint checksum>``: the code version alone stays the
    same when a model is retrained or a checkpoint uploaded; the checksum part changes with the weights."""
    version = str(version or "unknown")
    if not checksum:
        return version
    short = str(checksum).split(":")[-1][:12].lower()
    return version if version.endswith("+" + short) else f"{version}+{short}"


def _input_check(result: Mapping[str, Any]) -> dict | None:
    ic = result.get("input_check")
    if not isinstance(ic, Mapping):
        return None
    num = (lambda v: None if v is None else float(v))
    ind = ic.get("in_distribution")
    intensity = (ic.get("components") or {}).get("intensity") if isinstance(ic.get("components"), Mapping) else None
    ref = ic.get("reference") or (intensity.get("reference") if isinstance(intensity, Mapping) else None)
    return {"in_distribution": None if ind is None else bool(ind), "score": num(ic.get("score")),
            "threshold": num(ic.get("threshold")), "reasons": [str(x) for x in (ic.get("reasons") or [])],
            "reference": None if ref is None else str(ref)}


def normalise_result(result: Mapping[str, Any]) -> dict:
    """Accept the classifier's result in a few shapes and return
    ``{"probabilities": {cls: p}, "predicted_class", "malignancy_probability", "undetermined", "roi",
    "model_name", "model_version", "checkpoint_checksum", "trained_at", "input_check"}``."""
    probs = _get(result, "probabilities", "probs", "class_probabilities")
    pred_list = result.get("prediction")
    if probs is None and isinstance(pred_list, (list, tuple)) and pred_list and isinstance(pred_list[0], Mapping):
        probs = {str(p["label"]): float(p["score"]) for p in pred_list}  # the app's classify task: [{idx, label, score}]
    if isinstance(probs, (list, tuple)):
        classes = _get(result, "classes", "labels")
        if not classes or len(classes) != len(probs):
            raise StudyError("classification result lists probabilities without matching class names")
        probs = dict(zip(classes, probs))
    if not isinstance(probs, Mapping) or not probs:
        raise StudyError("classification result has no class probabilities")
    probs = {str(k): float(v) for k, v in probs.items()}
    pred = _get(result, "predicted_class", "tumor_class", default=max(probs, key=probs.get))
    ck = result.get("checkpoint") if isinstance(result.get("checkpoint"), Mapping) else {}
    checksum = _get(ck, "checksum") or _get(result, "checkpoint_checksum")
    roi = _get(result, "roi", "box")
    return {
        "probabilities": probs,
        "predicted_class": str(pred),
        "malignancy_probability": (lambda v: None if v is None else float(v))(
            _get(result, "malignancy_probability", "p_malignant", "malignant_probability")),
        "undetermined": bool(_get(result, "undetermined", default=False)),
        "roi": None if roi is None else [int(v) for v in roi],
        "model_name": str(_get(result, "model_name", "model", default="unknown")),
        "model_version": model_version_of(_get(result, "model_version", "version", default=""), checksum),
        "checkpoint_checksum": None if not checksum else str(checksum),
        "trained_at": None if not result.get("trained_at") else str(result["trained_at"]),
        "input_check": _input_check(result),
    }


def sr_skip_reason(r: Mapping[str, Any], write_sr: str = "auto") -> str | None:
    """Why the normalised result `r` is not written (None: write it). ``write_sr``: ``auto`` writes only
    determined results whose input passed the input check, ``always`` writes any, ``never`` none."""
    if write_sr not in WRITE_SR_MODES:
        raise StudyError(f"write_sr must be one of {list(WRITE_SR_MODES)}, got {write_sr!r}")
    if write_sr == "never":
        return "write_sr is 'never'"
    if write_sr == "always":
        return None
    ic = r.get("input_check") or {}
    if ic.get("in_distribution") is False:
        why = "; ".join(ic.get("reasons") or []) or "no reason given"
        return (f"input outside the model's training distribution ({why}); pass params write_sr='always' to "
                "store it anyway")
    if r.get("undetermined"):
        return "classification undetermined; pass params write_sr='always' to store it anyway"
    return None


def sr_uids(study_uid: str, r: Mapping[str, Any], source_series_uid: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR of normalised result `r`: the series is a function of
    (study, model, checkpoint checksum), the instance of (series, source series, box). Every server replica
    computes the same UIDs without shared state, so a repeated classification is found by UID on the
    PACS, and two replicas storing at once store the same instance (a PACS keeps one per SOPInstanceUID)."""
    checkpoint = r.get("checkpoint_checksum") or f"version {r['model_version']}"
    series = generate_uid(entropy_srcs=["parotid-mri classification SR", study_uid, r["model_name"], checkpoint])
    sop = generate_uid(entropy_srcs=[series, source_series_uid, json.dumps(r.get("roi"))])
    return series, sop


def _with_modifier(m: hd.sr.Measurement, name: CodedConcept, value: CodedConcept) -> hd.sr.Measurement:
    """Add a HAS CONCEPT MOD code to a measurement (highdicom's Measurement has no argument for it)."""
    m[0].ContentSequence.append(CodeContentItem(name=name, value=value,
                                                relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    return m


def _roi_to_ellipsoid(roi, grid: sitk.Image) -> np.ndarray:
    """Centres of the six faces of the half-open voxel box, in patient coordinates (ellipsoid axes)."""
    check_roi(roi, grid.GetSize())
    i0, i1, j0, j1, k0, k1 = [float(v) for v in roi]
    lo = np.array([i0, j0, k0]) - 0.5  # voxel box edges in continuous index space
    hi = np.array([i1, j1, k1]) - 0.5
    c = (lo + hi) / 2
    pts = []
    for ax in range(3):
        for v in (lo[ax], hi[ax]):
            p = c.copy()
            p[ax] = v
            pts.append(grid.TransformContinuousIndexToPhysicalPoint(p.tolist()))
    return np.array(pts, dtype=np.float64)


def ellipsoid_to_roi(points: np.ndarray, grid: sitk.Image) -> list[int]:
    """Inverse of the box encoding: the half-open voxel box on `grid` from the six face centres."""
    idx = np.array([grid.TransformPhysicalPointToContinuousIndex([float(v) for v in p]) for p in np.asarray(points).reshape(6, 3)])
    roi = []
    for ax in range(3):
        a, b = sorted((idx[2 * ax, ax], idx[2 * ax + 1, ax]))
        roi += [int(round(a + 0.5)), int(round(b + 0.5))]
    return roi


def write_classification_sr(
    result: Mapping[str, Any],
    source_datasets: Sequence[Dataset],
    *,
    reference_grid: sitk.Image | None = None,
    series_number: int = 9902,
    series_description: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 measurement report with the classification `result` (see :func:`normalise_result`),
    referencing the source series, with the UIDs of :func:`sr_uids`. The box needs `reference_grid`
    (the study grid the roi refers to)."""
    r = normalise_result(result)
    sources = _sorted_sources(source_datasets)
    for cls, p in r["probabilities"].items():
        if not 0.0 <= p <= 1.0:
            raise StudyError(f"probability of {cls} is {p}, outside [0, 1]")
    series_uid, sop_uid = sr_uids(str(sources[0].StudyInstanceUID), r, str(sources[0].SeriesInstanceUID))
    params = [f"checkpoint {r['checkpoint_checksum']}"] if r["checkpoint_checksum"] else []
    params += [f"trained {r['trained_at']}"] if r["trained_at"] else []
    algo = hd.sr.AlgorithmIdentification(name=r["model_name"], version=r["model_version"], parameters=params or None)
    measurements = [
        _with_modifier(hd.sr.Measurement(name=PROBABILITY, value=p, unit=NO_UNITS, algorithm_id=algo),
                       ASSOCIATED_MORPHOLOGY, class_code(cls))
        for cls, p in r["probabilities"].items()
    ]
    if r["malignancy_probability"] is not None:
        measurements.append(hd.sr.Measurement(name=PROBABILITY_OF_CANCER, value=r["malignancy_probability"],
                                              unit=NO_UNITS, algorithm_id=algo))
    evaluations = [
        hd.sr.QualitativeEvaluation(name=FINDING, value=class_code(r["predicted_class"])),
        hd.sr.QualitativeEvaluation(name=C_UNDET, value=YES if r["undetermined"] else NO),
    ]
    ic = r["input_check"]
    if ic is not None:
        if ic["in_distribution"] is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(name=C_INDIST, value=YES if ic["in_distribution"] else NO))
        for name, key in ((C_ICSCORE, "score"), (C_ICTHRESH, "threshold")):
            if ic[key] is not None:
                measurements.append(hd.sr.Measurement(name=name, value=ic[key], unit=NO_UNITS, algorithm_id=algo))
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_uid, "tracking"]),
                                        identifier="parotid tumour classification")
    group_kw = dict(tracking_identifier=tracking, finding_type=NEOPLASM, algorithm_id=algo,
                    finding_sites=[hd.sr.FindingSite(anatomic_location=PAROTID_GLAND)],
                    measurements=measurements, qualitative_evaluations=evaluations)
    if r["roi"] is not None:
        if reference_grid is None:
            raise StudyError("a box (roi) needs the study's reference grid to be written to the SR")
        pts = _roi_to_ellipsoid(r["roi"], reference_grid)
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
            graphic_data=pts,
            frame_of_reference_uid=str(sources[0].FrameOfReferenceUID),
            source_series=hd.sr.SourceSeriesForSegmentation(str(sources[0].SeriesInstanceUID)),
        )
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_volume_surface=surface, **group_kw)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources[:1]], **group_kw)
    for reason in (ic or {}).get("reasons", []):
        group[0].ContentSequence.append(TextContentItem(name=C_ICREASON, value=reason[:1024],
                                                        relationship_type=RelationshipTypeValues.CONTAINS))
    if (ic or {}).get("reference"):
        group[0].ContentSequence.append(TextContentItem(name=C_ICREF, value=ic["reference"][:1024],
                                                        relationship_type=RelationshipTypeValues.CONTAINS))
    device_key = r["checkpoint_checksum"] or r["model_version"]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["parotid-mri model", r["model_name"], device_key]),
            name=r["model_name"], model_name=r["model_version"], manufacturer_name=MANUFACTURER),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=MR_PROCEDURE,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=r["model_name"][:64],
        software_versions=[SOFTWARE_VERSION, r["model_version"][:64]],
        series_description=(series_description or f"AI classification {r['model_name']} {r['model_version']}")[:64],
        coding_schemes=[PRIVATE_SCHEME],
        is_complete=True,
    )
    logger.info("SR built: %d classes, undetermined=%s", len(r["probabilities"]), r["undetermined"])
    return sr


def _code(item, kw: str = "ConceptNameCodeSequence") -> tuple[str | None, str | None, str]:
    if kw not in item:
        return None, None, ""
    c = item[kw].value[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.CodeMeaning)


def read_classification_sr(sr: Dataset, reference_grid: sitk.Image | None = None) -> dict:
    """Parse a report written by :func:`write_classification_sr` back into the normalised dictionary."""
    out: dict = {"probabilities": {}, "malignancy_probability": None, "predicted_class": None,
                 "undetermined": None, "roi": None, "model_name": None, "model_version": None,
                 "checkpoint_checksum": None, "trained_at": None, "input_check": None}

    def walk(items):
        for it in items:
            yield it
            if "ContentSequence" in it:
                yield from walk(it.ContentSequence)

    def check() -> dict:
        if out["input_check"] is None:
            out["input_check"] = {"in_distribution": None, "score": None, "threshold": None, "reasons": [],
                                  "reference": None}
        return out["input_check"]

    for it in walk(sr.ContentSequence):
        vt = it.ValueType
        code = _code(it)[:2]
        if vt == "NUM":
            value = float(it.MeasuredValueSequence[0].NumericValue)
            if code == (PROBABILITY.value, "DCM"):
                mods = [_code(c, "ConceptCodeSequence") for c in it.get("ContentSequence", [])
                        if _code(c)[:2] == (ASSOCIATED_MORPHOLOGY.value, "SCT")]
                if mods:
                    out["probabilities"][class_of_code(*mods[0])] = value
            elif code == (PROBABILITY_OF_CANCER.value, "DCM"):
                out["malignancy_probability"] = value
            elif code == (C_ICSCORE.value, SCHEME):
                check()["score"] = value
            elif code == (C_ICTHRESH.value, SCHEME):
                check()["threshold"] = value
        elif vt == "CODE" and code == (FINDING.value, "DCM"):
            out["predicted_class"] = class_of_code(*_code(it, "ConceptCodeSequence"))
        elif vt == "CODE" and code == (C_UNDET.value, SCHEME):
            out["undetermined"] = _code(it, "ConceptCodeSequence")[0] == YES.value
        elif vt == "CODE" and code == (C_INDIST.value, SCHEME):
            check()["in_distribution"] = _code(it, "ConceptCodeSequence")[0] == YES.value
        elif vt == "TEXT" and code == (C_ICREASON.value, SCHEME):
            check()["reasons"].append(str(it.TextValue))
        elif vt == "TEXT" and code == (C_ICREF.value, SCHEME):
            check()["reference"] = str(it.TextValue)
        elif vt == "TEXT" and code[0] == "111001":  # Algorithm Name
            out["model_name"] = str(it.TextValue)
        elif vt == "TEXT" and code[0] == "111003":  # Algorithm Version
            out["model_version"] = str(it.TextValue)
        elif vt == "TEXT" and code[0] == ALGORITHM_PARAMETERS:
            text = str(it.TextValue)
            if text.startswith("checkpoint "):
                out["checkpoint_checksum"] = text[len("checkpoint "):]
            elif text.startswith("trained "):
                out["trained_at"] = text[len("trained "):]
        elif vt == "SCOORD3D" and str(it.GraphicType) == "ELLIPSOID":
            pts = np.array([float(v) for v in it.GraphicData]).reshape(6, 3)
            out["ellipsoid"] = pts.tolist()
            if reference_grid is not None:
                out["roi"] = ellipsoid_to_roi(pts, reference_grid)
    return out


# --------------------------------------------------------------------------- STOW-RS
def store(client, datasets: Dataset | Sequence[Dataset]) -> list[str]:
    """STOW-RS the datasets; returns their SOPInstanceUIDs. Raises RuntimeError if the PACS reports
    failed instances."""
    datasets = [datasets] if isinstance(datasets, Dataset) else list(datasets)
    if not datasets:
        return []
    study_uid = str(datasets[0].StudyInstanceUID)
    resp = client.store_instances(datasets=datasets, study_instance_uid=study_uid)
    failed = resp.get("FailedSOPSequence") if resp is not None else None
    if failed:
        reasons = sorted({str(f.get("FailureReason", "?")) for f in failed})
        raise RuntimeError(f"PACS refused {len(failed)} instance(s) (failure reasons {reasons})")
    return [str(ds.SOPInstanceUID) for ds in datasets]
