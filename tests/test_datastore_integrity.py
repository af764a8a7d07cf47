"""No silent data change in the study folder datastore (issue 9, item 3), over the REAL server:
- an existing study id is never replaced without `overwrite=true` (409 naming the id and how to
  overwrite); an explicit overwrite archives the old study, its labels and label info in the same request;
- study ids taken from file names keep every dotted part (only the image extension is stripped);
- label info of an unknown study or tag is a 404 naming it;
- a label off the study's grid is refused with what differs (size, origin, spacing, direction), both values.
Each bad case next to its good twin. Data are SYNTHETIC (the bundled sample cohort)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import requests
import SimpleITK as sitk

from conftest import SAMPLE
from parotid.study import read_study


def _objects(server) -> dict:
    return requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]


def _put_study(server, data: bytes, filename: str, **params) -> requests.Response:
    return requests.put(f"{server.url}/datastore/image", params=params, files={"file": (filename, data)}, timeout=60)


def _label(study, tmp_path, value: int = 2, origin_shift=(0.0, 0.0, 0.0), spacing=None) -> bytes:
    arr = np.zeros(study.shape, np.uint8)
    arr[10:16, 10:16, 4:8] = value
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    img.CopyInformation(study.reference)
    img.SetOrigin([o + d for o, d in zip(img.GetOrigin(), origin_shift)])
    if spacing is not None:
        img.SetSpacing(spacing)
    p = tmp_path / "label.nii.gz"
    sitk.WriteImage(img, str(p), useCompression=True)
    return p.read_bytes()


def _put_label(server, sid: str, data: bytes, info: dict) -> requests.Response:
    return requests.put(f"{server.url}/datastore/label", params={"image": sid, "tag": "final"},
                        files={"label": (f"{sid}.nii.gz", data)}, data={"params": json.dumps(info)}, timeout=60)


def test_existing_study_is_not_replaced_without_overwrite(server, studies_copy, sample_ids, tmp_path):
    first, second = (SAMPLE / f"{s}.nii.gz" for s in sample_ids[:2])
    sid = "overwrite-me"
    try:
        assert _put_study(server, first.read_bytes(), "a.nii.gz", image=sid).status_code == 200
        label = _label(read_study(str(first)), tmp_path)
        info = {"tumor_class": "warthin", "roi": [10, 16, 10, 16, 4, 8]}
        assert _put_label(server, sid, label, info).status_code == 200

        # another study under the same id: refused, nothing changes
        r = _put_study(server, second.read_bytes(), "b.nii.gz", image=sid)
        assert r.status_code == 409, r.text
        assert sid in r.json()["detail"] and "overwrite=true" in r.json()["detail"]
        got = requests.get(f"{server.url}/datastore/image", params={"image": sid}, timeout=30)
        assert got.content == first.read_bytes()
        linfo = requests.get(f"{server.url}/datastore/label/info", params={"label": sid, "tag": "final"}, timeout=30)
        assert linfo.status_code == 200 and linfo.json()["tumor_class"] == "warthin", linfo.text

        # explicit overwrite: the new study, no label left attached, the old ones archived
        r = _put_study(server, second.read_bytes(), "b.nii.gz", image=sid, overwrite="true")
        assert r.status_code == 200, r.text
        archived = r.json()["archived"]
        got = requests.get(f"{server.url}/datastore/image", params={"image": sid}, timeout=30)
        assert got.content == second.read_bytes()
        assert _objects(server)[sid]["labels"] == {}
        r = requests.get(f"{server.url}/datastore/label/info", params={"label": sid, "tag": "final"}, timeout=30)
        assert r.status_code == 404, r.text
        folder = studies_copy / archived
        assert (folder / f"{sid}.nii.gz").read_bytes() == first.read_bytes()
        assert (folder / "labels" / "final" / f"{sid}.nii.gz").read_bytes() == label
        entry = json.loads((folder / "entry.json").read_text())
        assert entry["labels"]["final"]["info"]["tumor_class"] == "warthin"
        assert entry["labels"]["final"]["info"]["roi"] == info["roi"]
        # the archive is not served as a study
        assert not [k for k in _objects(server) if "archive" in k]
    finally:
        requests.delete(f"{server.url}/datastore/image", params={"id": sid}, timeout=30)


def test_ids_from_dotted_file_names_keep_every_part(server, sample_ids):
    data = (SAMPLE / f"{sample_ids[0]}.nii.gz").read_bytes()
    uploads = {"1.2.840.113619.2.55.nii.gz": data, "1.3.12.2.1107.5.2.nii.gz": data,
               "1.3.12.2.1107.5.9.nii": gzip.decompress(data), "plain_name.nii.gz": data}
    ids = []
    try:
        for name, payload in uploads.items():
            r = _put_study(server, payload, name)
            assert r.status_code == 200, r.text
            ids.append(r.json()["image"])
        assert ids == ["1.2.840.113619.2.55", "1.3.12.2.1107.5.2", "1.3.12.2.1107.5.9", "plain_name"]
        assert set(ids) <= set(_objects(server))
        # the same file name again is the same id: refused, not a silent replacement
        r = _put_study(server, data, "1.2.840.113619.2.55.nii.gz")
        assert r.status_code == 409 and "1.2.840.113619.2.55" in r.json()["detail"], r.text
    finally:
        for sid in ids:
            requests.delete(f"{server.url}/datastore/image", params={"id": sid}, timeout=30)


def test_label_info_of_unknown_study_or_tag_is_404(server, sample_ids):
    url = f"{server.url}/datastore/label/info"
    ok = requests.get(url, params={"label": sample_ids[0], "tag": "final"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["tumor_class"], ok.text
    for params, word in (({"label": "no-such-study", "tag": "final"}, "no-such-study"),
                         ({"label": sample_ids[0], "tag": "no-such-tag"}, "no-such-tag")):
        r = requests.get(url, params=params, timeout=30)
        assert r.status_code == 404 and word in r.json()["detail"], r.text


def test_geometry_mismatch_says_what_differs(server, sample_ids, tmp_path):
    src = SAMPLE / f"{sample_ids[3]}.nii.gz"
    study = read_study(str(src))
    sid = "geometry-check"
    assert _put_study(server, src.read_bytes(), "g.nii.gz", image=sid).status_code == 200
    try:
        r = _put_label(server, sid, _label(study, tmp_path, origin_shift=(0.0, 0.0, 2.5)), {})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "origin" in detail and "spacing" not in detail and "size" not in detail, detail
        z = study.image.GetOrigin()[2]
        assert f"{z:.6g}" in detail and f"{z + 2.5:.6g}" in detail, detail
        spacing = [s * 2 for s in study.image.GetSpacing()]
        detail = _put_label(server, sid, _label(study, tmp_path, spacing=spacing), {}).json()["detail"]
        assert "spacing" in detail and "origin" not in detail, detail
        assert _objects(server)[sid]["labels"] == {}
        r = _put_label(server, sid, _label(study, tmp_path), {"tumor_class": "warthin"})  # the good twin
        assert r.status_code == 200, r.text
    finally:
        requests.delete(f"{server.url}/datastore/image", params={"id": sid}, timeout=30)
