"""Acquisition profiles ("sites") for ``parotid-synth --profile``: what a scanner changes, as data.

A profile changes only the acquisition: field-strength-like contrast and SNR, voxel size, slice
gap, coil bias, fat-suppression quality, DWI misregistration, ADC calibration and the vendor's
arbitrary intensity scale. The patient (anatomy, tumour biology, clinical variables, split) is drawn
from the same random streams whatever the profile, so the same seed gives the same patients and
the same labels (rendered on the profile's reference grid). ``default`` is the historical
generator, bit-identical to the output before profiles existed. ALL DATA ARE SYNTHETIC.

Per-protocol keys are the synth protocols ``T1``, ``T2``, ``CET1``, ``DWI`` (``phantom.PROTOCOLS``).
Parameters (neutral value in brackets):

- ``noise`` [1]: multiplier of the Rician sigma per protocol (SNR ∝ 1/noise);
- ``contrast`` [1]: exponent γ applied to the clean signal around a pivot (muscle signal of that
  channel): ``s' = pivot * (s / pivot) ** γ`` — γ > 1 widens tissue contrast, γ < 1 compresses it.
  Not applied to DWI (it would rescale the ADC; the ADC has its own ``adc_scale``);
- ``spacing`` [protocol spacing]: (in-plane x, in-plane y, slice spacing) mm, same FOV;
- ``slice_gap`` [0]: gap between slices, mm (slice thickness = spacing − gap: thinner slice
  profile, same slice positions);
- ``bias`` [1]: multiplier of the smooth coil-sensitivity field's log-amplitude;
- ``fat_residual`` [0]: fraction of the unsuppressed fat signal left in fat-suppressed channels
  (T2, CE-T1, DWI b0) for fat and fatty marrow;
- ``dwi_shift_mm`` [0]: DWI misregistration / EPI distortion along its phase-encode (J) axis, mm
  (sign drawn per study from its own stream);
- ``adc_scale`` [1]: effective / nominal b-value (gradient calibration): the stored ADC, computed
  with the nominal b = 1000, is multiplied by it (a relative ADC offset);
- ``gain`` [1]: vendor intensity scale per protocol (noise scales with it: SNR unchanged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Unsuppressed fat signal per fat-suppressed channel (synthetic units, phantom.TISSUE scale): fat is
# bright on T2 TSE without fat saturation and on T1-weighted gradient echo; marrow a little less.
FAT_UNSUPPRESSED = {"fat": {"T2": 650.0, "CET1": 850.0, "B0": 420.0},
                    "marrow": {"T2": 560.0, "CET1": 700.0, "B0": 360.0}}

PROFILES: dict[str, dict] = {
    # The generator as it always was: 3 T-like (seed 000: 3 T, CE-T1 VIBE, RESOLVE DWI 2 x 2 x 4 mm,
    # slices 3-4 mm). Every parameter neutral.
    "default": {
        "description": "historical generator (3 T-like, seed 000 protocol); bit-identical to earlier output",
    },
    # Site B: 1.5 T, another vendor, 2D protocol with thicker slices.
    "siteB_1.5T": {
        "description": "1.5 T, vendor B, 5 mm slices + 1 mm gap, weaker bias, poorer fat saturation",
        # SNR grows ~linearly with B0; 1.5 T gives roughly 0.55-0.6 x the SNR of 3 T -> sigma x 1.8.
        "noise": {"T1": 1.8, "T2": 1.8, "CET1": 1.8, "DWI": 1.8},
        # T1 times shorten and spread more at 1.5 T -> slightly more T1 contrast; T2 contrast about the same.
        "contrast": {"T1": 1.15, "T2": 1.0, "CET1": 1.1},
        # seed 001: slice 4.0-7.2 mm, pixel 0.4-0.97 mm; 2D TSE at 1.5 T: coarser matrix.
        "spacing": {"T1": (1.0, 1.0, 5.0), "T2": (0.9, 0.9, 5.0), "CET1": (1.0, 1.0, 5.0), "DWI": (2.2, 2.2, 5.0)},
        "slice_gap": {"T1": 1.0, "T2": 1.0, "CET1": 1.0, "DWI": 1.0},  # 20 % gap, common for 2D TSE
        # B1 inhomogeneity (dielectric effect) grows with field strength: weaker at 1.5 T.
        "bias": {"T1": 0.6, "T2": 0.6, "CET1": 0.6, "DWI": 0.6},
        # fat-water shift 220 Hz at 1.5 T vs 440 Hz at 3 T: spectral fat saturation less selective.
        "fat_residual": 0.15,
        "dwi_shift_mm": 1.5,   # EPI distortion scales with B0: smaller at 1.5 T
        "adc_scale": 0.97,     # multicentre ADC phantom studies: a few % bias between scanners
        # vendor intensity scale (arbitrary units; DICOM values are not comparable across vendors)
        "gain": {"T1": 0.55, "T2": 0.7, "CET1": 0.6, "DWI": 1.4},
    },
    # Site C: 3 T, another vendor, thin 3D CE-T1, single-shot EPI DWI.
    "siteC_3T_ssEPI": {
        "description": "3 T, vendor C, thin 3D CE-T1, single-shot EPI DWI (more distortion), strong bias",
        "noise": {"T1": 0.9, "T2": 0.9, "CET1": 1.2, "DWI": 1.3},   # thinner CE-T1 voxels and ss-EPI cost SNR
        "contrast": {"T1": 0.9, "T2": 1.05, "CET1": 1.0},         # longer T1 at 3 T: flatter T1 contrast
        "spacing": {"CET1": (1.2, 1.2, 2.0), "DWI": (2.5, 2.5, 4.0)},  # 003: slice down to 1.5 mm (3D)
        "bias": {"T1": 1.8, "T2": 1.8, "CET1": 1.8, "DWI": 1.8},  # strong dielectric shading at 3 T
        "fat_residual": 0.05,
        "dwi_shift_mm": 4.0,   # single-shot EPI at 3 T (vs readout-segmented RESOLVE in seed 000)
        "adc_scale": 1.06,     # relative ADC offset of +6 % (gradient calibration)
        "gain": {"T1": 1.6, "T2": 2.5, "CET1": 1.8, "DWI": 0.7},
    },
    # Site D: older 1.5 T with thick slices (seed 003: slice up to 10 mm).
    "siteD_1.5T_thick": {
        "description": "older 1.5 T, 7 mm slices + 1.5 mm gap, low SNR, poor fat saturation, ADC -6 %",
        "noise": {"T1": 2.2, "T2": 2.2, "CET1": 2.2, "DWI": 2.2},
        "contrast": {"T1": 1.2, "T2": 0.9, "CET1": 0.85},
        "spacing": {"T1": (1.1, 1.1, 7.0), "T2": (1.0, 1.0, 7.0), "CET1": (1.2, 1.2, 7.0), "DWI": (2.5, 2.5, 7.0)},
        "slice_gap": {"T1": 1.5, "T2": 1.5, "CET1": 1.5, "DWI": 1.5},
        "bias": {"T1": 0.7, "T2": 0.7, "CET1": 0.7, "DWI": 0.7},
        "fat_residual": 0.3,   # inhomogeneous / failed fat saturation in the neck (air-tissue interfaces)
        "dwi_shift_mm": 3.0,
        "adc_scale": 0.94,
        "gain": {"T1": 0.4, "T2": 0.45, "CET1": 0.5, "DWI": 2.0},
    },
}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    noise: dict = field(default_factory=dict)
    contrast: dict = field(default_factory=dict)
    spacing: dict = field(default_factory=dict)
    slice_gap: dict = field(default_factory=dict)
    bias: dict = field(default_factory=dict)
    fat_residual: float = 0.0
    dwi_shift_mm: float = 0.0
    adc_scale: float = 1.0
    gain: dict = field(default_factory=dict)

    def get(self, param: str, proto: str, neutral: float = 1.0) -> float:
        return float(getattr(self, param).get(proto, neutral))

    def tissue_override(self, name: str, values: dict) -> dict:
        """Tissue values after imperfect fat suppression (unchanged when ``fat_residual`` is 0)."""
        if not self.fat_residual or name not in FAT_UNSUPPRESSED:
            return values
        out = dict(values)
        for ch, full in FAT_UNSUPPRESSED[name].items():
            out[ch] = values[ch] + self.fat_residual * (full - values[ch])
        return out


def get_profile(name: str | Profile | None = None) -> Profile:
    if isinstance(name, Profile):
        return name
    name = name or "default"
    if name not in PROFILES:
        raise KeyError(f"unknown acquisition profile {name!r}; known: {sorted(PROFILES)}")
    p = dict(PROFILES[name])
    for k in ("spacing",):
        p[k] = {q: tuple(v) for q, v in p.get(k, {}).items()}
    return Profile(name=name, **p)


def describe() -> str:
    """The profiles as JSON (``parotid-synth --list-profiles``)."""
    return json.dumps(PROFILES, indent=1)
