"""Parotid MRI: the library behind the MONAI Label app (apps/parotid) and the Slicer extension."""

from importlib.metadata import PackageNotFoundError, version as _dist_version

try:  # the one version: pyproject.toml's, as installed (app /info, checkpoints, DICOM SoftwareVersions)
    __version__ = _dist_version("parotid-mri")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "unknown"
