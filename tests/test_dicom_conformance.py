"""DICOM conformance of what the product writes, checked by dciodvfy (Debian ``dicom3tools``):
``parotid-synth --dicom``'s MR series (SYNTHETIC), the label map as DICOM SEG and the classification
as a Comprehensive 3D SR, plus the SR's coding (standard codes, declared private scheme) and the model
identity it carries. No PACS needed. Skipped only when dciodvfy is missing and PAROTID_REQUIRE_ORTHANC
is unset (CI sets it: deploy/orthanc/install.sh installs dicom3tools)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from parotid.pacs import writeback
from parotid.pacs.dicomio import save_series, volume_to_mr_series
from parotid.synth.cohort import label_image
from parotid.synth.dicom import write_dicom_study
from parotid.synth.phantom import generate

DCIODVFY = shutil.which("dciodvfy")
pytestmark = pytest.mark.skipif(
    DCIODVFY is None and os.environ.get("PAROTID_REQUIRE_ORTHANC") != "1",
    reason="dciodvfy not installed (apt-get install dicom3tools, or deploy/orthanc/install.sh)",
)
STANDARD_SCHEMES = {"DCM", "SCT", "LN", "UCUM", "RFC5646"}  # PS3.16 table 8-1 (no declaration needed)
CHECKSUM = "SHA256:" + "3f" * 32
SYNTH_DICOM_SHA256 = "e70f0fae40fe3e0b93fbd40ad49ff4834fd6468ced162697f2a46315a7e43c39"


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports for one file."""
    if DCIODVFY is None:
        pytest.fail("dciodvfy missing although PAROTID_REQUIRE_ORTHANC=1: run deploy/orthanc/install.sh (dicom3tools)")
    p = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (p.stdout + p.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """One SYNTHETIC study written as parotid-synth --dicom writes it; the reference series' datasets."""
    r = generate(21, 0)
    folders = write_dicom_study(r, str(tmp_path_factory.mktemp("dicom") / r.case.study_id))
    ref = r.case.extra["reference"]
    sources = [pydicom.dcmread(f) for f in sorted(glob.glob(os.path.join(folders[ref], "*.dcm")))]
    return r, folders, sources


def result(roi, **kw) -> dict:
    """A classify result as the app returns it, with the checkpoint identity and an input check."""
    classes = ["pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant"]
    probs = [0.55, 0.25, 0.05, 0.15]
    out = {"prediction": [{"idx": i, "label": c, "score": p} for i, (c, p) in enumerate(zip(classes, probs))],
           "predicted_class": "pleomorphic_adenoma", "malignancy_probability": 0.15, "undetermined": False,
           "roi": roi, "model": "classify_subtype", "version": "0.1.0", "trained_at": "2026-11-20",
           "checkpoint": {"checksum": CHECKSUM, "modified_time": 1764000000},
           "input_check": {"in_distribution": False, "score": 3.2, "threshold": 2.5,
                           "reasons": ["voxel spacing 0.2 mm outside the training range"],
                           "components": {"intensity": {"passed": True, "reference": "site:siteB_1.5T"}}}}
    out.update(kw)
    return out


def test_synthetic_mr_is_conformant(synth, tmp_path):
    r, folders, _ = synth
    for key, folder in sorted(folders.items()):
        first = sorted(glob.glob(os.path.join(folder, "*.dcm")))[0]
        errors, warnings = dciodvfy(first)
        assert errors == [], (key, errors)
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        for kw in ("EchoTime", "EchoTrainLength", "RepetitionTime", "PatientPosition", "DeidentificationMethod"):
            assert ds.get(kw) not in (None, ""), (key, kw)
    # the bad twin: the same slice without its de-identification method is what dciodvfy flagged before
    ds = pydicom.dcmread(first)
    del ds.DeidentificationMethod
    ds.save_as(tmp_path / "bad.dcm")
    assert any("DeidentificationMethod" in e for e in dciodvfy(tmp_path / "bad.dcm")[0])


def test_synthetic_mr_files_are_unchanged(synth):
    """Byte for byte what parotid-synth --dicom wrote before its writer became parotid.pacs.dicomio's
    (seed 21, study 0, all six series: SHA-256 over relative paths and file bytes, pydicom 2.4)."""
    import hashlib

    _, folders, _ = synth
    root = Path(next(iter(folders.values()))).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.dcm")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    assert h.hexdigest() == SYNTH_DICOM_SHA256


def test_handmade_mr_series_is_conformant(tmp_path):
    """parotid.pacs.dicomio's writer (tests, demos, benchmarks) writes conformant MR too."""
    import SimpleITK as sitk

    img = sitk.Image(16, 12, 3, sitk.sitkFloat32)
    img.SetSpacing((0.8, 0.8, 3.0))
    files = save_series(volume_to_mr_series(img, "T2 TSE", pydicom.uid.generate_uid()), str(tmp_path / "s"))
    assert dciodvfy(files[0])[0] == []


@pytest.mark.parametrize("algorithm", [None, ("segmentation", "0.1.0+0123456789ab")])
def test_seg_is_conformant(synth, tmp_path, algorithm):
    r, _, sources = synth
    seg = writeback.write_seg(label_image(r), sources, algorithm=algorithm)
    seg.save_as(tmp_path / "seg.dcm")
    assert dciodvfy(tmp_path / "seg.dcm")[0] == []
    assert seg.DeidentificationMethod == sources[0].DeidentificationMethod


def undeclared_schemes(ds) -> set[str]:
    """Coding scheme designators used anywhere in `ds` that are neither standard nor declared in its
    Coding Scheme Identification Sequence."""
    used: set[str] = set()

    def walk(d):
        for el in d:
            if el.VR == "SQ":
                for item in el.value:
                    if "CodingSchemeDesignator" in item and el.keyword != "CodingSchemeIdentificationSequence":
                        used.add(str(item.CodingSchemeDesignator))
                    walk(item)

    walk(ds)
    declared = {str(i.CodingSchemeDesignator) for i in ds.get("CodingSchemeIdentificationSequence", [])}
    return used - STANDARD_SCHEMES - declared


def concepts(ds, kw="ConceptNameCodeSequence") -> set[tuple[str, str]]:
    out = set()

    def walk(items):
        for it in items:
            for k in (kw, "ConceptCodeSequence"):
                if k in it:
                    out.add((str(it[k][0].CodeValue), str(it[k][0].CodingSchemeDesignator)))
            walk(it.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out


def test_sr_is_conformant_coded_and_identifies_the_checkpoint(synth, tmp_path):
    r, _, sources = synth
    grid = label_image(r)
    sr = writeback.write_classification_sr(result(list(r.roi)), sources, reference_grid=grid)
    sr.save_as(tmp_path / "sr.dcm")
    errors, warnings = dciodvfy(tmp_path / "sr.dcm")
    assert errors == []
    # standard codes where DICOM / SNOMED CT have them, the private scheme declared for the rest
    got = concepts(sr)
    for code in [("45289007", "SCT"),   # finding site: parotid gland
                 ("108369006", "SCT"),  # finding: neoplasm
                 ("8360001", "SCT"),    # pleomorphic adenoma
                 ("86049000", "SCT"),   # malignant neoplasm, primary
                 ("122157", "DCM"),     # probability (per class)
                 ("111047", "DCM"),     # probability of cancer
                 ("116676008", "SCT"),  # associated morphology
                 ("121071", "DCM")]:    # finding (the predicted class)
        assert code in got, code
    assert ("WARTHIN", writeback.SCHEME) in got
    assert undeclared_schemes(sr) == set()
    bad = pydicom.Dataset(sr)
    del bad.CodingSchemeIdentificationSequence  # the bad twin: private codes without the declaration
    assert undeclared_schemes(bad) == {writeback.SCHEME}
    # the model: version changes with the checkpoint, the checksum is carried in full
    back = writeback.read_classification_sr(sr, grid)
    assert back["model_version"] == "0.1.0+" + "3f" * 6
    assert back["checkpoint_checksum"] == CHECKSUM and back["trained_at"] == "2026-11-20"
    assert list(sr.SoftwareVersions)[-1] == back["model_version"]
    assert back["roi"] == list(r.roi) and back["predicted_class"] == "pleomorphic_adenoma"
    assert back["probabilities"] == pytest.approx(dict(pleomorphic_adenoma=0.55, warthin=0.25, basal_cell_adenoma=0.05,
                                                       malignant=0.15))
    assert back["input_check"] == {"in_distribution": False, "score": pytest.approx(3.2),
                                   "threshold": pytest.approx(2.5),
                                   "reasons": ["voxel spacing 0.2 mm outside the training range"],
                                   "reference": "site:siteB_1.5T"}  # audit: accepted through a commissioned site
    print("dciodvfy warnings on the SR:", sorted(set(warnings)))


def test_sr_uids_follow_study_checkpoint_and_box(synth):
    r, _, sources = synth
    grid = label_image(r)
    roi = list(r.roi)
    a = writeback.write_classification_sr(result(roi), sources, reference_grid=grid)
    again = writeback.write_classification_sr(result(roi), sources, reference_grid=grid)
    other_ck = writeback.write_classification_sr(result(roi, checkpoint={"checksum": "SHA256:" + "7a" * 32}),
                                                 sources, reference_grid=grid)
    other_box = writeback.write_classification_sr(result([roi[0], roi[1] - 1, *roi[2:]]), sources, reference_grid=grid)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert other_ck.SeriesInstanceUID != a.SeriesInstanceUID
    assert writeback.read_classification_sr(other_ck)["model_version"] == "0.1.0+" + "7a" * 6
    assert other_box.SeriesInstanceUID == a.SeriesInstanceUID and other_box.SOPInstanceUID != a.SOPInstanceUID
