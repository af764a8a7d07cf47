"""Deterministic SYNTHETIC parotid MRI phantom cohorts (``parotid-synth``). No patient data.

- :func:`parotid.synth.phantom.generate` renders one study in memory (native acquisitions,
  assembled study on the reference grid, label map, index-tumour roi);
- :func:`parotid.synth.cohort.write_cohort` writes a cohort folder (docs/dev/CONTRACT.md);
- :mod:`parotid.synth.dicom` writes DICOM MR series; :mod:`parotid.synth.features` holds the
  simple tumour statistics used to check the class structure. See ``README.md`` here.
"""

from parotid.synth.phantom import CLASSES, PREVALENCE, generate, sample_case, study_id  # noqa: F401
