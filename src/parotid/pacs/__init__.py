"""PACS integration: a study-grouping DICOMweb datastore for MONAI Label and DICOM write-back.

* :mod:`parotid.pacs.datastore` — ``make_dicomweb_datastore(studies_url, conf)`` (called by the app's
  ``init_datastore`` when ``--studies`` is an http(s) URL): one MONAI Label image per
  StudyInstanceUID, its MR series grouped into sequences and assembled into a cached study file.
* :mod:`parotid.pacs.convert` — series grouping by SeriesDescription and DICOM -> SimpleITK.
* :mod:`parotid.pacs.writeback` — DICOM SEG / Comprehensive 3D SR (TID 1500) with highdicom, STOW-RS.
* :mod:`parotid.pacs.orthanc` — start/stop the loopback Orthanc of ``deploy/orthanc`` (tests, benchmarks).

Logging never includes patient-identifying attributes: studies are logged by StudyInstanceUID or by
``phi_safe_id`` (a short hash).
"""

from parotid.pacs.client import make_client  # noqa: F401
