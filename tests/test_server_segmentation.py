"""Segmentation tasks over the real MONAI Label server: /info, geometry of results, bad inputs (4xx JSON)."""

from __future__ import annotations

import gzip
import io
import json

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk

from parotid.study import check_roi, read_study, study_from_array, write_study


def infer(server, model, image="", params=None, files=None, output=None):
    url = f"{server.url}/infer/{model}"
    q = {"image": image} if image else {}
    if output:
        q["output"] = output
    return requests.post(url, params=q, data={"params": json.dumps(params or {})}, files=files, timeout=120)


def assert_4xx(r, status, fragment):
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert fragment.lower() in body["detail"].lower(), body


def test_info_lists_tasks_with_type_labels_and_sequences(server):
    info = requests.get(server.url + "/info/", timeout=30).json()
    seg = info["models"]["segmentation"]
    assert seg["type"] == "segmentation"
    assert seg["labels"] == {"background": 0, "parotid_gland": 1, "tumor": 2}
    assert set(seg["sequences"]) <= {"T1", "T2", "CET1", "DWI_B0", "DWI_B1000", "ADC"} and seg["sequences"]
    box = info["models"]["contour_box"]
    assert box["type"] == "segmentation" and "roi" in box["config"]
    assert {"segmentation", "contour_box"} <= set(info["trainers"])
    assert {"random", "first"} <= set(info["strategies"])


def test_datastore_holds_studies_not_sequences(server, sample_ids):
    ds = requests.get(server.url + "/datastore/?output=all", timeout=30).json()["objects"]
    assert len(sample_ids) >= 8
    for sid in sample_ids:
        assert "final" in ds[sid]["labels"], sid
        info = ds[sid]["labels"]["final"]["info"]
        assert info["tumor_class"] in ("pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant")
        assert len(info["roi"]) == 6


def test_uploaded_study_becomes_the_next_sample(server, studies_copy, sample_ids):
    data = (studies_copy / f"{sample_ids[2]}.nii.gz").read_bytes()
    r = requests.put(f"{server.url}/datastore/", params={"image": "uploaded_study_1"},
                     files={"file": ("uploaded_study_1.nii.gz", data)}, timeout=60)
    assert r.status_code == 200, r.text
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": "uploaded_study_1"}, timeout=30).json()
    assert info["sequences"] == list(read_study(str(studies_copy / f"{sample_ids[2]}.nii.gz")).sequences)
    ds = requests.get(server.url + "/datastore/?output=all", timeout=30).json()["objects"]
    unlabeled = {k for k, v in ds.items() if "final" not in v.get("labels", {})}
    assert "uploaded_study_1" in unlabeled
    for strategy in ("first", "random"):
        nxt = requests.post(f"{server.url}/activelearning/{strategy}", json={}, timeout=30).json()
        assert nxt["id"] in unlabeled  # studies, never single sequences; only unlabeled ones


def _label_from_response(r) -> sitk.Image:
    assert r.status_code == 200, r.text[:300]
    path = "/tmp/_parotid_test_label.nii.gz"
    with open(path, "wb") as f:
        f.write(r.content)
    return sitk.ReadImage(path)


def test_segmentation_label_has_reference_geometry(server, studies_copy, sample_ids):
    sid = sample_ids[0]
    study = read_study(str(studies_copy / f"{sid}.nii.gz"))
    label = _label_from_response(infer(server, "segmentation", sid, output="image"))
    assert label.GetSize() == study.image.GetSize()
    assert np.allclose(label.GetSpacing(), study.image.GetSpacing())
    assert np.allclose(label.GetOrigin(), study.image.GetOrigin(), atol=1e-4)
    assert np.allclose(label.GetDirection(), study.image.GetDirection(), atol=1e-6)
    values = set(np.unique(sitk.GetArrayFromImage(label)).tolist())
    assert values <= {0, 1, 2} and 1 in values
    js = infer(server, "segmentation", sid, output="json").json()
    assert js["volumes_ml"]["parotid_gland"] > 5
    check_roi(js["tumor_roi"], study.shape)  # the index tumour's box, usable as a prompt


def test_box_contour_stays_near_box(server, studies_copy, sample_ids):
    sid = sample_ids[0]
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": sid, "tag": "final"}, timeout=30).json()
    roi = info["roi"]
    label = sitk.GetArrayFromImage(_label_from_response(infer(server, "contour_box", sid, {"roi": roi}, output="image")))
    lab = np.transpose(label, (2, 1, 0))
    assert (lab == 2).sum() > 0
    inside = lab[roi[0]:roi[1], roi[2]:roi[3], roi[4]:roi[5]]
    assert (inside == 2).sum() / (lab == 2).sum() > 0.8


# ----------------------------------------------------------------- bad inputs
def _nifti_bytes(img: sitk.Image) -> bytes:
    path = "/tmp/_parotid_bad.nii.gz"
    sitk.WriteImage(img, path)
    return open(path, "rb").read()


@pytest.fixture(scope="module")
def good_study_bytes(studies_copy, sample_ids) -> bytes:
    return (studies_copy / f"{sample_ids[0]}.nii.gz").read_bytes()


def _study_only(studies_copy, sid, keep, tmp_path) -> bytes:
    s = read_study(str(studies_copy / f"{sid}.nii.gz"))
    sub = study_from_array(s.array(keep), keep, s.reference)
    p = str(tmp_path / "sub.nii.gz")
    write_study(sub, p)
    return open(p, "rb").read()


def test_unknown_study_and_model(server, sample_ids):
    assert_4xx(infer(server, "segmentation", "no_such_study"), 404, "unknown study")
    assert_4xx(infer(server, "no_such_model", sample_ids[0]), 404, "unknown model")


def test_study_lacking_a_needed_sequence(server, studies_copy, sample_ids, tmp_path):
    data = _study_only(studies_copy, sample_ids[0], ["CET1"], tmp_path)
    r = infer(server, "segmentation", files={"file": ("only_ce.nii.gz", data)})
    assert_4xx(r, 422, "lacks sequence")


@pytest.mark.parametrize("kind", ["2d", "4d", "truncated", "garbage", "nan", "plain3d"])
def test_bad_image_uploads(server, studies_copy, sample_ids, good_study_bytes, tmp_path, kind):
    if kind == "2d":
        data, msg = _nifti_bytes(sitk.Image(64, 64, sitk.sitkFloat32)), "3D"
    elif kind == "4d":
        img = nib.Nifti1Image(np.zeros((16, 16, 8, 3), np.float32), np.eye(4))
        img.header["descrip"] = b"parotid:CET1"
        buf = io.BytesIO()
        buf.write(gzip.compress(img.to_bytes()))
        data, msg = buf.getvalue(), "4D"
    elif kind == "truncated":
        data, msg = good_study_bytes[: len(good_study_bytes) // 2], "truncated"
    elif kind == "garbage":
        data, msg = gzip.compress(b"this is not an image" * 50), "corrupt"
    elif kind == "nan":
        s = read_study(str(studies_copy / f"{sample_ids[0]}.nii.gz"))
        arr = s.array()
        arr[0, 5, 5, 2] = np.nan
        p = str(tmp_path / "nan.nii.gz")
        write_study(study_from_array(arr, s.sequences, s.reference), p)
        data, msg = open(p, "rb").read(), "NaN"
    else:
        data, msg = _nifti_bytes(sitk.Image(32, 32, 8, sitk.sitkFloat32)), "not a parotid study"
    # through /infer (a one-off upload) ...
    assert_4xx(infer(server, "segmentation", files={"file": (f"bad_{kind}.nii.gz", data)}), 422, msg)
    # ... and through the datastore (nothing unusable gets in)
    r = requests.put(f"{server.url}/datastore/", params={"image": f"bad_{kind}"},
                     files={"file": (f"bad_{kind}.nii.gz", data)}, timeout=60)
    assert_4xx(r, 422, msg)
    assert f"bad_{kind}" not in requests.get(server.url + "/datastore/?output=all", timeout=30).json()["objects"]


@pytest.mark.parametrize(
    "roi, msg",
    [
        (None, "needs a box"),
        ([0, 10, 0, 10], "6 voxel indices"),
        ([0, 10, 0, 10, 0, 4, 5], "6 voxel indices"),
        ([5, 5, 0, 10, 0, 4], "empty"),
        ([10, 5, 0, 10, 0, 4], "inverted"),
        ([0, 10, 0, 10, 0, 500], "outside the image"),
        ([-3, 10, 0, 10, 0, 4], "outside the image"),
        (["a", 10, 0, 10, 0, 4], "integers"),
    ],
)
def test_bad_roi(server, sample_ids, roi, msg):
    assert_4xx(infer(server, "contour_box", sample_ids[0], {"roi": roi} if roi is not None else {}), 422, msg)


def test_bad_labels_are_refused_and_good_ones_kept(server, studies_copy, sample_ids):
    sid = sample_ids[1]
    study = read_study(str(studies_copy / f"{sid}.nii.gz"))
    wrong_grid = _nifti_bytes(sitk.Image(10, 10, 10, sitk.sitkUInt8))
    r = requests.put(f"{server.url}/datastore/label", params={"image": sid, "tag": "final"},
                     files={"label": ("l.nii.gz", wrong_grid)}, data={"params": "{}"}, timeout=60)
    assert_4xx(r, 422, "does not match")
    lab = sitk.Image(study.reference)
    lab = sitk.Cast(lab, sitk.sitkUInt8)
    lab.CopyInformation(study.reference)
    good = _nifti_bytes(lab)
    r = requests.put(f"{server.url}/datastore/label", params={"image": sid, "tag": "final"},
                     files={"label": ("l.nii.gz", good)}, data={"params": json.dumps({"tumor_class": "cancer"})}, timeout=60)
    assert_4xx(r, 422, "tumor_class")
    r = requests.put(f"{server.url}/datastore/label", params={"image": "no_such_study", "tag": "final"},
                     files={"label": ("l.nii.gz", good)}, data={"params": "{}"}, timeout=60)
    assert_4xx(r, 404, "unknown study")
    # the refused saves did not touch the existing label info
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": sid, "tag": "final"}, timeout=30).json()
    assert info["tumor_class"] in ("pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant")


def test_server_alive_after_bad_inputs(server):
    assert server.alive()
    assert server.proc.poll() is None
