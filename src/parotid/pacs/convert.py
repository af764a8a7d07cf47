"""Series grouping (SeriesDescription -> sequence key) and DICOM series -> SimpleITK conversion with checked
geometry: classic single-frame MR and Enhanced (multi-frame) MR, used by ``parotid-import`` and the DICOMweb
datastore alike."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from parotid.sequences import DWI_KEYS, SEQUENCE_KEYS, match_sequence, most_specific_match
from parotid.study import StudyError, scrub_paths

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- grouping
# A diffusion series holding several b-values (one series, b=0 and b=1000 images at the same positions,
# as most scanners store it) has no single sequence key: it is grouped as MIXED_DWI and split by
# DiffusionBValue (0018,9087) after download (``split_dwi``).
MIXED_DWI = "DWI*"
DWI_PATTERNS = ("*dwi*", "*diff*", "*ep2d*", "*trace*")
@dataclass
class SeriesInfo:
    series_uid: str
    description: str
    modality: str
    number: int | None
    n_instances: int | None
    sequence: str | None = None


@dataclass
class StudyGrouping:
    study_uid: str
    sequences: dict[str, SeriesInfo] = field(default_factory=dict)  # key -> chosen series
    ignored: list[SeriesInfo] = field(default_factory=list)  # unrecognised or superseded series

    def cache_key(self) -> str:
        import hashlib

        parts = [self.study_uid] + [
            f"{k}={s.series_uid}:{s.n_instances}" for k, s in sorted(self.sequences.items())
        ]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()


def load_patterns(spec) -> dict[str, tuple[str, ...]]:
    """Deployment overrides of SeriesDescription patterns: a dict or a JSON string / file path
    mapping sequence key -> list of case-insensitive fnmatch patterns (checked before the defaults)."""
    if not spec:
        return {}
    if isinstance(spec, str):
        spec = spec.strip()
        if os.path.isfile(spec):
            with open(spec) as f:
                spec = json.load(f)
        else:
            spec = json.loads(spec)
    out = {}
    for key, pats in dict(spec).items():
        if key not in SEQUENCE_KEYS:
            raise ValueError(f"sequence pattern override names unknown sequence {key!r}; known {list(SEQUENCE_KEYS)}")
        out[key] = tuple(p.lower() for p in ([pats] if isinstance(pats, str) else pats))
    return out


def classify_series(description: str, patterns: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """Sequence key of a SeriesDescription: deployment patterns first (most specific wins), then
    ``parotid.sequences.match_sequence``."""
    low = (description or "").strip().lower()
    best = most_specific_match(low, patterns or {})
    if best:
        return best
    key = match_sequence(low) if low else None
    if key is None and any(fnmatch.fnmatchcase(low, p) for p in DWI_PATTERNS):
        return MIXED_DWI
    return key


def _val(ds: Dataset, name: str, default=None):
    v = ds.get(name, None)
    if v is None or v == "":
        return default
    return v


def series_info_from_qido(ds: Dataset) -> SeriesInfo:
    n = _val(ds, "NumberOfSeriesRelatedInstances")
    num = _val(ds, "SeriesNumber")
    return SeriesInfo(
        series_uid=str(ds.SeriesInstanceUID),
        description=str(_val(ds, "SeriesDescription", "")),
        modality=str(_val(ds, "Modality", "")),
        number=int(num) if num is not None else None,
        n_instances=int(n) if n is not None else None,
    )


def group_series(study_uid: str, series: Iterable[SeriesInfo], patterns=None, modalities=("MR",)) -> StudyGrouping:
    """Map the series of one study to sequence keys. When several series match the same key the one
    with the highest SeriesNumber (the latest acquisition) wins; the others are listed as ignored."""
    g = StudyGrouping(study_uid)
    for s in series:
        if modalities and s.modality and s.modality not in modalities:
            g.ignored.append(s)
            continue
        s.sequence = classify_series(s.description, patterns)
        if s.sequence is None:
            g.ignored.append(s)
            continue
        cur = g.sequences.get(s.sequence)
        if cur is None or (s.number or -1) > (cur.number or -1):
            if cur is not None:
                g.ignored.append(cur)
            g.sequences[s.sequence] = s
        else:
            g.ignored.append(s)
    # a multi-b-value series is only used for the b-values no dedicated series provides
    if MIXED_DWI in g.sequences and all(k in g.sequences for k in DWI_KEYS):
        g.ignored.append(g.sequences.pop(MIXED_DWI))
    return g


def b_value(ds: Dataset) -> float | None:
    v = ds.get("DiffusionBValue", None)
    if v is None:
        for item in ds.get("MRDiffusionSequence", []) or []:
            if "DiffusionBValue" in item:
                v = item.DiffusionBValue
    try:
        return float(v) if v is not None and v != "" else None
    except (TypeError, ValueError):
        return None


def split_dwi(datasets: Sequence[Dataset], name: str = "DWI series") -> dict[str, list[Dataset]]:
    """Split a multi-b-value diffusion series into {"DWI_B0": [...], "DWI_B1000": [...]} by DiffusionBValue
    (b0: the lowest b <= 50; b1000: the b closest to 1000 within 500..1500). Raises StudyError if the
    instances carry no b-values."""
    by_b: dict[float, list[Dataset]] = {}
    for ds in datasets:
        b = b_value(ds)
        if b is None:
            raise StudyError(f"{name}: diffusion series without DiffusionBValue; cannot tell b0 from b1000 "
                             "(store one series per b-value or add SeriesDescription patterns)")
        by_b.setdefault(b, []).append(ds)
    out: dict[str, list[Dataset]] = {}
    low = [b for b in by_b if b <= 50]
    if low:
        out["DWI_B0"] = by_b[min(low)]
    high = [b for b in by_b if 500 <= b <= 1500]
    if high:
        out["DWI_B1000"] = by_b[min(high, key=lambda b: abs(b - 1000))]
    if not out:
        raise StudyError(f"{name}: b-values {sorted(by_b)} include neither b0 nor b~1000")
    return out


# --------------------------------------------------------------------------- conversion
# Geometry is taken from the DICOM attributes and checked, never invented: GDCM (and so SimpleITK's series
# reader) silently makes a 1 mm grid at origin 0 for images without ImagePositionPatient /
# ImageOrientationPatient / PixelSpacing, stacks copies of one slice as a volume, and reads an Enhanced
# (multi-frame) MR file as a 4D image ignoring its per-frame geometry. Frame geometry is read with pydicom
# from the classic attributes or from the functional groups of Enhanced MR (PlanePositionSequence,
# PlaneOrientationSequence, PixelMeasuresSequence; a per-frame item overrides the shared one). highdicom
# 0.22 (the version compatible with pydicom 2.4) has no volume reader, hence the small code below.
POSITION_TOL_MM = 0.01  # slices closer than this along the normal are duplicates
SPACING_TOL = 0.01  # relative deviation of a slice gap from the median gap that makes a stack uneven
NON_IMAGE_MODALITIES = ("SEG", "SR", "RTSTRUCT", "PR", "KO", "REG")


def is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _fg_item(ds: Dataset, frame: int, macro: str):
    """One frame's functional-group macro item: the per-frame item wins over the shared one."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and frame < len(per) and macro in per[frame] and per[frame][macro].value:
        return per[frame][macro].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and macro in shared[0] and shared[0][macro].value:
        return shared[0][macro].value[0]
    return None


def _floats(item, keyword: str, n: int):
    v = item.get(keyword) if item is not None else None
    if v is None or v == "":
        return None
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        v = [v]
    try:
        vals = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and np.isfinite(vals).all() else None


def frame_geometry(ds: Dataset) -> list[tuple]:
    """(position, orientation, pixel spacing) of every frame; None where an attribute is missing."""
    if not is_multiframe(ds):
        return [(_floats(ds, "ImagePositionPatient", 3), _floats(ds, "ImageOrientationPatient", 6),
                 _floats(ds, "PixelSpacing", 2))]
    n = int(ds.get("NumberOfFrames", 1) or 1)
    return [(_floats(_fg_item(ds, f, "PlanePositionSequence"), "ImagePositionPatient", 3),
             _floats(_fg_item(ds, f, "PlaneOrientationSequence"), "ImageOrientationPatient", 6),
             _floats(_fg_item(ds, f, "PixelMeasuresSequence"), "PixelSpacing", 2)) for f in range(n)]


@dataclass
class StackGeometry:
    order: np.ndarray  # frame indices sorted along the slice normal
    origin: tuple
    spacing: tuple  # (column spacing, row spacing, slice gap): ITK's (i, j, k)
    direction: tuple  # row-major 3x3, columns = row direction, column direction, normal


def stack_geometry(geoms: Sequence[tuple], name: str = "series") -> StackGeometry:
    """Check that frames form one regular 3D stack and return its geometry; StudyError says what is wrong."""
    n = len(geoms)
    missing = sorted({attr for g in geoms for attr, v in zip(("ImagePositionPatient", "ImageOrientationPatient",
                                                                "PixelSpacing"), g) if v is None})
    if missing:
        bad = sum(1 for g in geoms if any(v is None for v in g))
        raise StudyError(f"{name}: {bad} of {n} images lack {', '.join(missing)}: the series has no usable "
                         "geometry and is refused (no grid is invented)")
    if n < 2:
        raise StudyError(f"{name}: a single slice, not a 3D series")
    pos = np.array([g[0] for g in geoms])
    iop = np.array([g[1] for g in geoms])
    sp = np.array([g[2] for g in geoms])
    if not np.allclose(iop, iop[0], atol=1e-4):
        raise StudyError(f"{name}: the slices have different orientations (ImageOrientationPatient); "
                         "a 3D series has one")
    if not np.allclose(sp, sp[0], rtol=1e-4, atol=1e-5):
        raise StudyError(f"{name}: the slices have different pixel spacings {sorted({tuple(r) for r in sp.tolist()})[:3]}")
    row, col = iop[0, :3], iop[0, 3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise StudyError(f"{name}: ImageOrientationPatient {iop[0].tolist()} is not two orthogonal unit vectors")
    normal = np.cross(row, col)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    dup = int((gaps < POSITION_TOL_MM).sum())
    if dup:
        at = float(along[order][1:][gaps < POSITION_TOL_MM][0])
        raise StudyError(f"{name}: duplicate slice positions: {dup} of {n} images repeat the "
                         f"position of another (e.g. at {at:.2f} mm along the slice normal); a series holding "
                         "several echoes, b-values or time points must be split into one series each")
    gap = float(np.median(gaps))
    if np.abs(gaps - gap).max() > SPACING_TOL * gap + 1e-3:
        raise StudyError(f"{name}: uneven slice spacing: gaps between neighbouring slices range from "
                         f"{gaps.min():.3f} to {gaps.max():.3f} mm (missing or extra slices?); a 3D series "
                         "has one slice spacing")
    lateral = pos[order] - pos[order[0]] - np.outer(along[order] - along[order[0]], normal)
    if np.abs(lateral).max() > max(POSITION_TOL_MM, SPACING_TOL * gap):
        raise StudyError(f"{name}: the slice positions do not lie on one line along the slice normal "
                         f"(shifted by up to {np.abs(lateral).max():.2f} mm; tilted or mixed stacks)")
    direction = np.column_stack([row, col, normal])
    return StackGeometry(order, tuple(float(v) for v in pos[order[0]]), (float(sp[0][1]), float(sp[0][0]), gap),
                         tuple(float(v) for v in direction.ravel()))


def _set_geometry(img: sitk.Image, g: StackGeometry) -> sitk.Image:
    img.SetOrigin(g.origin)
    img.SetSpacing(g.spacing)
    img.SetDirection(g.direction)
    return img


def _rescale(ds: Dataset, frame: int | None) -> tuple[float, float]:
    item = _fg_item(ds, frame, "PixelValueTransformationSequence") if frame is not None else None
    src = item if item is not None and "RescaleSlope" in item else ds
    slope, inter = src.get("RescaleSlope", 1), src.get("RescaleIntercept", 0)
    return float(slope if slope not in (None, "") else 1), float(inter if inter not in (None, "") else 0)


def multiframe_image(datasets: Sequence[Dataset], name: str = "series") -> sitk.Image:
    """Enhanced / multi-frame MR (one or several files) -> 3D image, frames placed by their own geometry."""
    geoms, frames = [], []
    for ds in datasets:
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise StudyError(f"{name}: colour/multi-component images are not MR sequences")
        try:
            arr = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - pydicom's decoders raise many types
            raise StudyError(f"{name}: pixel data cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from None
        arr = arr.reshape((-1,) + arr.shape[-2:])
        g = frame_geometry(ds)
        if len(g) != arr.shape[0]:
            raise StudyError(f"{name}: {arr.shape[0]} frames but {len(g)} frame geometries")
        for f in range(arr.shape[0]):
            slope, inter = _rescale(ds, f)
            frames.append(arr[f].astype(np.float32) * slope + inter)
        geoms += g
    g = stack_geometry(geoms, name)
    if len({f.shape for f in frames}) != 1:
        raise StudyError(f"{name}: frames of different sizes")
    vol = np.stack([frames[i] for i in g.order])  # (K, rows=J, columns=I)
    return _set_geometry(sitk.GetImageFromArray(vol), g)


def read_dicom_series(files: Sequence[str], name: str = "series") -> sitk.Image:
    """Instances of ONE series (file paths) -> a checked 3D image."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    if any(is_multiframe(h) for h in headers):
        return _checked(multiframe_image([pydicom.dcmread(f) for f in files], name), name)
    g = stack_geometry([frame_geometry(h)[0] for h in headers], name)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(files[i]) for i in g.order])
    try:
        img = reader.Execute()
    except RuntimeError as e:
        msg = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise StudyError(f"{name}: DICOM series could not be converted "
                         f"({scrub_paths(msg[-1] if msg else 'unknown error')[:160]})") from None
    if img.GetDimension() != 3 or img.GetSize()[2] != len(files):
        raise StudyError(f"{name}: DICOM series read as size {list(img.GetSize())}, expected {len(files)} slices")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise StudyError(f"{name}: colour/multi-component images are not MR sequences")
    return _checked(_set_geometry(img, g), name)


def _checked(img: sitk.Image, name: str) -> sitk.Image:
    if min(img.GetSize()) < 2:
        raise StudyError(f"{name}: volume of size {list(img.GetSize())} is not 3D (a single slice?)")
    if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
        raise StudyError(f"{name}: contains NaN or infinite voxels")
    return img


def read_dicom_folder(folder: str, name: str = "series", key: str | None = None, patterns=None) -> sitk.Image:
    """A folder of DICOM files (any names, sub-folders included) -> one checked 3D image.

    A folder with several image series is read only if exactly one series' SeriesDescription matches
    the sequence `key` (``classify_series``); otherwise it is refused with the list of series."""
    series: dict[str, list[tuple[str, Dataset]]] = {}
    for root, _, names in sorted(os.walk(folder)):
        for fn in sorted(names):
            path = os.path.join(root, fn)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not a DICOM file (notes, DICOMDIR helpers): skipped
                continue
            if "Rows" not in ds or str(ds.get("Modality", "")) in NON_IMAGE_MODALITIES:
                continue
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        raise StudyError(f"{name}: no DICOM image in the folder")
    uid = next(iter(series))
    if len(series) > 1:
        def desc(u):
            return str(series[u][0][1].get("SeriesDescription", "") or "")

        match = [u for u in series if key and classify_series(desc(u), patterns) == key]
        if len(match) != 1:
            listing = "; ".join(f"{u} '{desc(u) or '<no SeriesDescription>'}' ({len(v)} files)" for u, v in series.items())
            why = (f"{'none' if not match else len(match)} of them match{'es' if len(match) == 1 else ''} "
                   f"{key}" if key else "which one to read is ambiguous")
            raise StudyError(f"{name}: the folder holds {len(series)} DICOM series ({why}): {listing}; "
                             "keep one series per sequence folder")
        uid = match[0]
    return read_dicom_series([p for p, _ in series[uid]], name)


def datasets_to_image(datasets: Sequence[Dataset], name: str = "series") -> sitk.Image:
    """Convert the instances of one series (e.g. from WADO-RS) to a checked 3D SimpleITK image.

    The instances are written to a temporary folder and converted by ``read_dicom_folder`` in a
    contained child process (``parotid.safe_read``): classic series by SimpleITK/GDCM after the geometry
    checks (rescale, compressed transfer syntaxes), Enhanced (multi-frame) MR by pydicom with per-frame
    geometry. Failures become ``StudyError`` with a user-facing message."""
    from parotid import safe_read

    if not datasets:
        raise StudyError(f"{name}: the series has no instances")
    with tempfile.TemporaryDirectory(prefix="parotid-series-") as tmp:
        for i, ds in enumerate(datasets):
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                raise StudyError(f"{name}: instance {i} has no pixel data (not an image series)")
            path = os.path.join(tmp, f"{i:05d}.dcm")
            try:
                if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
                    ds.file_meta = ds.file_meta if getattr(ds, "file_meta", None) else pydicom.dataset.FileMetaDataset()
                    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
                    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(path, write_like_original=False)
            except Exception as e:  # noqa: BLE001 - anything pydicom raises on malformed input
                raise StudyError(f"{name}: cannot write instance {i} ({type(e).__name__}: {str(e)[:120]})") from None
        return safe_read.read_dicom_folder(tmp, name)
