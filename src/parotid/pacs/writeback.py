"""DICOM write-back with highdicom: label maps as DICOM SEG, classification results as a
Comprehensive 3D SR (TID 1500 measurement report), and STOW-RS.

Segmentation: the uint8 label map lives on the study's reference grid (1 parotid gland, 2 tumour).
The SEG references the *source series* — the series of the reference sequence — and every frame is
the label map resampled (nearest neighbour, in physical space) onto the plane of one source instance,
so the SEG is correct whatever the slice order, and also when the label grid differs from the source's.

Classification SR (TID 1500): one measurement group (TID 1411, volumetric ROI) holding
  * one Probability (DCM 122157) measurement per class, qualified by a finding-site-free code of the
    class in the private scheme ``99PAROTID`` (``PROB:<class>``),
  * the malignancy probability (``99PAROTID`` ``PMALIG``),
  * qualitative evaluations: predicted class (``99PAROTID`` ``CLASS`` = ``<class>``) and undetermined
    (``99PAROTID`` ``UNDET`` = SCT Yes/No),
  * the tumour box as the ellipsoid inscribed in it (SCOORD3D ELLIPSOID, patient coordinates: the
    centres of the box's six faces) — exact round trip to ``roi`` given the reference grid,
  * the model as Algorithm Identification (TID 4019: name, version).
``read_classification_sr`` parses it back to the same dictionary.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from parotid.labels import GLAND, TUMOR
from parotid.study import StudyError, check_roi

logger = logging.getLogger(__name__)

MANUFACTURER = "parotid-mri"
SCHEME = "99PAROTID"
SOFTWARE_VERSION = "0.1.0"

ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
SEGMENTS = {
    GLAND: dict(label="Parotid gland", category=ANATOMICAL_STRUCTURE, type=CodedConcept("45289007", "SCT", "Parotid gland")),
    TUMOR: dict(label="Tumor", category=CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure"),
                type=CodedConcept("108369006", "SCT", "Neoplasm")),
}
MR_PROCEDURE = CodedConcept("113091000", "SCT", "Magnetic resonance imaging")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
C_PMALIG = CodedConcept("PMALIG", SCHEME, "Probability of malignancy")
C_CLASS = CodedConcept("CLASS", SCHEME, "Predicted tumor class")
C_UNDET = CodedConcept("UNDET", SCHEME, "Classification undetermined")
C_FINDING = CodedConcept("108369006", "SCT", "Neoplasm")
YES, NO = CodedConcept("373066001", "SCT", "Yes"), CodedConcept("373067005", "SCT", "No")


def _class_code(cls: str) -> CodedConcept:
    return CodedConcept(f"C:{cls}"[:16], SCHEME, cls)


def _prob_code(cls: str) -> CodedConcept:
    return CodedConcept(f"P:{cls}"[:16], SCHEME, f"Probability of {cls}")


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
def _get(result: Mapping[str, Any], *names, default=None):
    for n in names:
        if n in result and result[n] is not None:
            return result[n]
    return default


def normalise_result(result: Mapping[str, Any]) -> dict:
    """Accept the classifier's result in a few shapes and return
    ``{"probabilities": {cls: p}, "predicted_class", "malignancy_probability", "undetermined", "roi",
    "model_name", "model_version"}``."""
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
    return {
        "probabilities": probs,
        "predicted_class": str(pred),
        "malignancy_probability": (lambda v: None if v is None else float(v))(
            _get(result, "malignancy_probability", "p_malignant", "malignant_probability")),
        "undetermined": bool(_get(result, "undetermined", default=False)),
        "roi": _get(result, "roi", "box"),
        "model_name": str(_get(result, "model_name", "model", default="unknown")),
        "model_version": str(_get(result, "model_version", "version", default="unknown")),
    }


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
    series_description: str = "Parotid tumour classification",
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 measurement report with the classification `result` (see :func:`normalise_result`),
    referencing the source series. The box needs `reference_grid` (the study grid the roi refers to)."""
    r = normalise_result(result)
    sources = _sorted_sources(source_datasets)
    for cls, p in r["probabilities"].items():
        if not 0.0 <= p <= 1.0:
            raise StudyError(f"probability of {cls} is {p}, outside [0, 1]")
    algo = hd.sr.AlgorithmIdentification(name=r["model_name"], version=r["model_version"])
    measurements = [
        hd.sr.Measurement(name=_prob_code(cls), value=p, unit=NO_UNITS, algorithm_id=algo,
                          derivation=None, method=PROBABILITY)
        for cls, p in r["probabilities"].items()
    ]
    if r["malignancy_probability"] is not None:
        measurements.append(hd.sr.Measurement(name=C_PMALIG, value=r["malignancy_probability"], unit=NO_UNITS,
                                              algorithm_id=algo, method=PROBABILITY))
    evaluations = [
        hd.sr.QualitativeEvaluation(name=C_CLASS, value=_class_code(r["predicted_class"])),
        hd.sr.QualitativeEvaluation(name=C_UNDET, value=YES if r["undetermined"] else NO),
    ]
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="parotid tumour classification")
    group_kw = dict(tracking_identifier=tracking, finding_type=C_FINDING, algorithm_id=algo,
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
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=r["model_name"], model_name=r["model_version"], manufacturer_name=MANUFACTURER),
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
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=series_description,
        is_complete=True,
    )
    logger.info("SR built: %d classes, undetermined=%s", len(r["probabilities"]), r["undetermined"])
    return sr


def read_classification_sr(sr: Dataset, reference_grid: sitk.Image | None = None) -> dict:
    """Parse a report written by :func:`write_classification_sr` back into the normalised dictionary."""
    out: dict = {"probabilities": {}, "malignancy_probability": None, "predicted_class": None,
                 "undetermined": None, "roi": None, "model_name": None, "model_version": None}

    def walk(items):
        for it in items:
            yield it
            if "ContentSequence" in it:
                yield from walk(it.ContentSequence)

    for it in walk(sr.ContentSequence):
        vt = it.ValueType
        name = it.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in it else None
        code = (str(name.CodeValue), str(name.CodingSchemeDesignator)) if name is not None else (None, None)
        if vt == "NUM" and code[1] == SCHEME:
            value = float(it.MeasuredValueSequence[0].NumericValue)
            if code[0] == "PMALIG":
                out["malignancy_probability"] = value
            elif code[0].startswith("P:"):
                out["probabilities"][str(name.CodeMeaning)[len("Probability of "):]] = value
        elif vt == "CODE" and code == ("CLASS", SCHEME):
            out["predicted_class"] = str(it.ConceptCodeSequence[0].CodeMeaning)
        elif vt == "CODE" and code == ("UNDET", SCHEME):
            out["undetermined"] = str(it.ConceptCodeSequence[0].CodeValue) == YES.value
        elif vt == "TEXT" and code[0] == "111001":  # Algorithm Name
            out["model_name"] = str(it.TextValue)
        elif vt == "TEXT" and code[0] == "111003":  # Algorithm Version
            out["model_version"] = str(it.TextValue)
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
