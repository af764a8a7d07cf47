"""``parotid-synth``: deterministic SYNTHETIC parotid MRI phantom cohort.

Example::

    parotid-synth --out /data/synth --n 200 --seed 1
    parotid-synth --out sample-data/studies --n 18 --seed 7 --no-raw --keep CET1,T2
"""

from __future__ import annotations

import argparse
import sys

from parotid.sequences import SEQUENCE_KEYS
from parotid.synth.profiles import PROFILES, describe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parotid-synth",
        description="Generate a deterministic SYNTHETIC multi-sequence parotid MRI cohort (phantoms, not patient data).")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite/--append)")
    p.add_argument("--n", type=int, required=True, help="number of studies (> 0)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (>= 0); study ids are syn<seed>_<index:04d>")
    p.add_argument("--start", type=int, default=0, help="index of the first study (default 0)")
    p.add_argument("--dicom", action="store_true", help="also write one DICOM MR series per sequence under dicom/")
    p.add_argument("--no-raw", action="store_true", help="do not write the native acquisitions under raw/")
    p.add_argument("--keep", default="", help="comma-separated sequences never dropped (e.g. CET1,T2); "
                                              "by default ~10%% of studies lack one sequence")
    p.add_argument("--overwrite", action="store_true", help="replace an existing parotid-synth cohort folder")
    p.add_argument("--append", action="store_true", help="add studies to an existing cohort folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="acquisition profile (scanner/site): contrast, SNR, voxel size, slice gap, bias, fat "
                        "saturation, DWI shift, ADC calibration, vendor scale; the patients (anatomy, tumours, "
                        "labels) do not depend on it. 'default' is the historical generator. Written to the "
                        "'site' column of cohort.csv. See --list-profiles and src/parotid/synth/README.md")
    p.add_argument("--list-profiles", action="store_true", help="print the profiles (JSON) and exit")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if "--list-profiles" in argv:
        print(describe())
        return 0
    args = parser.parse_args(argv)
    if args.n <= 0:
        parser.error(f"--n must be a positive number of studies, got {args.n}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.start < 0:
        parser.error(f"--start must be >= 0, got {args.start}")
    if args.overwrite and args.append:
        parser.error("--overwrite and --append exclude each other")
    keep = tuple(k.strip() for k in args.keep.split(",") if k.strip())
    bad = [k for k in keep if k not in SEQUENCE_KEYS]
    if bad:
        parser.error(f"--keep: unknown sequence(s) {bad}; known: {list(SEQUENCE_KEYS)}")

    from parotid.synth.cohort import CohortError, prepare_out, write_cohort

    try:
        prepare_out(args.out, overwrite=False, append=args.append) if not args.overwrite else None
    except CohortError as e:
        parser.error(str(e))
    try:
        s = write_cohort(args.out, args.n, args.seed, start=args.start, raw=not args.no_raw, dicom=args.dicom,
                         overwrite=args.overwrite, append=args.append, keep=keep, progress=not args.quiet,
                         profile=args.profile)
    except CohortError as e:
        parser.error(str(e))
    print(f"wrote {len(s.study_ids)} SYNTHETIC studies ({args.profile} profile) to {s.out} in {s.seconds:.1f} s "
          f"({s.seconds_studies / len(s.study_ids):.2f} s/study + {s.seconds - s.seconds_studies:.1f} s "
          f"MONAI Label datastore indexing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
