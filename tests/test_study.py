"""Study model: resampling in physical space, study files, box validation, bad volumes."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import SimpleITK as sitk

from parotid.sequences import match_sequence, reference_key
from parotid.study import (StudyError, assemble_study, check_roi, read_study, roi_from_mask, write_study,
                           validate_volume)


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def field(points: np.ndarray) -> np.ndarray:
    """A smooth function of physical position (mm): what every sequence 'sees' at a point."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return 100 + 40 * np.sin(x / 9.0) + 30 * np.cos(y / 11.0) + 2.0 * z


def sampled(size, spacing, origin, direction) -> sitk.Image:
    """An image whose voxel values are `field` at each voxel centre's physical position."""
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction).ravel()))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    d = np.asarray(direction).reshape(3, 3)
    phys = np.asarray(origin) + (idx * np.asarray(spacing)) @ d.T
    vals = field(phys).reshape(size)  # (I, J, K)
    out = sitk.GetImageFromArray(vals.T.astype(np.float32))
    out.CopyInformation(img)
    return out


@pytest.fixture(scope="module")
def geometries():
    """Reference CE-T1 (oblique) and a T2 / DWI with other spacing, extent and orientation."""
    ce = sampled((60, 50, 14), (1.5, 1.5, 3.0), (-45.0, -40.0, -20.0), rotation(2, 8) @ rotation(0, 3))
    t2 = sampled((130, 110, 12), (0.75, 0.75, 4.0), (-50.0, -45.0, -24.0), rotation(2, -5))
    dwi = sampled((52, 45, 12), (2.0, 2.0, 4.0), (52.0, -47.0, -25.0), np.diag([-1.0, 1.0, 1.0]) @ rotation(1, 4))
    return {"CET1": ce, "T2": t2, "DWI_B0": dwi}


def test_physical_point_keeps_its_content_across_sequences(geometries):
    study = assemble_study(geometries)
    assert study.sequences == ("T2", "CET1", "DWI_B0")  # canonical order, not insertion order
    assert set(study.sequences) == {"CET1", "T2", "DWI_B0"}
    ref = geometries["CET1"]
    assert study.shape == ref.GetSize()
    assert np.allclose(study.image.GetDirection(), ref.GetDirection())
    arr = study.array()  # (C, I, J, K)
    # interior voxels (away from each sequence's coverage edge): all channels show the same field value
    idx = np.stack(np.meshgrid(np.arange(10, 50), np.arange(10, 40), np.arange(3, 11), indexing="ij"), -1).reshape(-1, 3)
    phys = np.array([ref.TransformIndexToPhysicalPoint(tuple(int(v) for v in p)) for p in idx])
    expected = field(phys)
    for c, seq in enumerate(study.sequences):
        got = arr[c][idx[:, 0], idx[:, 1], idx[:, 2]]
        # linear interpolation of a smooth field: small error, far below the field's range (~150)
        assert np.median(np.abs(got - expected)) < 1.5, seq
        assert np.percentile(np.abs(got - expected), 95) < 6.0, seq
    ref_c = study.channel("CET1")
    assert np.array_equal(arr[ref_c], np.transpose(sitk.GetArrayFromImage(ref), (2, 1, 0)))


def test_reference_preference_and_explicit_reference(geometries):
    assert reference_key(["T2", "DWI_B0"]) == "T2"
    assert reference_key(["T2", "CET1"]) == "CET1"
    s = assemble_study(geometries, reference="T2")
    assert s.shape == geometries["T2"].GetSize()
    with pytest.raises(StudyError, match="reference"):
        assemble_study(geometries, reference="ADC")


def test_study_file_round_trip(tmp_path, geometries):
    study = assemble_study(geometries)
    path = str(tmp_path / "s.nii.gz")
    write_study(study, path)
    back = read_study(path)
    assert back.sequences == study.sequences
    assert np.allclose(back.array(), study.array())
    assert np.allclose(back.image.GetOrigin(), study.image.GetOrigin())
    assert np.allclose(back.image.GetDirection(), study.image.GetDirection(), atol=1e-6)
    write_study(study, path, as_int16=True)
    assert np.abs(read_study(path).array() - study.array()).max() <= 0.5 + 1e-6


def test_sequence_name_matching():
    assert match_sequence("T2 TSE FS") == "T2"
    assert match_sequence("CE-T1 VIBE") == "CET1"
    assert match_sequence("t1_post_gad") == "CET1"
    assert match_sequence("ep2d_diff ADC") == "ADC"
    assert match_sequence("DWI b1000") == "DWI_B1000"
    assert match_sequence("DWI b0") == "DWI_B0"
    assert match_sequence("T1 TSE") == "T1"
    assert match_sequence("localizer") is None


@pytest.mark.parametrize(
    "roi, message",
    [
        ([0, 10, 0, 10], "6 voxel indices"),
        ("0,10,0,10,0,5", "6 voxel indices"),
        ([0, 10, 0, 10, 0, "a"], "integers"),
        ([0, 10.5, 0, 10, 0, 5], "whole voxel"),
        ([5, 5, 0, 10, 0, 5], "empty on axis i"),
        ([0, 10, 8, 3, 0, 5], "inverted on axis j"),
        ([0, 10, 0, 10, 0, 30], "outside the image"),
        ([-1, 10, 0, 10, 0, 5], "outside the image"),
    ],
)
def test_bad_roi(roi, message):
    with pytest.raises(StudyError, match=message):
        check_roi(roi, (60, 50, 14))


def test_good_roi_and_roi_from_mask():
    assert check_roi([0, 60, 0, 50, 0, 14], (60, 50, 14)) == (slice(0, 60), slice(0, 50), slice(0, 14))
    m = np.zeros((20, 20, 8), bool)
    m[3:7, 5:9, 2:4] = True
    assert roi_from_mask(m) == [3, 7, 5, 9, 2, 4]
    assert roi_from_mask(np.zeros((4, 4, 4))) is None


def test_bad_volumes(tmp_path):
    two_d = sitk.Image(32, 32, sitk.sitkFloat32)
    with pytest.raises(StudyError, match="3D"):
        validate_volume(two_d, "T2")
    four_d = sitk.Image([8, 8, 8, 3], sitk.sitkFloat32)
    with pytest.raises(StudyError, match="3D"):
        validate_volume(four_d, "T2")
    thin = sitk.Image([32, 32, 1], sitk.sitkFloat32)
    with pytest.raises(StudyError, match="not 3D"):
        validate_volume(thin, "T2")
    arr = np.ones((6, 8, 8), np.float32)
    arr[2, 3, 4] = np.nan
    with pytest.raises(StudyError, match="NaN"):
        assemble_study({"CET1": sitk.GetImageFromArray(arr)})
    with pytest.raises(StudyError, match="unknown sequence"):
        assemble_study({"FLAIR": sitk.GetImageFromArray(np.ones((6, 8, 8), np.float32))})


def test_bad_study_files(tmp_path, geometries):
    good = tmp_path / "good.nii.gz"
    write_study(assemble_study(geometries), str(good))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(StudyError, match="corrupt or truncated"):
        read_study(str(truncated))
    raw = tmp_path / "short.nii"
    sitk.WriteImage(geometries["T2"], str(raw))
    raw.write_bytes(raw.read_bytes()[:-1000])
    with pytest.raises(StudyError, match="truncated NIfTI"):
        read_study(str(raw))
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(StudyError, match="corrupt or unreadable"):
        read_study(str(garbage))
    plain = tmp_path / "plain.nii.gz"
    sitk.WriteImage(geometries["T2"], str(plain))
    with pytest.raises(StudyError, match="not a parotid study"):
        read_study(str(plain))
    with pytest.raises(StudyError, match="not found"):
        read_study(str(tmp_path / "missing.nii.gz"))
