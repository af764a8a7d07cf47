"""One synthetic parotid study: patient, anatomy, tumour(s), acquisitions, label.

ALL DATA PRODUCED HERE ARE SYNTHETIC. The appearance model follows published ranges (see
``docs``/the facts notes: ADC PA 1.72±0.39, WT 1.17±0.46, malignant ~0.8-1.2 x1e-3 mm²/s,
T2 PA bright / WT low with bright foci, malignant ill-defined; size 26±10 mm, 11-61 mm) but
the classes overlap on purpose: no single sequence separates them, their combination does.

Determinism: study ``i`` of seed ``S`` is drawn from ``SeedSequence([S, i, stream])`` streams,
so it is byte-identical whatever ``--n``/``--start`` and whichever sequences are dropped.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from parotid.labels import GLAND, TUMOR
from parotid.sequences import DIFFUSION, SEQUENCE_KEYS, reference_key
from parotid.study import Study, assemble_study, roi_from_mask
from parotid.synth.geometry import Grid, Rigid, rotation
from parotid.synth.profiles import Profile, get_profile
from parotid.synth.render import (Ellipsoid, EllipticCylinder, Field, LatticeField, Layer, Painter, SmoothUnion,
                                  mixed, textured)

CLASSES = ("pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant")
PREVALENCE = (0.45, 0.25, 0.10, 0.20)
MISSING_RATE = 0.10
# which sequence a study lacks, when it lacks one
MISSING_CHOICES = ("T1", "ADC", "DWI_B0", "DWI_B1000", "CET1", "T2")
MISSING_WEIGHTS = (0.35, 0.2, 0.15, 0.1, 0.1, 0.1)


@dataclass(frozen=True)
class Protocol:
    key: str
    description: str      # DICOM SeriesDescription
    spacing: tuple        # (in-plane x, in-plane y, slice) mm
    fov: tuple            # mm
    noise: float          # Rician sigma (signal units, before gain)


PROTOCOLS = {
    "T1": Protocol("T1", "T1 TSE", (1.0, 1.0, 4.0), (170.0, 140.0, 72.0), 10.0),
    "T2": Protocol("T2", "T2 TSE FS", (0.75, 0.75, 4.0), (165.0, 132.0, 72.0), 14.0),
    "CET1": Protocol("CET1", "CE-T1 VIBE", (1.5, 1.5, 3.0), (165.0, 135.0, 72.0), 10.0),
    "DWI": Protocol("DWI", "RESOLVE DWI", (2.0, 2.0, 4.0), (190.0, 160.0, 80.0), 14.0),
}
SERIES_DESCRIPTION = {"T1": "T1 TSE", "T2": "T2 TSE FS", "CET1": "CE-T1 VIBE", "DWI_B0": "DWI b0",
                      "DWI_B1000": "DWI b1000", "ADC": "ADC"}
CHANNELS = {"T1": ["T1"], "T2": ["T2"], "CET1": ["CET1"], "DWI": ["B0", "B1000"]}

# tissue -> (T1 TSE, T2 TSE fat-sat, CE-T1 VIBE fat-sat, DWI b0 fat-sat, ADC 1e-6 mm²/s)
TISSUE = {
    "air": (0.0, 0.0, 0.0, 0.0, 0.0),
    "skin": (480, 300, 420, 250, 1100),
    "fat": (900, 110, 100, 45, 250),
    "muscle": (420, 210, 300, 170, 1450),
    "cortex": (25, 20, 25, 15, 500),
    "marrow": (780, 140, 160, 55, 350),
    "csf": (150, 1150, 120, 1000, 3000),
    "cord": (480, 420, 330, 380, 900),
    "mucosa": (450, 520, 620, 420, 1300),
    "vein": (40, 35, 850, 25, 2000),       # flow void on spin echo, bright after contrast
    "artery": (30, 30, 650, 20, 2000),
    "fluid": (200, 1150, 130, 1000, 2400),
    "glandular": (420, 390, 520, 400, 1050),
}
CH = ("T1", "T2", "CET1", "B0", "ADC")


def tissue(name: str) -> dict:
    return dict(zip(CH, (float(v) for v in TISSUE[name])))


_tissue = tissue


def _stream(seed: int, index: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), zlib.crc32(name.encode())]))


def study_id(seed: int, index: int) -> str:
    return f"syn{seed}_{index:04d}"


# --------------------------------------------------------------------------- the case
@dataclass
class Tumour:
    cls: str
    side: str                 # "right" / "left"
    centre: np.ndarray
    radii: np.ndarray
    size_mm: float
    values: dict              # channel -> Value
    blur: float
    ill_defined: bool
    layers: list = field(default_factory=list)


@dataclass
class Case:
    study_id: str
    seed: int
    index: int
    tumor_class: str
    age: int
    sex: str
    smoker: bool
    side: str
    n_tumors: int
    size_mm: float
    ill_defined: bool
    split: str
    sequences: tuple
    missing: str | None
    layers_by_stage: list
    pose: Rigid
    motions: dict             # protocol -> Rigid (scanner-frame motion; identity for the reference)
    grids: dict               # protocol -> Grid
    gains: dict
    bias: dict
    extra: dict = field(default_factory=dict)


def _clinical(rng, cls):
    if cls == "pleomorphic_adenoma":
        age, male, smoke = rng.normal(44, 16), 0.45, 0.2
    elif cls == "warthin":
        age, male, smoke = rng.normal(58, 10), 0.81, 0.75
    elif cls == "basal_cell_adenoma":
        age, male, smoke = rng.normal(57, 13), 0.35, 0.2
    else:
        age, male, smoke = rng.normal(61, 16), 0.70, 0.35
    age = int(np.clip(round(age), 16, 92))
    sex = "M" if rng.random() < male else "F"
    smoker = bool(rng.random() < smoke)
    return age, sex, smoker


def _tumour_appearance(rng, cls):
    """Class appearance: base values per channel, texture amplitude, margin, shape, cysts."""
    n = rng.normal
    if cls == "pleomorphic_adenoma":
        t2 = n(960, 160)
        a = dict(T1=n(330, 50), T2=t2, CET1=n(560, 140), B0=t2 * n(0.85, 0.08),
                 ADC=np.clip(n(1750, 280), 1050, 2600))
        het, lob = rng.uniform(0.05, 0.15), rng.uniform(0.08, 0.2)
        ill = rng.random() < 0.05  # rarely a blurred (inflamed / recurrent-looking) margin
        blur = rng.uniform(1.2, 2.0) if ill else rng.uniform(0.2, 0.5)
        capsule = rng.random() < 0.7
        n_cyst = int(rng.random() < 0.2) * int(rng.integers(1, 3))
    elif cls == "warthin":
        t2 = n(450, 110)
        a = dict(T1=n(420, 60), T2=t2, CET1=n(470, 110), B0=t2 * n(0.9, 0.08),
                 ADC=np.clip(n(1050, 200), 600, 1800))
        het, lob = rng.uniform(0.1, 0.2), rng.uniform(0.03, 0.08)
        ill = rng.random() < 0.1
        blur = rng.uniform(1.5, 2.5) if ill else rng.uniform(0.3, 0.8)
        capsule = rng.random() < 0.5
        n_cyst = int(rng.integers(2, 7)) if rng.random() < 0.85 else 0
    elif cls == "basal_cell_adenoma":
        t2 = n(700, 120)
        a = dict(T1=n(370, 50), T2=t2, CET1=n(860, 100), B0=t2 * n(0.85, 0.08),
                 ADC=np.clip(n(1300, 180), 850, 1900))
        het, lob = rng.uniform(0.03, 0.08), rng.uniform(0.0, 0.04)
        blur, ill = rng.uniform(0.2, 0.5), False
        capsule = rng.random() < 0.7
        n_cyst = int(rng.random() < 0.15)
    else:
        t2 = n(580, 130)
        a = dict(T1=n(390, 60), T2=t2, CET1=n(720, 140), B0=t2 * n(0.85, 0.08),
                 ADC=np.clip(n(950, 180), 550, 1500))
        het, lob = rng.uniform(0.18, 0.35), rng.uniform(0.05, 0.15)
        ill = rng.random() < 0.85
        blur = rng.uniform(2.0, 4.0) if ill else rng.uniform(0.6, 1.2)
        capsule = False
        n_cyst = int(rng.random() < 0.4)  # central necrosis
    a = {k: float(max(v, 20.0)) for k, v in a.items()}
    return a, het, lob, blur, ill, capsule, n_cyst


_SIZE = {"pleomorphic_adenoma": (27, 10), "warthin": (28, 9), "basal_cell_adenoma": (20, 7), "malignant": (29, 12)}


def _make_tumour(rng, cls, side, sc, gland_c, k, size_scale=1.0):
    s = 1.0 if side == "left" else -1.0
    mu, sd = _SIZE[cls]
    size = float(np.clip(rng.normal(mu, sd) * size_scale, 11, 61))
    r = size / 2
    radii = np.array([r * rng.uniform(0.6, 0.85), r * rng.uniform(0.85, 1.0), min(r * rng.uniform(0.75, 1.0), 21.0)])
    radii[1] = r  # the longest axis carries the size
    R = rotation(*rng.uniform(-15, 15, 3))
    if cls == "warthin":
        off = np.array([s * rng.uniform(-2, 4), rng.uniform(0, 12), rng.uniform(-14, -5)])
    elif cls == "malignant" and rng.random() < 0.3:
        off = np.array([-s * 14 + s * rng.uniform(-2, 2), rng.uniform(0, 8), rng.uniform(-4, 6)])  # deep lobe
    else:
        off = np.array([s * rng.uniform(-3, 5), rng.uniform(-6, 10), rng.uniform(-8, 8)])
    # large tumours bulge posterolaterally (they cannot go through the ramus)
    push = max(0.0, radii[0] - 9.0)
    off += np.array([s * 0.6 * push, 0.5 * max(0.0, r - 12.0), 0.0])
    centre = gland_c + off * sc
    over = abs(centre[0]) + radii[0] - 78.0 * sc  # keep the bulge inside a head-and-neck FOV
    if over > 0:
        centre[0] -= s * over
    a, het, lob, blur, ill, capsule, n_cyst = _tumour_appearance(rng, cls)
    f_shape = Field(rng, wavelength=(0.9 * r, 1.6 * r), n_waves=4)
    perturb = [(f_shape, lob * r * 0.5)]
    if cls == "malignant" and ill:
        perturb.append((Field(rng, wavelength=(4.0, 8.0), n_waves=5), rng.uniform(1.5, 3.0)))
    half = np.abs(R) @ radii + 6.0
    f1 = LatticeField(rng, centre, half, spacing=rng.uniform(2.0, 3.5), smooth=1.0)
    f2 = LatticeField(rng, centre, half, spacing=rng.uniform(2.0, 3.5), smooth=1.0)
    sign = {"T1": 0.3, "T2": 1.0, "CET1": -0.6, "B0": 1.0, "ADC": 0.8}
    values = {}
    for c in CH:
        fld = f2 if c == "CET1" else f1
        values[c] = textured(a[c], fld, het * sign[c] if c != "CET1" else het, lo=10.0)
    body = Ellipsoid(centre, radii, R, perturb=tuple(perturb))
    code = 20 + k
    layers = []
    if capsule:
        cap = Ellipsoid(centre, radii, R, offset=-rng.uniform(0.8, 1.3), perturb=tuple(perturb))
        layers.append(Layer(f"capsule{k}", cap, dict(T1=300.0, T2=150.0, CET1=330.0, B0=140.0, ADC=1000.0),
                            blur=0.2, code=code))
    layers.append(Layer(f"tumour{k}", body, values, blur=blur, code=code))
    rmin = float(radii.min())
    for j in range(n_cyst):
        if cls == "malignant":  # necrosis: central, irregular
            rc = rmin * rng.uniform(0.25, 0.45)
            cc = centre + rng.normal(0, 0.1 * rmin, 3)
            fl = dict(tissue("fluid"), CET1=160.0, ADC=1900.0)
            cb = 1.2
        else:
            rc = min(rng.uniform(1.5, 4.0) * max(1.0, r / 14), 0.4 * rmin)
            dirn = rng.normal(size=3)
            dirn /= np.linalg.norm(dirn)
            cc = centre + R @ (dirn * (radii - rc) * rng.uniform(0.0, 0.75))
            fl = tissue("fluid")
            if cls == "warthin" and rng.random() < 0.4:  # proteinaceous: T1-bright
                fl = dict(fl, T1=650.0, T2=900.0, ADC=1800.0)
            cb = 0.3
        layers.append(Layer(f"cyst{k}_{j}", Ellipsoid(cc, [rc, rc * 1.1, rc * 0.9]), fl, blur=cb, code=code))
    return Tumour(cls, side, centre, radii, size, values, blur, bool(ill), layers)


def _anatomy(rng, sc, age, sex, tumours_layers_benign, tumours_layers_malignant, bulges, profile=None):
    """Ordered layers of the head-and-neck phantom at the parotid level (head frame, mm).

    `profile`: acquisition profile whose fat-suppression quality changes the fat / marrow values
    (no random draw depends on it)."""
    prof = get_profile(profile)

    def tissue(name: str) -> dict:  # noqa: F811  (profile-aware; shadows the module function)
        return prof.tissue_override(name, _tissue(name))

    L = []
    t_fat = rng.uniform(4, 11) * (1.1 if sex == "F" else 1.0)
    ax, ay = 72 * sc, 86 * sc
    head_c = np.array([0.0, 5.0 * sc, 0.0])
    tilt = rotation(rng.uniform(-6, 6), 0, 0)  # the neck is not exactly along z

    def head(offset):
        base = EllipticCylinder(head_c, [ax, ay], 120.0, tilt, offset=offset)
        base.half = None
        if not bulges:
            return base
        parts = [base] + [Ellipsoid(c, r + max(0.0, -offset), R) for c, r, R in bulges]
        u = SmoothUnion(tuple(parts), k=6.0)
        u.half = None
        return u

    L.append(Layer("skin", head(0.0), tissue("skin"), slice_profile=False))
    L.append(Layer("subcutaneous_fat", head(2.0), tissue("fat"), slice_profile=False))
    box_c, box_h = np.array([0.0, 10.0, -5.0]), np.array([95.0, 100.0, 50.0])
    deep_fat = LatticeField(rng, box_c, box_h, spacing=4.0, smooth=1.2)  # intermuscular fat, one texture
    mus, fat = tissue("muscle"), tissue("fat")
    frac = lambda q, f=deep_fat: np.clip(0.12 + 0.1 * f(q), 0, 1)  # noqa: E731
    deep = {c: mixed(mus[c], fat[c], frac) for c in CH}
    L.append(Layer("deep_tissue", head(2.0 + t_fat), deep, slice_profile=False))
    # midline: spine, canal, cord, airway with mucosa
    L.append(Layer("vertebra_cortex", EllipticCylinder([0, 24 * sc, 0], [16 * sc, 13 * sc], 60, tilt), tissue("cortex")))
    L.append(Layer("vertebra_marrow", EllipticCylinder([0, 24 * sc, 0], [16 * sc, 13 * sc], 60, tilt, offset=1.5), tissue("marrow")))
    L.append(Layer("posterior_arch", EllipticCylinder([0, 58 * sc, 0], [15 * sc, 4.5 * sc], 60, tilt), tissue("marrow")))
    L.append(Layer("canal", EllipticCylinder([0, 44 * sc, 0], [11 * sc, 8.5 * sc], 60, tilt), tissue("csf")))
    L.append(Layer("cord", EllipticCylinder([0, 44 * sc, 0], [6 * sc, 4.5 * sc], 60, tilt), tissue("cord")))
    aw = np.array([rng.uniform(-2, 2), -10 * sc, 0])
    awr = np.array([rng.uniform(11, 16), rng.uniform(6, 10)]) * sc
    L.append(Layer("pharyngeal_mucosa", EllipticCylinder(aw, awr + 3, 60, tilt), tissue("mucosa")))
    L.append(Layer("airway", EllipticCylinder(aw, awr, 60, tilt), tissue("air")))
    # glandular tissue: fatty-glandular, more fat with age
    f0 = float(np.clip(0.18 + 0.005 * (age - 40) + rng.normal(0, 0.06), 0.05, 0.6))
    gl = tissue("glandular")
    gl["ADC"] = float(np.clip(rng.normal(1020, 140), 700, 1400))
    glands = {}
    for side, s in (("right", -1.0), ("left", 1.0)):
        j = lambda a: a * rng.uniform(0.93, 1.07)  # noqa: E731  per-side asymmetry
        m = lambda v: np.array([s * v[0], v[1], v[2]]) * sc  # noqa: E731  mirror + scale
        Rz = lambda deg: rotation(0, 0, s * deg)  # noqa: E731
        L.append(Layer(f"parapharyngeal_fat_{side}", Ellipsoid(m([24, -4, 0]), np.array([6, 11, 28]) * sc), tissue("fat")))
        L.append(Layer(f"scm_{side}", Ellipsoid(m([50, 40, -8]), np.array([9, 13, 45]) * sc, rotation(0, s * 10, s * 20)), tissue("muscle")))
        L.append(Layer(f"digastric_{side}", Ellipsoid(m([40, 27, -6]), np.array([4, 5, 30]) * sc), tissue("muscle")))
        gc = m([54, 4, 0])
        gsize = j(1.0) * sc
        sup = Ellipsoid(gc, np.array([10, 19, 22.5]) * gsize, Rz(10))
        dl = Ellipsoid(m([38, 8, 3]), np.array([7, 9, 14]) * gsize, Rz(-10))
        gfat = LatticeField(rng, gc, np.array([30.0, 30.0, 30.0]) * sc, spacing=2.5, smooth=0.8)
        fr = lambda q, f=gfat: np.clip(f0 + 0.12 * f(q), 0.0, 0.9)  # noqa: E731
        glands[side] = gc
        L.append(Layer(f"parotid_{side}", SmoothUnion((sup, dl), k=4.0), {c: mixed(gl[c], fat[c], fr) for c in CH},
                       code=GLAND_CODE, mark="gland"))
        L.append(Layer(f"masseter_{side}", Ellipsoid(m([53, -24, 2]), np.array([6.5, 13, 30]) * sc, Rz(15)), tissue("muscle")))
        L.append(Layer(f"medial_pterygoid_{side}", Ellipsoid(m([33, -14, 4]), np.array([6, 14, 24]) * sc, Rz(-35)), tissue("muscle")))
        for name, xy, r, t in (("retromandibular_vein", (49, 1), 2.5, "vein"), ("external_carotid", (45, 5), 2.0, "artery"),
                               ("internal_carotid", (30, 18), 2.8, "artery"), ("internal_jugular", (34, 26), 4.5, "vein")):
            c = m([xy[0], xy[1], 0])
            L.append(Layer(f"{name}_{side}", EllipticCylinder(c, [r * sc, r * sc], 60, rotation(s * 4, 3, 0)), tissue(t),
                           code=VESSEL_CODE))
    stages = [L, tumours_layers_benign]
    bone = []
    for side, s in (("right", -1.0), ("left", 1.0)):
        c = np.array([s * 44, -20, 0]) * sc
        R = rotation(0, s * 4, s * 12)
        bone.append(Layer(f"ramus_cortex_{side}", Ellipsoid(c, np.array([3.6, 13, 40]) * sc, R), tissue("cortex")))
        bone.append(Layer(f"ramus_marrow_{side}", Ellipsoid(c, np.array([3.6, 13, 40]) * sc, R, offset=1.3), tissue("marrow")))
    stages += [bone, tumours_layers_malignant]
    return stages, glands


GLAND_CODE, VESSEL_CODE = 10, 11
GLAND_ANCHOR = {"right": np.array([-54.0, 4.0, 0.0]), "left": np.array([54.0, 4.0, 0.0])}


def sample_case(seed: int, index: int, keep=(), profile: str | Profile | None = None) -> Case:
    """Draw everything about study `index` of cohort `seed` (no rendering yet).

    `profile` (``parotid.synth.profiles``) changes only the acquisition; every random draw of the
    patient is the same whatever the profile."""
    prof = get_profile(profile)
    rng = _stream(seed, index, "patient")
    cls = CLASSES[int(rng.choice(len(CLASSES), p=PREVALENCE))]
    age, sex, smoker = _clinical(rng, cls)
    sc = float(rng.normal(1.0, 0.04) * (1.03 if sex == "M" else 0.98))
    side = "left" if rng.random() < 0.5 else "right"
    split_u = rng.random()
    split = "train" if split_u < 0.7 else ("val" if split_u < 0.85 else "test")

    trng = _stream(seed, index, "tumour")
    n_t = 1
    if cls == "warthin":
        n_t = int(trng.choice([1, 2, 3], p=[0.75, 0.2, 0.05]))
    tumours = [_make_tumour(trng, cls, side, sc, GLAND_ANCHOR[side] * sc, 0)]  # the index tumour
    other = "right" if side == "left" else "left"
    for k in range(1, n_t):  # further (smaller) Warthin tumours: bilateral or elsewhere in the gland
        first = other if trng.random() < 0.6 else side
        for attempt in range(16):
            tside = first if attempt < 12 else (other if first == side else side)
            t = _make_tumour(trng, cls, tside, sc, GLAND_ANCHOR[tside] * sc, k, size_scale=trng.uniform(0.45, 0.8))
            if all(np.linalg.norm(t.centre - u.centre) > t.radii.max() + u.radii.max() + 6.0 for u in tumours):
                tumours.append(t)
                break
    n_t = len(tumours)
    benign_layers = [ly for t in tumours for ly in t.layers] if cls != "malignant" else []
    malignant_layers = [ly for t in tumours for ly in t.layers] if cls == "malignant" else []
    # skin bulges over tumours that reach the lateral surface
    bulges = []
    for t in tumours:
        lateral = abs(t.centre[0]) + t.radii[0]
        if lateral > 72 * sc - 14:
            bulges.append((t.centre, t.radii, np.eye(3)))
    arng = _stream(seed, index, "anatomy")
    stages, _ = _anatomy(arng, sc, age, sex, benign_layers, malignant_layers, bulges, prof)

    # acquisition: head pose (reference sequence), per-sequence motion, planning, gains, bias
    grng = _stream(seed, index, "geometry")
    pose = Rigid(rotation(*grng.uniform([-5, -5, -8], [5, 5, 8])), grng.normal(0, 3, 3))
    plan = rotation(*(0.6 * grng.uniform([-5, -5, -8], [5, 5, 8])))  # operator partly follows the head
    fov_c = pose.R @ np.array([0.0, 7.0, -5.0]) + pose.t + grng.normal(0, 2.5, 3)
    present = [k for k in SEQUENCE_KEYS]
    mrng = _stream(seed, index, "missing")
    missing = None
    if mrng.random() < MISSING_RATE:
        missing = MISSING_CHOICES[int(mrng.choice(len(MISSING_CHOICES), p=MISSING_WEIGHTS))]
        if missing in keep:
            missing = None
        else:
            present.remove(missing)
    ref_key = reference_key(present)
    ref_proto = "DWI" if ref_key in DIFFUSION else ref_key
    grids, motions, gains, bias = {}, {}, {}, {}
    for name, p in PROTOCOLS.items():
        g = _stream(seed, index, "acq:" + name)
        D = plan @ rotation(*g.uniform(-2.0, 2.0, 3))
        centre = fov_c + g.normal(0, 2.0, 3) + (np.array([0, 0, g.uniform(-4, 4)]) if name == "DWI" else 0)
        grids[name] = Grid.centred(centre, D, prof.spacing.get(name, p.spacing), p.fov)
        if name == ref_proto:
            motions[name] = Rigid(np.eye(3), np.zeros(3))
        else:
            ang = g.uniform(-2.0, 2.0, 3)
            tr = g.normal(0, 1.0, 3)
            tr = tr / max(np.linalg.norm(tr), 1e-6) * g.uniform(1.0, 2.0)
            # rotate about the FOV centre so the motion stays small over the parotids
            Rm = rotation(*ang)
            motions[name] = Rigid(Rm, fov_c - Rm @ fov_c + tr)
        gains[name] = float(g.uniform(0.75, 1.3))
        bias[name] = g.normal(0, [0.08, 0.08, 0.06, 0.06, 0.06, 0.04])
        if prof.get("gain", name) != 1.0:  # vendor intensity scale
            gains[name] *= prof.get("gain", name)
    if prof.dwi_shift_mm:  # DWI misregistration along its phase-encode (J) axis; sign from its own stream
        sign = 1.0 if _stream(seed, index, "profile:dwi_shift").random() < 0.5 else -1.0
        m = motions["DWI"]
        motions["DWI"] = Rigid(m.R, m.t + sign * prof.dwi_shift_mm * grids["DWI"].direction[:, 1])
    idx = tumours[0]
    return Case(
        study_id=study_id(seed, index), seed=seed, index=index, tumor_class=cls, age=age, sex=sex, smoker=smoker,
        side=idx.side, n_tumors=n_t, size_mm=round(idx.size_mm, 1), ill_defined=idx.ill_defined, split=split,
        sequences=tuple(present), missing=missing, layers_by_stage=stages, pose=pose, motions=motions, grids=grids,
        gains=gains, bias=bias, extra={"reference": ref_key, "bilateral": len({t.side for t in tumours}) > 1,
                                       "profile": prof},
    )


# --------------------------------------------------------------------------- rendering
def _bias_field(grid: Grid, coef, strength: float = 1.0) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field (scanner frame, ~±10-20 %; log-amplitude x `strength`)."""
    ii, jj, kk = (np.arange(s, dtype=np.float32) for s in grid.size)
    centre_idx = (np.array(grid.size) - 1) / 2.0
    sp = np.array(grid.spacing)
    u = (ii - centre_idx[0]) * sp[0] / 80.0
    v = (jj - centre_idx[1]) * sp[1] / 80.0
    w = (kk - centre_idx[2]) * sp[2] / 60.0
    c = np.asarray(coef, np.float32)
    e = (c[0] * u[:, None, None] + c[1] * v[None, :, None] + c[2] * w[None, None, :]
         + (0.12 + c[3]) * u[:, None, None] ** 2 + c[4] * v[None, :, None] ** 2 + c[5] * w[None, None, :] ** 2)
    if strength != 1.0:
        e = e * np.float32(strength)
    return np.exp(e).astype(np.float32)


def _rician(rng, signal: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.standard_normal(signal.shape, dtype=np.float32)
    n2 = rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2)


def _paint(case: Case, proto: str, track: bool) -> Painter:
    pose = case.motions[proto].compose_after(case.pose)
    prof = get_profile(case.extra.get("profile"))
    grid = case.grids[proto]
    fill = 1.0 - prof.get("slice_gap", proto, 0.0) / grid.spacing[2]
    painter = Painter(grid, pose, CHANNELS[proto], track=track, slice_fill=fill,
                      b_scale=prof.adc_scale if proto == "DWI" else 1.0)
    for stage in case.layers_by_stage:
        for layer in stage:
            painter.paint(layer)
    return painter


def render_sequences(case: Case) -> dict[str, sitk.Image]:
    """Native acquisitions (float32 sitk images in their own geometry) of the present sequences."""
    out = {}
    for proto in PROTOCOLS:
        keys = list(DIFFUSION) if proto == "DWI" else [proto]
        if not any(k in case.sequences for k in keys):
            continue
        painter = _paint(case, proto, track=False)
        prof = get_profile(case.extra.get("profile"))
        grid = case.grids[proto]
        nrng = _stream(case.seed, case.index, "noise:" + proto)
        gamma = prof.get("contrast", proto)
        if gamma != 1.0 and proto != "DWI":  # field-strength-like contrast around the muscle signal
            pivot = np.float32(TISSUE["muscle"][CH.index(proto)])
            img = painter.img[proto]
            painter.img[proto] = (pivot * (np.maximum(img, 0) / pivot) ** np.float32(gamma)).astype(np.float32)
        b = _bias_field(grid, case.bias[proto], prof.get("bias", proto)) * case.gains[proto]
        sigma = PROTOCOLS[proto].noise * case.gains[proto]
        if prof.get("noise", proto) != 1.0:
            sigma *= prof.get("noise", proto)
        if proto == "DWI":
            b0 = _rician(nrng, painter.img["B0"] * b, sigma)
            b1 = _rician(nrng, painter.img["B1000"] * b, sigma)
            b0 = np.rint(b0)
            b1 = np.rint(b1)  # the stored (int16) values are the ones the ADC is computed from
            valid = b0 > 4.0 * sigma  # scanners blank the ADC where b0 is noise
            adc = np.zeros_like(b0)
            ratio = np.maximum(b0[valid], 1.0) / np.maximum(b1[valid], 1.0)
            adc[valid] = np.clip(np.log(ratio) * 1000.0, 0.0, 3500.0)
            arrays = {"DWI_B0": b0, "DWI_B1000": b1, "ADC": np.rint(adc)}
        else:
            arrays = {proto: np.rint(_rician(nrng, painter.img[proto] * b, sigma))}
        for k, a in arrays.items():
            if k in case.sequences:
                out[k] = grid.image_from(a.astype(np.float32))
    return out


def render_label(case: Case, reference: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (I, J, K) label map on the reference grid, and the index tumour's mask.

    Rendered from the analytic shapes at the reference grid's voxel centres (seen through the
    reference sequence's pose), never resampled from another grid.
    """
    ref_key = case.extra["reference"]
    proto = "DWI" if ref_key in DIFFUSION else ref_key
    grid = Grid.of(reference)
    pose = case.motions[proto].compose_after(case.pose)
    painter = Painter(grid, pose, [], track=True)
    for stage in case.layers_by_stage:
        for layer in stage:
            painter.paint(layer)
    owner = painter.owner
    gland = painter.marks.get("gland", np.zeros(grid.size, bool))
    label = np.zeros(grid.size, np.uint8)
    label[gland & ((owner == GLAND_CODE) | (owner == VESSEL_CODE))] = GLAND
    label[owner >= 20] = TUMOR
    return label, owner == 20


@dataclass
class Rendered:
    case: Case
    raw: dict           # key -> sitk.Image (native geometry)
    study: Study
    label: np.ndarray   # (I, J, K) uint8 on the reference grid
    roi: list


def generate(seed: int, index: int, keep=(), profile: str | Profile | None = None) -> Rendered:
    case = sample_case(seed, index, keep, profile)
    raw = render_sequences(case)
    study = assemble_study(raw)
    label, index_mask = render_label(case, study.reference)
    roi = roi_from_mask(index_mask)
    if roi is None:  # cannot happen with the size bounds; fail loudly rather than write a bad label
        raise RuntimeError(f"{case.study_id}: index tumour not visible on the reference grid")
    return Rendered(case, raw, study, label, roi)
