"""Formats hospitals have (issue 9, item 4): NIfTI-1/-2 with header extensions, Enhanced (multi-frame) MR,
DICOM geometry never invented, several series in one folder, and reader crashes contained.

Real files: nibabel's shipped test data (example4d.nii.gz: NIfTI-1 with two header extensions;
example_nifti2.nii.gz), the bundled SYNTHETIC sample studies, Enhanced MR written by highdicom's
legacy converter and by hand (per-frame functional groups). Every bad input is next to its good twin.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DSeq
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import SAMPLE
from parotid import safe_read
from parotid.pacs.convert import datasets_to_image, read_dicom_folder
from parotid.pacs.dicomio import save_series, volume_to_mr_series
from parotid.study import StudyError, read_study, read_volume

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
STUDY = SAMPLE / "syn7_0000.nii.gz"


def _lps_affine(img: sitk.Image) -> np.ndarray:
    """The image's voxel -> RAS affine (nibabel's convention) from SimpleITK's LPS geometry."""
    d = np.array(img.GetDirection()).reshape(img.GetDimension(), -1)[:3, :3] * np.array(img.GetSpacing()[:3])
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = d, img.GetOrigin()[:3]
    return np.diag([-1, -1, 1, 1]) @ a


# ----------------------------------------------------------------------------- NIfTI
def test_nifti1_with_extensions_and_nifti2_are_read_by_the_libraries():
    for name in ("example4d.nii.gz", "example_nifti2.nii.gz"):
        nimg = nib.load(NIB_DATA / name)
        assert len(nimg.header.extensions) == 2  # real header extensions (the hand parser refused these)
        img = read_volume(str(NIB_DATA / name), name)
        assert list(img.GetSize()) == list(nimg.shape)
        assert np.allclose(_lps_affine(img), nimg.affine, atol=1e-3)
        arr = sitk.GetArrayFromImage(img)  # (T, K, J, I)
        assert np.array_equal(arr.transpose(3, 2, 1, 0), np.asanyarray(nimg.dataobj))


def _variants(tmp_path: Path) -> dict[str, Path]:
    """The sample study as NIfTI-1 + a comment extension, as NIfTI-2 (with the extension too), and re-saved
    by nibabel as int16 with scl_slope/scl_inter (SimpleITK's reader crashed on that multi-component file)."""
    n1 = nib.load(STUDY)
    data = np.asanyarray(n1.dataobj)
    ext1 = nib.Nifti1Image(data, None, header=n1.header.copy())
    ext1.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"exported by a hospital viewer"))
    n2 = nib.Nifti2Image(data, None, header=ext1.header)
    scaled = nib.Nifti1Image(data.astype(np.float32) * 0.5 + 0.25, None, header=n1.header.copy())
    scaled.set_data_dtype(np.int16)  # nibabel picks scl_slope / scl_inter to fit the float values
    out = {"extension": tmp_path / "ext.nii.gz", "nifti2": tmp_path / "n2.nii.gz", "scaled": tmp_path / "sc.nii.gz"}
    nib.save(ext1, out["extension"])
    nib.save(n2, out["nifti2"])
    nib.save(scaled, out["scaled"])
    assert nib.load(out["scaled"]).dataobj.slope != 1.0
    assert nib.load(out["nifti2"]).header["sizeof_hdr"] == 540 and len(nib.load(out["nifti2"]).header.extensions) == 1
    return out


def test_study_with_extension_or_as_nifti2_reads_like_the_original(tmp_path):
    ref = read_study(str(STUDY))
    for kind, path in _variants(tmp_path).items():
        s = read_study(str(path), kind)
        assert s.sequences == ref.sequences and s.shape == ref.shape, kind
        assert np.allclose(s.image.GetOrigin(), ref.image.GetOrigin(), atol=1e-4), kind
        assert np.allclose(s.image.GetDirection(), ref.image.GetDirection(), atol=1e-5), kind
        assert np.allclose(s.image.GetSpacing(), ref.image.GetSpacing(), atol=1e-5), kind
        if kind == "scaled":  # stored as scaled int16: values agree to the scaling's rounding
            assert np.allclose(s.array(), ref.array() * 0.5 + 0.25, atol=nib.load(path).dataobj.slope), kind
        else:
            assert np.array_equal(s.array(), ref.array()), kind


def test_damaged_nifti2_is_refused_without_server_paths(tmp_path):
    good = _variants(tmp_path)["nifti2"]
    raw = tmp_path / "n2.nii"
    nib.save(nib.load(good), raw)
    cases = {
        "trunc_gz.nii.gz": (good.read_bytes()[: len(good.read_bytes()) // 2], "corrupt or truncated"),
        "trunc_payload.nii": (raw.read_bytes()[:-5000], "truncated NIfTI"),
    }
    n2 = nib.load(good)
    nan = np.asanyarray(n2.dataobj).astype(np.float32)
    nan[5, 5, 5, 0, 1] = np.nan
    nan_img = nib.Nifti2Image(nan, None, header=n2.header)
    nan_img.set_data_dtype(np.float32)
    nib.save(nan_img, tmp_path / "nan.nii.gz")
    for fname, (data, words) in cases.items():
        (tmp_path / fname).write_bytes(data)
    cases["nan.nii.gz"] = (None, "NaN")
    for fname, (_, words) in cases.items():
        with pytest.raises(StudyError, match=words) as e:
            read_study(str(tmp_path / fname), "upload")
        assert str(tmp_path) not in str(e.value) and "/tmp" not in str(e.value), e.value
    assert read_study(str(raw)).sequences  # the untruncated twin reads
    with pytest.raises(StudyError, match="parotid-import") as e:  # a plain volume: the command, no Python API
        read_study(str(NIB_DATA / "anatomical.nii"))
    assert "assemble_study" not in str(e.value)


# ----------------------------------------------------------------------------- DICOM
def _volume(seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.integers(0, 2000, (8, 20, 24)).astype(np.float32))  # integers: slope 1
    img.SetSpacing((0.8, 0.9, 3.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection(sitk.VersorTransform((0.2, 0.1, 1.0), 0.3).GetMatrix())  # oblique
    return img


def enhanced_mr(series: list[Dataset], seed: int = 0) -> Dataset:
    """One Enhanced MR Image Storage file from a classic series: per-frame PlanePosition and rescale,
    shared PlaneOrientation and PixelMeasures, frames stored in a shuffled order."""
    first = series[0]
    order = np.random.default_rng(seed).permutation(len(series))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for kw in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "Modality",
               "SeriesDescription", "FrameOfReferenceUID", "Rows", "Columns", "SamplesPerPixel",
               "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, kw, getattr(first, kw))
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 7, 1
    ds.NumberOfFrames = len(series)
    po, pm, shared = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = first.ImageOrientationPatient
    pm.PixelSpacing, pm.SliceThickness = first.PixelSpacing, first.SliceThickness
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = DSeq([po]), DSeq([pm])
    ds.SharedFunctionalGroupsSequence = DSeq([shared])
    frames = []
    for i in order:
        item, pp, pvt = Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = series[i].ImagePositionPatient
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = series[i].RescaleSlope, series[i].RescaleIntercept, "US"
        item.PlanePositionSequence, item.PixelValueTransformationSequence = DSeq([pp]), DSeq([pvt])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DSeq(frames)
    ds.PixelData = b"".join(series[i].PixelData for i in order)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds


def _same(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    assert np.allclose(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), atol=1e-3)


def test_enhanced_mr_is_read_with_its_per_frame_geometry(tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    img = _volume()
    classic = volume_to_mr_series(img, "t2 tse", generate_uid())
    enh = enhanced_mr(classic)
    legacy = LegacyConvertedEnhancedMRImage(legacy_datasets=classic, series_instance_uid=generate_uid(),
                                            series_number=8, sop_instance_uid=generate_uid(), instance_number=1)
    for name, ds in (("enhanced", enh), ("legacy", legacy)):
        (tmp_path / name).mkdir()
        ds.save_as(str(tmp_path / name / "mf.dcm"), write_like_original=False)
        _same(read_dicom_folder(str(tmp_path / name), name), img)  # importer path (in-process)
    # the DICOMweb path (contained child): was "[64, 64, 10, 1] is not 3D"
    _same(datasets_to_image([pydicom.dcmread(str(tmp_path / "enhanced" / "mf.dcm"))], "T2 series"), img)
    # bad twin: a per-frame position repeated -> duplicate positions, refused
    bad = copy.deepcopy(enh)
    bad.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient = \
        bad.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    with pytest.raises(StudyError, match="duplicate slice positions"):
        datasets_to_image([bad], "T2 series")


def test_dicom_without_geometry_or_with_duplicate_or_uneven_slices_is_refused(tmp_path):
    img = _volume()
    series = volume_to_mr_series(img, "t2 tse", generate_uid())
    save_series(series, str(tmp_path / "good"))
    _same(read_dicom_folder(str(tmp_path / "good"), "T2"), img)  # good twin, real geometry
    nogeo = copy.deepcopy(series)
    for ds in nogeo:
        del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    copies = [copy.deepcopy(series[3]) for _ in range(8)]  # eight copies of one slice
    for ds in copies:
        ds.SOPInstanceUID = generate_uid()
    cases = {"nogeo": (nogeo, "lack ImageOrientationPatient, ImagePositionPatient, PixelSpacing"),
             "copies": (copies, "duplicate slice positions"),
             "gap": (series[:3] + series[4:], "uneven slice spacing")}
    for name, (dsets, words) in cases.items():
        save_series(dsets, str(tmp_path / name))
        with pytest.raises(StudyError, match=words):
            read_dicom_folder(str(tmp_path / name), "T2")
        with pytest.raises(StudyError, match=words):  # the DICOMweb path says the same
            datasets_to_image(dsets, "T2 series")


def test_folder_with_several_series_picks_the_matching_one_or_lists_them(tmp_path):
    t2, ce = _volume(1), _volume(2)
    study = generate_uid()
    folder = tmp_path / "T2"
    save_series(volume_to_mr_series(ce, "T1 post gad VIBE", study), str(folder / "a"))  # sorts first
    save_series(volume_to_mr_series(t2, "t2_tse_fs", study), str(folder / "b"))
    _same(read_dicom_folder(str(folder), "T2", key="T2"), t2)
    _same(read_dicom_folder(str(folder), "CET1", key="CET1"), ce)
    with pytest.raises(StudyError, match=r"holds 2 DICOM series \(none of them match ADC\).*t2_tse_fs.*8 files"):
        read_dicom_folder(str(folder), "ADC", key="ADC")
    with pytest.raises(StudyError, match="holds 2 DICOM series"):
        read_volume(str(folder), "T2")  # no sequence to match: refused, not the first series


# ----------------------------------------------------------------------------- crashes contained
def crashing_nifti(path: Path) -> Path:
    """A NIfTI-1 that nibabel reads without complaint and that makes SimpleITK 2.5's NIfTI reader corrupt
    its heap and abort: complex64 voxels with intent code 1007 (vector). Found by a header fuzz (issue 9)."""
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.complex64), np.eye(4))
    img.header.set_intent(1007)
    img.header["descrip"] = b"parotid:T2"
    nib.save(img, path)
    assert np.asanyarray(nib.load(path).dataobj).shape == (6, 5, 4)
    return path


def test_a_reader_crash_is_contained(tmp_path):
    bad = crashing_nifti(tmp_path / "crash.nii.gz")
    r = subprocess.run([sys.executable, "-c", "import SimpleITK as s, sys; s.ReadImage(sys.argv[1])", str(bad)],
                       capture_output=True, timeout=120)
    assert r.returncode < 0, "the file no longer crashes SimpleITK: find another for this test"
    with pytest.raises(StudyError, match=r"crashed the image reader \(SIGABRT|SIGSEGV"):
        safe_read.check_file(str(bad), "study", "upload")
    assert safe_read.check_file(str(STUDY), "study", "upload")["shape"] == [110, 90, 24]  # worker still serves
    small = safe_read.Limits(max_file_bytes=2**30, max_voxels=1000, memory_bytes=2**32, timeout_s=60)
    with pytest.raises(StudyError, match="larger than the server accepts"):
        safe_read.check_file(str(STUDY), "study", "upload", limits=small)
    # memory: a small gzip file that decompresses to 64 MB, with 32 MB of address space above the reader's own
    bomb = tmp_path / "bomb.nii.gz"
    big = nib.Nifti1Image(np.zeros((128, 128, 128, 1, 8), np.float32), np.eye(4))
    big.header.set_intent(1007)
    big.header["descrip"] = b"parotid:T1,T2,CET1,DWI_B0,DWI_B1000,ADC,T1,T2"
    nib.save(big, bomb)
    with open(f"/proc/{safe_read._WORKER._proc.pid}/status") as f:
        vm = int(next(ln for ln in f if ln.startswith("VmSize")).split()[1]) * 1024
    tight = safe_read.Limits(max_file_bytes=2**30, max_voxels=2**30, memory_bytes=vm + 2**25, timeout_s=60)
    assert safe_read.check_file(str(STUDY), "study", "upload", limits=tight)["ok"]  # good twin fits
    with pytest.raises(StudyError, match="needs more memory than the server allows"):
        safe_read.check_file(str(bomb), "study", "upload", limits=tight)
    mha = tmp_path / "x.mha"
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(mha))
    with pytest.raises(StudyError, match="must be NIfTI"):
        safe_read.check_file(str(mha), "volume", "label")


def test_server_survives_a_crashing_upload(server, sample_ids, tmp_path):
    """Upload the crashing file to the REAL server: 422, the server keeps serving, good uploads work
    (NIfTI-2 and NIfTI-1 with an extension among them)."""
    bad = crashing_nifti(tmp_path / "crash.nii.gz")
    url = f"{server.url}/datastore/"
    uploads = []
    try:
        with open(bad, "rb") as f:
            r = requests.put(url, params={"image": "fmt_crash"}, files={"file": ("crash.nii.gz", f)}, timeout=120)
        assert r.status_code == 422 and "crashed the image reader" in r.json()["detail"], r.text
        assert server.alive()
        with open(bad, "rb") as f:  # a label upload is contained too
            r = requests.put(f"{server.url}/datastore/label", params={"image": sample_ids[0], "tag": "fmt_test"},
                             files={"label": ("label.nii.gz", f)}, timeout=120)
        assert r.status_code == 422 and "crashed the image reader" in r.json()["detail"], r.text
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
        r = requests.put(url, params={"image": "fmt_garbage"}, files={"file": ("g.nii.gz", b"\x1f\x8b\x08garbage")},
                         timeout=120)
        assert r.status_code == 422 and "/tmp" not in r.json()["detail"], r.text  # no server paths
        for kind, path in _variants(tmp_path).items():
            sid = f"fmt_{kind}"
            with open(path, "rb") as f:
                r = requests.put(url, params={"image": sid}, files={"file": (path.name, f)}, timeout=120)
            assert r.status_code == 200, (kind, r.text)
            uploads.append(sid)
            info = requests.get(f"{server.url}/datastore/image/info", params={"image": sid}, timeout=30).json()
            assert info["sequences"] == list(read_study(str(STUDY)).sequences)
    finally:
        for sid in uploads:
            requests.delete(f"{server.url}/datastore/", params={"id": sid}, timeout=60)


# ----------------------------------------------------------------------------- Enhanced MR over DICOMweb
def test_enhanced_mr_served_over_dicomweb(tmp_path):
    """A real Orthanc holding a classic CE-T1 series and an Enhanced (multi-frame) T2: the DICOMweb
    datastore assembles the study with the T2 placed by its per-frame geometry."""
    from parotid.pacs.datastore import ParotidDICOMwebDatastore
    from parotid.pacs.orthanc import OrthancProcess, orthanc_available

    if not orthanc_available() and os.environ.get("PAROTID_REQUIRE_ORTHANC") != "1":
        pytest.skip("Orthanc + DICOMweb plugin not installed (run deploy/orthanc/install.sh)")
    t2, ce = _volume(1), _volume(2)
    uid = generate_uid()
    classic_ce = volume_to_mr_series(ce, "T1 post gad", uid)
    enh_t2 = enhanced_mr(volume_to_mr_series(t2, "t2_tse_fs", uid))
    paths = save_series(classic_ce, str(tmp_path / "ce"))
    enh_t2.save_as(str(tmp_path / "t2.dcm"), write_like_original=False)
    with OrthancProcess(str(tmp_path / "orthanc")) as pacs:
        assert pacs.upload_files(paths + [str(tmp_path / "t2.dcm")]) == len(paths) + 1
        store = ParotidDICOMwebDatastore(pacs.client(), str(tmp_path / "cache"))
        study = read_study(store.get_image_uri(uid))
    assert study.sequences == ("T2", "CET1")
    for key, vol in (("T2", t2), ("CET1", ce)):
        assert np.allclose(study.array([key])[0], sitk.GetArrayFromImage(vol).transpose(2, 1, 0), atol=1e-2), key
