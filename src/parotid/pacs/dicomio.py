"""Write a 3D SimpleITK volume as a single-frame MR Image Storage series (tests, demos, benchmarks).

The synthetic cohort's DICOM comes from ``parotid-synth --dicom``; this writer builds small
hand-made series for edge cases (duplicate / unknown series, changed studies)."""

from __future__ import annotations

import datetime
import os
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def volume_to_mr_series(
    img: sitk.Image,
    description: str,
    study_uid: str,
    series_number: int = 1,
    patient_id: str = "SYNTH-0000",
    patient_name: str = "Synthetic^Patient",
    frame_of_reference_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    arr = sitk.GetArrayFromImage(img)  # (K, J, I)
    lo, hi = float(arr.min()), float(arr.max())
    slope = max((hi - lo) / 30000.0, 1e-6) if (hi - lo) > 30000 or not np.allclose(arr, np.round(arr)) else 1.0
    inter = lo if slope != 1.0 else 0.0
    stored = np.round((arr - inter) / slope).astype(np.int16)
    d = np.array(img.GetDirection()).reshape(3, 3)
    iop = [float(v) for v in list(d[:, 0]) + list(d[:, 1])]
    sp = img.GetSpacing()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    now = datetime.datetime(2024, 1, 1, 12, 0, 0)
    out = []
    for k in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, patient_name, "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.Modality, ds.Manufacturer = "MR", "synthetic"
        ds.BodyPartExamined, ds.PatientPosition = "HEADNECK", "HFS"  # unpaired part: no Laterality (2C) needed
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, series_number, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 500, 10, 1, 1.5
        ds.ImagePositionPatient = [float(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [float(sp[1]), float(sp[0])]
        ds.SliceThickness = float(sp[2])
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, inter, "US"
        ds.PixelData = stored[k].tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        out.append(ds)
    return out


def save_series(datasets: Sequence[Dataset], folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = os.path.join(folder, f"{i + 1:04d}.dcm")
        ds.save_as(p, write_like_original=False)
        paths.append(p)
    return paths
