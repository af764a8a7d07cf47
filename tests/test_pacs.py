"""PACS integration against a real Orthanc (DICOMweb, HTTP basic auth) on loopback.

parotid-synth --dicom studies (SYNTHETIC) and pydicom's bundled MR test files are uploaded to Orthanc;
the study-grouping DICOMweb datastore lists, fetches, converts and caches them; SEG and SR written back
are read back from Orthanc and checked. Needs `deploy/orthanc/install.sh` (Debian orthanc packages);
skipped when Orthanc is missing unless PAROTID_REQUIRE_ORTHANC=1.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from pydicom.uid import generate_uid

from conftest import sr_series
from parotid.labels import get_label_set
from parotid.pacs import writeback
from parotid.pacs.client import make_client
from parotid.pacs.convert import SeriesInfo, classify_series, datasets_to_image, group_series
from parotid.pacs.datastore import ParotidDICOMwebDatastore, make_dicomweb_datastore
from parotid.pacs.dicomio import save_series, volume_to_mr_series
from parotid.pacs.orthanc import OrthancProcess, orthanc_available
from parotid.study import StudyError, assemble_study, read_study, read_volume, same_grid

BIN = Path(sys.executable).parent

needs_orthanc = pytest.mark.skipif(
    not orthanc_available() and os.environ.get("PAROTID_REQUIRE_ORTHANC") != "1",
    reason="Orthanc + DICOMweb plugin not installed (run deploy/orthanc/install.sh)",
)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with OrthancProcess(str(tmp_path_factory.mktemp("orthanc"))) as p:
        yield p


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    subprocess.run([str(BIN / "parotid-synth"), "--out", str(out), "--n", "2", "--seed", "11", "--dicom", "--quiet"],
                   check=True, timeout=600)
    return out


def study_uid_of(folder: Path) -> str:
    f = sorted(glob.glob(str(folder / "*" / "*.dcm")))[0]
    return str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def uploaded(pacs, synth) -> dict[str, str]:
    """study_id -> StudyInstanceUID of the synthetic studies stored in Orthanc."""
    ids = {}
    for d in sorted((synth / "dicom").iterdir()):
        pacs.upload_tree(str(d))
        ids[d.name] = study_uid_of(d)
    return ids


@pytest.fixture(scope="module")
def store(pacs, uploaded, tmp_path_factory) -> ParotidDICOMwebDatastore:
    return ParotidDICOMwebDatastore(pacs.client(), str(tmp_path_factory.mktemp("cache")))


# --------------------------------------------------------------------------- pure units
def test_series_grouping_rules():
    assert classify_series("CE-T1 VIBE") == "CET1"
    assert classify_series("T2 TSE FS") == "T2"
    assert classify_series("DWI b1000") == "DWI_B1000"
    assert classify_series("localizer") is None and classify_series("") is None
    # deployment patterns win over the defaults
    assert classify_series("AX 3D FLASH +GD", {"CET1": ("*flash*",)}) == "CET1"
    assert classify_series("", {"T2": ("*",)}) == "T2"
    series = [SeriesInfo("1", "T2 TSE", "MR", 2, 20), SeriesInfo("2", "T2 TSE repeat", "MR", 9, 20),
              SeriesInfo("3", "survey", "MR", 1, 3), SeriesInfo("4", "seg", "SEG", 99, 1)]
    g = group_series("S", series)
    assert g.sequences["T2"].series_uid == "2"  # the latest acquisition wins
    assert {s.series_uid for s in g.ignored} == {"1", "3", "4"}
    key = g.cache_key()
    series[1].n_instances = 21
    assert group_series("S", series).cache_key() != key  # a changed series invalidates the cache


def test_seg_geometry_on_oblique_source():
    """SEG frames are the label resampled onto each source plane, whatever the slice order."""
    img = sitk.Image(12, 10, 6, sitk.sitkFloat32)
    img.SetSpacing((0.9, 0.8, 3.0))
    d = sitk.VersorTransform((0.2, 0.1, 1.0), 0.3).GetMatrix()
    img.SetDirection(d)
    srcs = volume_to_mr_series(img, "CE-T1", generate_uid())
    lab = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    lab.CopyInformation(img)
    lab[2:6, 3:8, 1:4] = 1
    lab[3:5, 4:6, 2] = 2
    shuffled = srcs[::-1]
    frames = writeback.label_on_sources(lab, writeback._sorted_sources(shuffled))
    expected = np.transpose(sitk.GetArrayFromImage(lab), (0, 1, 2))  # (K, rows=J, cols=I)
    assert np.array_equal(frames, expected)
    seg = writeback.write_seg(lab, shuffled, algorithm=("parotid-seg", "1.0"))
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert np.array_equal(writeback.read_seg(seg, shuffled), expected)
    with pytest.raises(StudyError, match="label map holds values"):
        writeback.write_seg(sitk.Cast(lab * 3, sitk.sitkUInt8), srcs)


# --------------------------------------------------------------------------- Orthanc
@needs_orthanc
def test_orthanc_requires_credentials(pacs):
    assert requests.get(pacs.dicomweb_url + "/studies", timeout=10).status_code == 401
    assert requests.get(pacs.dicomweb_url + "/studies", auth=(pacs.user, "wrong"), timeout=10).status_code == 401
    assert requests.get(pacs.dicomweb_url + "/studies", auth=pacs.auth, timeout=10).status_code == 200


@needs_orthanc
def test_wrong_credentials_fail_fast(pacs, tmp_path, monkeypatch):
    monkeypatch.setenv("MONAI_LABEL_DATASTORE_USERNAME", pacs.user)
    monkeypatch.setenv("MONAI_LABEL_DATASTORE_PASSWORD", "not-the-password")
    with pytest.raises(RuntimeError, match="refused the credentials"):
        make_dicomweb_datastore(pacs.dicomweb_url, {"dicomweb_cache_dir": str(tmp_path)})


@needs_orthanc
def test_entry_point_lists_synthetic_studies(pacs, uploaded, tmp_path, monkeypatch):
    for k, v in pacs.env().items():
        monkeypatch.setenv(k, v)
    ds = make_dicomweb_datastore(pacs.dicomweb_url + "/", {"dicomweb_cache_dir": str(tmp_path)})
    assert set(uploaded.values()) <= set(ds.list_images())
    assert set(uploaded.values()) <= set(ds.get_unlabeled_images())
    assert ds.status()["total"] >= len(uploaded)
    # /datastore?output=all lists studies not fetched yet
    objs = ds.json()["objects"]
    assert all(objs[u]["image"]["info"]["fetched"] is False for u in uploaded.values())


@needs_orthanc
def test_study_from_pacs_equals_local_assembly(store, synth, uploaded, caplog):
    caplog.set_level(logging.DEBUG)
    for study_id, uid in uploaded.items():
        t0 = time.perf_counter()
        path = store.get_image_uri(uid)
        cold = time.perf_counter() - t0
        remote = read_study(path)
        folders = {p.name: read_volume(str(p), p.name) for p in sorted((synth / "dicom" / study_id).iterdir())}
        local = assemble_study(folders)
        assert remote.sequences == local.sequences == tuple(store.get_image_info(uid)["sequences"])
        assert same_grid(remote.image, local.image)
        np.testing.assert_allclose(remote.array(), local.array(), atol=1e-3)
        # and the same grid as the study file parotid-synth wrote (DICOM DS strings: ~1e-4 mm)
        synth_study = read_study(str(synth / f"{study_id}.nii.gz"))
        assert synth_study.sequences == remote.sequences
        assert same_grid(synth_study.image, remote.image, tol=1e-3)
        t0 = time.perf_counter()
        assert store.get_image_uri(uid) == path  # cached
        warm = time.perf_counter() - t0
        assert warm < cold
        info = store.get_image_info(uid)
        assert info["reference_series"] == info["series"][info["reference_sequence"]]
    # PHI never reaches the logs
    text = caplog.text
    assert "SYNTHETIC^" not in text and "PatientName" not in text
    for study_id in uploaded:
        assert study_id not in text  # PatientID of the synthetic cohort


@needs_orthanc
def test_cache_is_keyed_by_series(pacs, store, uploaded, tmp_path):
    uid = sorted(uploaded.values())[0]
    path = store.get_image_uri(uid)
    key = store.get_image_info(uid)["cache_key"]
    mtime = os.stat(path).st_mtime_ns
    assert store.get_image_uri(uid) == path and os.stat(path).st_mtime_ns == mtime
    # a newer T2 acquisition arrives: the study is refetched with it
    ref = read_study(path).reference
    img = sitk.Cast(ref, sitk.sitkFloat32) + 7.0
    hdr = pydicom.dcmread(sorted(glob.glob(os.path.join(store._headers_dir(uid), "*.dcm")))[0])
    series = volume_to_mr_series(img, "T2 TSE FS repeat", uid, series_number=42,
                                 frame_of_reference_uid=str(hdr.FrameOfReferenceUID))
    pacs.upload_files(save_series(series, str(tmp_path / "t2b")))
    store.get_image_uri(uid)
    info = store.get_image_info(uid)
    assert info["cache_key"] != key and info["series"]["T2"] == str(series[0].SeriesInstanceUID)
    study = read_study(path)
    np.testing.assert_allclose(study.array(["T2"])[0], 7.0, atol=1e-3)


@needs_orthanc
def test_unreachable_pacs_serves_cache(store, uploaded):
    uid = sorted(uploaded.values())[-1]
    path = store.get_image_uri(uid)
    dead = ParotidDICOMwebDatastore(make_client("http://127.0.0.1:9/dicom-web", "x", "y", timeout=2), store._cache_dir)
    assert uid in dead.list_images()
    assert dead.get_image_uri(uid) == path
    with pytest.raises(StudyError, match="not cached"):
        dead.get_image_uri("1.2.3.4.5")


@needs_orthanc
def test_seg_writeback_roundtrip(pacs, store, synth, uploaded):
    study_id, uid = sorted(uploaded.items())[0]
    index = json.loads((synth / "datastore_v2.json").read_text())
    info = index["objects"][study_id]["labels"]["final"]["info"]
    label_path = synth / "labels" / "final" / f"{study_id}.nii.gz"
    store.save_label(uid, str(label_path), "final", {"tumor_class": info["tumor_class"], "roi": info["roi"]})
    # MONAI Label bookkeeping
    assert uid in store.get_labeled_images() and uid not in store.get_unlabeled_images()
    linfo = store.get_label_info(uid, "final")
    assert linfo["tumor_class"] == info["tumor_class"] and linfo["roi"] == info["roi"]
    assert "pacs_writeback_error" not in linfo
    assert [d["image"] for d in store.datalist()] == [store.get_image_uri(uid)]
    # the SEG is in Orthanc, references the reference series and holds the label map
    client = pacs.client()
    segs = [pydicom.Dataset.from_json(s) for s in client.search_for_series(uid, search_filters={"Modality": "SEG"})]
    assert [str(s.SeriesInstanceUID) for s in segs] == [linfo["seg_series_uid"]]
    seg = client.retrieve_series(uid, linfo["seg_series_uid"])[0]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == store.get_image_info(uid)["reference_series"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Parotid gland", "Tumor"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    headers = store.reference_headers(uid)
    got = writeback.read_seg(seg, headers)
    label = sitk.ReadImage(str(label_path))
    assert np.array_equal(got, writeback.label_on_sources(label, writeback._sorted_sources(headers)))
    # the reference series is the source: frames equal the label map slices (rows=J, cols=I)
    ref = read_study(store.get_image_uri(uid)).reference
    arr = sitk.GetArrayFromImage(label)
    assert got.shape == arr.shape and np.array_equal(got, arr) == same_grid(label, ref)
    assert set(np.unique(got)) == {0, 1, 2}


@needs_orthanc
def test_classification_sr_roundtrip(pacs, store, synth, uploaded):
    study_id, uid = sorted(uploaded.items())[-1]
    index = json.loads((synth / "datastore_v2.json").read_text())
    roi = index["objects"][study_id]["labels"]["final"]["info"]["roi"]
    classes = get_label_set("subtype4").classes
    probs = dict(zip(classes, np.linspace(0.1, 0.4, len(classes)) / np.linspace(0.1, 0.4, len(classes)).sum()))
    # the shape the app's classify task returns
    result = {"prediction": [{"idx": i, "label": k, "score": float(v)} for i, (k, v) in enumerate(probs.items())],
              "predicted_class": max(probs, key=probs.get), "malignancy_probability": 0.37,
              "undetermined": True, "roi": roi, "model": "parotid-cls-resnet", "version": "0.1.0"}
    out = store.write_classification(uid, result, write_sr="always")  # undetermined: stored only when asked
    assert out["status"] == "written"
    sr_uid = out["series_uid"]
    client = pacs.client()
    found = [pydicom.Dataset.from_json(s) for s in client.search_for_series(uid, search_filters={"Modality": "SR"})]
    assert sr_uid in [str(s.SeriesInstanceUID) for s in found]
    sr = client.retrieve_series(uid, sr_uid)[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {str(s.SeriesInstanceUID)
                for kw in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
                for e in sr.get(kw, []) for s in e.ReferencedSeriesSequence}
    assert evidence == {store.get_image_info(uid)["reference_series"]}
    grid = read_study(store.get_image_uri(uid)).reference
    back = writeback.read_classification_sr(sr, grid)
    assert list(back["probabilities"]) == list(probs)
    for k, v in probs.items():
        assert back["probabilities"][k] == pytest.approx(v, abs=1e-6)
    assert back["malignancy_probability"] == pytest.approx(0.37)
    assert back["undetermined"] is True
    assert back["predicted_class"] == max(probs, key=probs.get)
    assert back["roi"] == roi
    assert (back["model_name"], back["model_version"]) == ("parotid-cls-resnet", "0.1.0")


def new_sr_series(pacs, uid: str, before: dict) -> dict[str, int]:
    return {k: v for k, v in sr_series(pacs, uid).items() if k not in before}


def cls_result(roi, model: str, checksum: str, **kw) -> dict:
    """A classify_malignancy answer as the app returns it (checkpoint identity included)."""
    out = {"prediction": [{"idx": 0, "label": "benign", "score": 0.8}, {"idx": 1, "label": "malignant", "score": 0.2}],
           "predicted_class": "benign", "malignancy_probability": 0.2, "undetermined": False, "roi": list(roi),
           "model": model, "version": "0.1.0", "checkpoint": {"checksum": checksum, "modified_time": 1764000000}}
    out.update(kw)
    return out


@pytest.fixture(scope="module")
def sr_study(synth, uploaded):
    """(StudyInstanceUID, roi) of the study the SR write-back tests classify."""
    study_id, uid = sorted(uploaded.items())[0]
    index = json.loads((synth / "datastore_v2.json").read_text())
    return uid, index["objects"][study_id]["labels"]["final"]["info"]["roi"]


def test_sr_write_policy():
    """Which normalised results are stored: write_sr auto / always / never (no PACS involved)."""
    r = lambda **kw: writeback.normalise_result(cls_result([0, 2, 0, 2, 0, 2], "m", "SHA256:" + "0" * 64, **kw))  # noqa: E731
    out_of_dist = {"in_distribution": False, "score": 5.0, "threshold": 2.0, "reasons": ["not a parotid study"]}
    assert writeback.sr_skip_reason(r()) is None
    assert writeback.sr_skip_reason(r(input_check={**out_of_dist, "in_distribution": True})) is None
    assert "undetermined" in writeback.sr_skip_reason(r(undetermined=True))
    assert "not a parotid study" in writeback.sr_skip_reason(r(input_check=out_of_dist))
    assert writeback.sr_skip_reason(r(undetermined=True, input_check=out_of_dist), "always") is None
    assert "never" in writeback.sr_skip_reason(r(), "never")
    with pytest.raises(StudyError, match="write_sr must be one of"):
        writeback.sr_skip_reason(r(), "sometimes")


@needs_orthanc
def test_classification_sr_once_per_checkpoint(pacs, store, sr_study):
    uid, roi = sr_study
    before = sr_series(pacs, uid)
    result = cls_result(roi, "idem-model", "SHA256:" + "11" * 32)
    first = store.write_classification(uid, result)
    assert first["status"] == "written" and first["reason"] is None
    for _ in range(2):  # repeated classification: found on the PACS, not written again
        again = store.write_classification(uid, result)
        assert again["status"] == "reused" and again["series_uid"] == first["series_uid"]
        assert again["sop_instance_uid"] == first["sop_instance_uid"]
    assert new_sr_series(pacs, uid, before) == {first["series_uid"]: 1}
    # another checkpoint of the model: its own SR series, with its own version
    other = store.write_classification(uid, cls_result(roi, "idem-model", "SHA256:" + "22" * 32))
    assert other["status"] == "written" and other["series_uid"] != first["series_uid"]
    # another box classified by the first checkpoint: a second instance in the first series
    box = store.write_classification(uid, cls_result([roi[0] + 1, *roi[1:]], "idem-model", "SHA256:" + "11" * 32))
    assert box["status"] == "written" and box["series_uid"] == first["series_uid"]
    assert new_sr_series(pacs, uid, before) == {first["series_uid"]: 2, other["series_uid"]: 1}
    sr = pacs.client().retrieve_instance(uid, other["series_uid"], other["sop_instance_uid"])
    back = writeback.read_classification_sr(sr)
    assert back["model_version"] == "0.1.0+" + "22" * 6 and back["checkpoint_checksum"] == "SHA256:" + "22" * 32


@needs_orthanc
def test_server_replicas_store_one_sr(pacs, store, sr_study, tmp_path):
    """Replicas share nothing but the PACS: racing to store the same result, they store one instance."""
    from concurrent.futures import ThreadPoolExecutor

    uid, roi = sr_study
    replicas = [store, ParotidDICOMwebDatastore(pacs.client(), str(tmp_path / "replica"))]
    for rep in replicas:
        rep.reference_headers(uid)  # fetched beforehand: the race is on the write
    before = sr_series(pacs, uid)
    result = cls_result(roi, "race-model", "SHA256:" + "33" * 32)
    with ThreadPoolExecutor(len(replicas)) as ex:
        outs = list(ex.map(lambda rep: rep.write_classification(uid, result), replicas))
    assert len({o["series_uid"] for o in outs}) == 1 and len({o["sop_instance_uid"] for o in outs}) == 1
    assert {o["status"] for o in outs} <= {"written", "reused"} and "written" in {o["status"] for o in outs}
    assert new_sr_series(pacs, uid, before) == {outs[0]["series_uid"]: 1}


@needs_orthanc
def test_undetermined_or_unfamiliar_input_is_stored_only_when_asked(pacs, store, sr_study):
    uid, roi = sr_study
    ck = "SHA256:" + "44" * 32
    out_of_dist = {"in_distribution": False, "score": 5.0, "threshold": 2.0, "reasons": ["not a parotid study"]}
    before = sr_series(pacs, uid)
    for kw, mode, why in [({"undetermined": True}, "auto", "undetermined"),
                          ({"input_check": out_of_dist}, "auto", "not a parotid study"),
                          ({}, "never", "never")]:
        out = store.write_classification(uid, cls_result(roi, "policy-model", ck, **kw), write_sr=mode)
        assert out["status"] == "skipped" and why in out["reason"] and out["series_uid"] is None, out
    assert sr_series(pacs, uid) == before  # nothing reached the PACS
    # the good twins: in distribution, or asked explicitly
    ok = store.write_classification(uid, cls_result(roi, "policy-model", ck,
                                                    input_check={**out_of_dist, "in_distribution": True}))
    assert ok["status"] == "written"
    forced = store.write_classification(uid, cls_result([roi[0] + 1, *roi[1:]], "policy-model", ck, undetermined=True,
                                                        input_check=out_of_dist), write_sr="always")
    assert forced["status"] == "written"
    back = writeback.read_classification_sr(pacs.client().retrieve_instance(uid, forced["series_uid"],
                                                                            forced["sop_instance_uid"]))
    assert back["undetermined"] is True and back["input_check"]["in_distribution"] is False
    assert back["input_check"]["reasons"] == ["not a parotid study"]


@needs_orthanc
def test_mixed_b_value_dwi_series_is_split(pacs, store, tmp_path):
    """One diffusion series with b=0 and b=1000 images at the same positions (the usual scanner layout)."""
    rng = np.random.default_rng(3)
    uid, forr = generate_uid(), generate_uid()

    def vol(size, spacing, value):
        im = sitk.GetImageFromArray((rng.normal(0, 1, size[::-1]) + value).astype(np.float32))
        im.SetSpacing(spacing)
        return im

    t2 = vol((32, 30, 10), (0.8, 0.8, 3.0), 300)
    b0, b1000 = vol((16, 15, 6), (1.6, 1.6, 5.0), 200), vol((16, 15, 6), (1.6, 1.6, 5.0), 50)
    paths = save_series(volume_to_mr_series(t2, "t2_tse_tra_fs", uid, 2, frame_of_reference_uid=forr), str(tmp_path / "t2"))
    dwi_uid = generate_uid()
    s0 = volume_to_mr_series(b0, "ep2d_diff_tra", uid, 4, frame_of_reference_uid=forr, series_uid=dwi_uid)
    s1 = volume_to_mr_series(b1000, "ep2d_diff_tra", uid, 4, frame_of_reference_uid=forr, series_uid=dwi_uid)
    for i, (a, b) in enumerate(zip(s0, s1)):
        a.DiffusionBValue, b.DiffusionBValue = 0, 1000
        a.InstanceNumber, b.InstanceNumber = 2 * i + 1, 2 * i + 2
    paths += save_series(s0 + s1, str(tmp_path / "dwi"))
    pacs.upload_files(paths)
    study = read_study(store.get_image_uri(uid))
    assert study.sequences == ("T2", "DWI_B0", "DWI_B1000")
    info = store.get_image_info(uid)
    assert info["series"]["DWI_B0"] == info["series"]["DWI_B1000"] == dwi_uid
    assert info["reference_sequence"] == "T2"
    inside = study.array(["DWI_B0", "DWI_B1000"])[:, 10:20, 10:20, 3:7]
    assert abs(inside[0].mean() - 200) < 5 and abs(inside[1].mean() - 50) < 5
    # without b-values the split is a clear error
    uid2 = generate_uid()
    s = volume_to_mr_series(b0, "ep2d_diff_tra", uid2, 4)
    pacs.upload_files(save_series(s, str(tmp_path / "dwi2")))
    with pytest.raises(StudyError, match="DiffusionBValue"):
        store.get_image_uri(uid2)


@needs_orthanc
def test_study_without_known_sequence_is_a_clear_error(pacs, store, tmp_path):
    img = sitk.Image(8, 8, 4, sitk.sitkFloat32)
    uid = generate_uid()
    pacs.upload_files(save_series(volume_to_mr_series(img, "3-plane localizer", uid), str(tmp_path / "loc")))
    store.invalidate()
    assert uid in store.list_images()
    with pytest.raises(StudyError, match="no series with a recognisable MR sequence"):
        store.get_image_uri(uid)
    assert store.get_image_uri("1.2.3.4.5.6.7") == ""  # unknown study: "" like LocalDatastore
    with pytest.raises(StudyError, match="not found on the PACS"):
        store.reference_headers("1.2.3.4.5.6.7")


@needs_orthanc
def test_pydicom_scanner_files_give_clear_errors(pacs, store, tmp_path, caplog):
    """Real scanner DICOM nobody here wrote (pydicom's test data): a result or a StudyError, never a crash."""
    caplog.set_level(logging.DEBUG)
    from pydicom.data import get_testdata_file

    names = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
             "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_padded.dcm", "MR_truncated.dcm"]
    files = [f for f in (get_testdata_file(n) for n in names) if f]
    assert files, "pydicom test data missing"
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    uid, patient = str(first.StudyInstanceUID), str(first.PatientName)
    stored = 0
    for f in files:
        try:
            stored += pacs.upload_files([f])
        except requests.HTTPError:
            pass  # Orthanc may refuse a truncated file: that is the PACS's call
    assert stored >= 1
    store.invalidate()
    assert uid in store.list_images()
    with pytest.raises(StudyError, match="no series with a recognisable MR sequence"):
        store.get_image_uri(uid)
    # a site that maps every MR series to T2: the single 64x64 slice is refused as not 3D
    permissive = ParotidDICOMwebDatastore(pacs.client(), str(tmp_path / "c"), sequence_patterns={"T2": ["*"]})
    with pytest.raises(StudyError, match="not a 3D series|not 3D"):
        permissive.get_image_uri(uid)
    # every transfer syntax converts or fails with a StudyError
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue  # pydicom itself cannot parse it; it never reaches the datastore
        with pytest.raises(StudyError):
            datasets_to_image([ds], name=os.path.basename(f))
    assert patient not in caplog.text and "CompressedSamples" not in caplog.text
