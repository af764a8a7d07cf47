"""Slicer-free logic of the ParotidTumor 3D Slicer extension.

Imports only the standard library, numpy, requests and SimpleITK (all bundled with 3D Slicer), never
slicer / vtk / qt / ctk, and never the server-side ``parotid`` package (not installed in Slicer): the
few pieces of it the client needs (sequence table, study-file assembly) are re-implemented here and
pinned to the server's behaviour by ``tests/test_slicer_lib*.py``.

One submodule is the exception and is not imported here: ``ParotidTumorLib.mrml``, the MRML-bound
logic, needs Slicer's MRML classes (the Slicer application or the ``slicer-core`` wheel) and nothing
else (tested on real MRML by ``tests/test_slicer_mrml*.py``).
"""

from .client import ParotidClient, normalize_url, training_progress  # noqa: F401
from .errors import ServerError  # noqa: F401
from .geometry import (  # noqa: F401
    array_from_image,
    box_to_roi,
    ijk_to_ras_from_sitk,
    image_from_array,
    roi_corners_ras,
    roi_to_box,
)
from .responses import InferResponse, parse_infer_response, parse_multipart  # noqa: F401
from .results import ClassificationResult, ResultVolume, input_check_summary, sequences_summary  # noqa: F401
from .sequences import SEQUENCE_KEYS, auto_assign, check_distinct, match_sequence, reference_key  # noqa: F401
from .models import ModelInfo, models_from_info, models_summary_html, tumor_classes_from_info  # noqa: F401
from .labels import roi_from_label, write_label_map  # noqa: F401
from .study import assemble, make_study_id, read_components, write  # noqa: F401
from . import background, client, geometry, labels, models, responses, results, sampledata, sequences, study, tasks  # noqa: F401,E402

__version__ = "0.1.0"  # = parotid.__version__ (this lib runs without it; tests/test_slicer_lib.py checks)
