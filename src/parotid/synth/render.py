"""Analytic shapes, smooth random fields and a soft-edged painter that renders them on a grid.

Every structure is an implicit shape (approximate signed distance ``d`` in mm, negative inside),
so any grid can be rendered directly at its own voxel centres (no resampling of a master
volume): the reference-grid label and every native acquisition come from the same shapes.
Partial volume: the occupancy of a voxel is a logistic edge of width ~ a quarter voxel
(plus the structure's own blur), averaged over sub-slice samples for thick slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

import numpy as np

from parotid.synth.geometry import Grid, Rigid

Value = Union[float, Callable[[np.ndarray], np.ndarray]]


# --------------------------------------------------------------------------- fields
class Field:
    """Smooth zero-mean, unit-variance random field: a sum of random plane waves (analytic)."""

    def __init__(self, rng: np.random.Generator, wavelength=(6.0, 15.0), n_waves: int = 4):
        dirs = rng.normal(size=(n_waves, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength, size=n_waves)
        self.k = (dirs * (2 * np.pi / lam)[:, None]).astype(np.float32)  # (W, 3)
        self.phi = rng.uniform(0, 2 * np.pi, size=n_waves).astype(np.float32)
        self.scale = np.float32(np.sqrt(2.0 / n_waves))

    def __call__(self, q: np.ndarray) -> np.ndarray:
        """`q`: component-first points ``(3, ...)``."""
        out = None
        for (k0, k1, k2), ph in zip(self.k, self.phi):
            v = np.cos(k0 * q[0] + k1 * q[1] + k2 * q[2] + ph)
            out = v if out is None else out + v
        return out * self.scale


class LatticeField:
    """Smooth zero-mean, unit-variance random texture: Gaussian-smoothed white noise on a lattice
    (spacing `spacing` mm) covering ``centre ± half``, trilinearly interpolated at any point."""

    def __init__(self, rng: np.random.Generator, centre, half, spacing: float = 3.0, smooth: float = 1.0):
        from scipy import ndimage

        half = np.asarray(half, np.float64) + 2 * spacing
        self.lo = (np.asarray(centre, np.float64) - half).astype(np.float32)
        shape = tuple(int(np.ceil(2 * h / spacing)) + 2 for h in half)
        noise = rng.standard_normal(shape).astype(np.float32)
        if smooth > 0:
            noise = ndimage.gaussian_filter(noise, smooth, mode="wrap")
        noise -= noise.mean()
        noise /= max(float(noise.std()), 1e-6)
        self.lattice = noise
        self.inv = np.float32(1.0 / spacing)

    def __call__(self, q: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        coords = [(q[i] - self.lo[i]) * self.inv for i in range(3)]
        return ndimage.map_coordinates(self.lattice, coords, order=1, mode="nearest").astype(np.float32)


def textured(base: float, fld: Field | None, amp: float, lo: float = 0.0) -> Value:
    """``base * (1 + amp * field)`` (clipped at `lo`), or the constant `base`."""
    if fld is None or amp == 0:
        return float(base)

    def f(q, base=base, fld=fld, amp=amp, lo=lo):
        return np.maximum(base * (1.0 + amp * fld(q)), lo)

    return f


def mixed(a: float, b: float, frac: Callable[[np.ndarray], np.ndarray]) -> Value:
    """Two-compartment mixture ``(1 - f) a + f b`` with a spatially varying fraction f."""

    def f(q, a=a, b=b, frac=frac):
        w = frac(q)
        return a + (b - a) * w

    return f


# --------------------------------------------------------------------------- shapes
class Shape:
    """Implicit shape; points are component-first ``(3, ...)`` arrays in the head frame (mm)."""

    centre: np.ndarray
    half: np.ndarray | None  # half-extents of an axis-aligned bounding box (None: whole grid)

    def sdf(self, q: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def _ellipsoid_sdf(p, r) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (exact on the axes).

    `p`: sequence of coordinate arrays (2 or 3), `r`: radii."""
    k0 = None
    k1 = None
    for x, ri in zip(p, r):
        a = x * np.float32(1.0 / ri)
        b = a * np.float32(1.0 / ri)
        k0 = a * a if k0 is None else k0 + a * a
        k1 = b * b if k1 is None else k1 + b * b
    k0 = np.sqrt(k0)
    k1 = np.sqrt(k1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _local(q, centre, R):
    """Coordinates of head-frame points `q` (3, ...) in a local frame (columns of R), component-first."""
    d = [q[i] - centre[i] for i in range(3)]
    return [d[0] * R[0, j] + d[1] * R[1, j] + d[2] * R[2, j] for j in range(3)]


@dataclass
class Ellipsoid(Shape):
    centre: np.ndarray
    radii: np.ndarray
    R: np.ndarray = field(default_factory=lambda: np.eye(3))   # columns: local axes in the head frame
    offset: float = 0.0                                          # >0 shrinks, <0 grows (mm)
    perturb: tuple = ()                                          # ((Field, amplitude_mm), ...)

    def __post_init__(self):
        self.centre = np.asarray(self.centre, np.float32)
        self.radii = np.asarray(self.radii, np.float32)
        self.R = np.asarray(self.R, np.float32)
        ext = self.radii - self.offset + sum(2.5 * abs(a) for _, a in self.perturb) + 1.0
        self.half = np.abs(self.R) @ ext

    def sdf(self, q):
        p = _local(q, self.centre, self.R)
        d = _ellipsoid_sdf(p, self.radii) + np.float32(self.offset)
        if self.perturb:
            p = np.stack(p)
            for fld, amp in self.perturb:
                d = d - np.float32(amp) * fld(p)
        return d


@dataclass
class EllipticCylinder(Shape):
    """Elliptic cylinder along the (tilted) local z axis, capped at |z| < half_length."""

    centre: np.ndarray
    radii: np.ndarray          # (rx, ry)
    half_length: float
    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    offset: float = 0.0

    def __post_init__(self):
        self.centre = np.asarray(self.centre, np.float32)
        self.radii = np.asarray(self.radii, np.float32)
        self.R = np.asarray(self.R, np.float32)
        ext = np.array([self.radii[0] - self.offset + 1, self.radii[1] - self.offset + 1, self.half_length + 1])
        self.half = np.abs(self.R) @ ext

    def sdf(self, q):
        p = _local(q, self.centre, self.R)
        d2 = _ellipsoid_sdf(p[:2], self.radii) + np.float32(self.offset)
        return np.maximum(d2, np.abs(p[2]) - np.float32(self.half_length))


@dataclass
class SmoothUnion(Shape):
    parts: tuple
    k: float = 4.0  # blending radius in mm

    def __post_init__(self):
        if any(p.half is None for p in self.parts):
            self.centre, self.half = np.zeros(3, np.float32), None
            return
        lo = np.min([p.centre - p.half for p in self.parts], axis=0)
        hi = np.max([p.centre + p.half for p in self.parts], axis=0)
        self.centre = ((lo + hi) / 2).astype(np.float32)
        self.half = (hi - lo) / 2 + self.k

    def sdf(self, q):
        d = self.parts[0].sdf(q)
        for p in self.parts[1:]:
            d2 = p.sdf(q)
            h = np.clip(0.5 + 0.5 * (d2 - d) / self.k, 0.0, 1.0)
            d = d2 + (d - d2) * h - self.k * h * (1.0 - h)
        return d


# --------------------------------------------------------------------------- layers / painter
@dataclass
class Layer:
    name: str
    shape: Shape
    values: Mapping[str, Value]   # channel -> value; DWI layers give "B0" and "ADC"
    blur: float = 0.0             # extra edge width (mm): ill-defined margins
    code: int = 1                 # owner code written where occupancy > 0.5
    mark: str | None = None       # name of a boolean "inside" map to record (e.g. gland)
    slice_profile: bool = True    # sample the slice profile (partial volume along K); off for the big outer layers


def _eval(v: Value, q: np.ndarray) -> np.ndarray | float:
    return v(q) if callable(v) else v


class Painter:
    """Paints layers (in order, soft edges) onto one grid seen through one head pose."""

    def __init__(self, grid: Grid, pose: Rigid, channels, track: bool = False, slice_fill: float = 1.0,
                 b_scale: float = 1.0):
        self.grid = grid
        self.channels = list(channels)
        self.img = {c: np.zeros(grid.size, np.float32) for c in self.channels}
        self.track = track
        self.owner = np.zeros(grid.size, np.int16) if track else None
        self.marks: dict[str, np.ndarray] = {}
        sp = np.asarray(grid.spacing)
        self.A = (pose.R.T @ grid.direction @ np.diag(sp)).astype(np.float64)   # voxel -> head
        self.b = (pose.R.T @ (np.asarray(grid.origin) - pose.t)).astype(np.float64)
        self.Ainv = np.linalg.inv(self.A)
        self.w_grid = 0.25 * float(np.mean(sp[:2]))
        # thick slices: two sub-slice samples for the slice profile (partial volume along K)
        self.k_offsets = (-0.25, 0.25) if sp[2] >= 2.5 else (0.0,)  # slices >= 2.5 mm
        if slice_fill != 1.0 and sp[2] >= 2.5:  # slice gap: thinner slice profile (thickness / spacing)
            self.k_offsets = (-0.25 * slice_fill, 0.25 * slice_fill)
        self.b_scale = float(b_scale)  # effective / nominal b-value (ADC calibration of an acquisition profile)
        self._pts: dict[float, np.ndarray] = {}

    def _block(self, shape: Shape):
        if shape.half is None:
            return tuple(slice(0, s) for s in self.grid.size)
        c_idx = self.Ainv @ (shape.centre.astype(np.float64) - self.b)
        half = np.abs(self.Ainv) @ np.asarray(shape.half, np.float64) + 1.0
        lo = np.maximum(np.floor(c_idx - half), 0).astype(int)
        hi = np.minimum(np.ceil(c_idx + half) + 1, self.grid.size).astype(int)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def _all_points(self, dk: float) -> np.ndarray:
        if dk not in self._pts:
            ii, jj, kk = (np.arange(s, dtype=np.float32) for s in self.grid.size)
            kk = kk + np.float32(dk)
            A = self.A.astype(np.float32)
            b = self.b.astype(np.float32)
            q = np.empty((3, *self.grid.size), np.float32)
            for c in range(3):
                q[c] = (A[c, 0] * ii[:, None, None] + A[c, 1] * jj[None, :, None]
                        + A[c, 2] * kk[None, None, :] + b[c])
            self._pts[dk] = q
        return self._pts[dk]

    def _points(self, sl, dk: float) -> np.ndarray:
        return self._all_points(dk)[(slice(None), *sl)]

    def paint(self, layer: Layer) -> None:
        sl = self._block(layer.shape)
        if sl is None:
            return
        w = float(np.hypot(self.w_grid, layer.blur))
        offsets = self.k_offsets if layer.slice_profile else (0.0,)
        occ = None
        for dk in offsets:
            d = layer.shape.sdf(self._points(sl, dk))
            o = 1.0 / (1.0 + np.exp(np.clip(d * np.float32(1.0 / w), -30, 30)))
            occ = o if occ is None else occ + o
        if len(offsets) > 1:
            occ = occ / np.float32(len(offsets))
        occ = occ.astype(np.float32, copy=False)
        qm = self._points(sl, 0.0)
        vals = {}
        for c in self.channels:
            if c == "B1000":
                b0 = vals.get("B0")
                if b0 is None:
                    b0 = _eval(layer.values["B0"], qm)
                adc = np.asarray(_eval(layer.values["ADC"], qm))
                if self.b_scale != 1.0:
                    adc = adc * self.b_scale
                v = b0 * np.exp(-adc / 1000.0)
            else:
                v = _eval(layer.values[c], qm)
            vals[c] = v
            sub = self.img[c][sl]
            sub += occ * (np.asarray(v, np.float32) - sub)
        if self.track:
            inside = occ > 0.5
            self.owner[sl][inside] = layer.code
            if layer.mark:
                m = self.marks.setdefault(layer.mark, np.zeros(self.grid.size, bool))
                m[sl] |= inside
