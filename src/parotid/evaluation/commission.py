"""``parotid-eval commission``: accept a new site (scanner / protocol) for the served models, on evidence.

    parotid-eval commission --cohort /data/siteB_labelled --site siteB --models ~/.parotid/model

The input check compares every study's intensity statistics with the training cohort's, so a hospital
whose scanner differs gets "undetermined" for every study (docs/results.md 3a: all 47 studies of each
other synthetic profile), whether or not the models work there. Commissioning is the local acceptance
test a site runs once with a labelled cohort of its own studies (``parotid-import``, labels.csv):

1. the served classifiers run on every labelled study through the served path
   (``parotid.evaluation.sites.site_rows``: resampling, calibrated probabilities, MC dropout);
2. the site is accepted only when every served classifier meets the bars on it: benign/malignant ROC-AUC
   >= ``--min-roc-auc`` (issue 14's external target 0.90) and, for more than two classes, macro-AUC >=
   ``--min-macro-auc`` (0.85), with at least ``--min-studies`` studies and ``--min-malignant`` malignant
   and as many benign ones;
3. then the site's own intensity reference (``input_check.fit_site_intensity``: leave-one-out thresholds)
   and protocol geometry (its studies' voxel spacings +- 10 %, ``input_check.site_geometry``) are added to
   ``<models>/input_check.json`` with the evidence (metrics with CIs, checkpoints' SHA-256, cohort, date).
   Studies of that protocol whose statistics match pass the intensity component; every other component (physical,
   anatomy, tumour in the box, the classifier-feature density) is unchanged, and a duplicated or swapped
   series still fails the site's own sequence-pair statistics.

A site that misses a bar is refused (exit code 2, the failing metric named) and nothing is written. The
evidence is for the checkpoints it names: a classifier whose checkpoint changed since does not get the site's
acceptance (``input_check.require_site_evidence``) until the site is commissioned again.
Segmentation quality at the site is not part of the gate (measure it with
``python -m parotid.segmentation.subset_eval`` on the same cohort).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np
import torch

from parotid import input_check
from parotid.checksums import sha256_of

from .report import write_report
from .sites import evaluate_site, site_rows

BARS = {"min_roc_auc": 0.90, "min_macro_auc": 0.85, "min_studies": 30, "min_malignant": 5}


class SiteFeatures:
    """``intensity_features`` and sorted voxel spacing of every study with the served minimum (T2), collected
    while ``site_rows`` reads the cohort (each study is read once)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.spacings: list[list[float]] = []

    def __call__(self, study) -> None:
        from parotid import subsets

        if all(q in study.sequences for q in subsets.MINIMUM_SEQUENCES):
            self.rows.append(input_check.intensity_features(study))
            self.spacings.append(input_check.sorted_spacing(study))


def gate(metrics: dict, bars: dict) -> list[str]:
    """The bars a task's site metrics miss (empty: accepted). `metrics`: ``evaluate_site(...)["all"]``."""
    if metrics is None:
        return ["no metrics: the cohort needs benign and malignant studies with the served minimum sequences"]
    miss = []
    if metrics["n"] < bars["min_studies"]:
        miss.append(f"{metrics['n']} studies < {bars['min_studies']}")
    nm = metrics["n_malignant"]
    if min(nm, metrics["n"] - nm) < bars["min_malignant"]:
        miss.append(f"{nm} malignant / {metrics['n'] - nm} benign studies: at least {bars['min_malignant']} of each")
    auc = metrics["roc_auc"][0]
    if not auc >= bars["min_roc_auc"]:
        miss.append(f"benign/malignant ROC-AUC {auc:.3f} < {bars['min_roc_auc']:.2f}")
    if "macro_auc" in metrics and not metrics["macro_auc"][0] >= bars["min_macro_auc"]:
        miss.append(f"macro-AUC {metrics['macro_auc'][0]:.3f} < {bars['min_macro_auc']:.2f}")
    return miss


def commission(folder: str, site: str, models: str, bars: dict, tasks=None, dry_run: bool = False,
               n_boot: int = 1000, seed: int = 0, progress=print) -> dict:
    """Evaluate the served classifiers of `models` on the labelled cohort `folder`; if every one meets
    `bars`, add `site`'s intensity reference to ``<models>/input_check.json`` (unless `dry_run`)."""
    import glob

    if not os.path.isdir(folder):
        raise SystemExit(f"cohort folder not found: {folder} (a labelled cohort: parotid-import or parotid-synth output)")
    if not os.path.exists(os.path.join(models, input_check.REFERENCE_FILE)):
        raise SystemExit(f"no {input_check.REFERENCE_FILE} in {models}: nothing to commission a site for")
    tasks = tasks or sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(models, "classify_*.pt")))
    if not tasks:
        raise SystemExit(f"no classify_*.pt in {models}")
    t0 = time.time()
    feats = SiteFeatures()
    rows = site_rows(folder, [models], tasks, {}, progress=progress, on_study=feats)
    per_task, misses = {}, {}
    for t in tasks:
        rs = [r for r in rows.get((models, t), []) if r["prob"] is not None]
        ev = evaluate_site(rs, rows["_label_sets"][(models, t)], n_boot, seed) if rs else {"all": None}
        per_task[t] = {"sha256": sha256_of(os.path.join(models, f"{t}.pt")), "metrics": ev["all"],
                       "refused_missing_minimum": rows["_refused"].get((models, t), 0),
                       "flagged_before": ev.get("input_check", {}).get("n_flagged")}
        misses[t] = gate(ev["all"], bars)
    intensity = input_check.fit_site_intensity(feats.rows)
    geometry = input_check.site_geometry(feats.spacings) if feats.spacings else None
    accepted = not any(misses.values())
    evidence = {"site": site, "cohort": os.path.abspath(folder), "n_studies": len(feats.rows),
                "unreadable": rows["_unreadable"],
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(["parotid-eval"] + sys.argv[1:]), "bars": bars, "tasks": per_task,
                "segmentation_sha256": sha256_of(os.path.join(models, "segmentation.pt"))
                if os.path.exists(os.path.join(models, "segmentation.pt")) else None}
    result = {"site": site, "accepted": accepted, "written": False, "missed": {t: m for t, m in misses.items() if m},
              "evidence": evidence, "intensity_entries": sorted(intensity), "geometry": geometry,
              "seconds": round(time.time() - t0, 1)}
    if accepted and not dry_run:
        result["reference"] = input_check.set_site(models, site, intensity, evidence, geometry)
        result["written"] = True
    return result


def markdown(res: dict) -> str:
    bad = res["evidence"].get("unreadable") or {}
    lines = [f"Site `{res['site']}`: **{'accepted' if res['accepted'] else 'refused'}**"
             + ("" if res["written"] else " (nothing written)") + f"; cohort `{res['evidence']['cohort']}`, "
             f"{res['evidence']['n_studies']} studies with the served minimum"
             + (f"; {len(bad)} unreadable, left out: " + "; ".join(f"{k}: {v}" for k, v in list(bad.items())[:5])
                if bad else "") + ".", "",
             "| Task | n (malignant) | ROC-AUC (b/m) | Macro-AUC | flagged by the input check before | missed bars |",
             "|---|---|---|---|---|---|"]
    for t, v in res["evidence"]["tasks"].items():
        m = v["metrics"] or {}
        auc = m.get("roc_auc")
        mac = m.get("macro_auc")
        lines.append(f"| {t} | {m.get('n', 0)} ({m.get('n_malignant', 0)}) | "
                     f"{'n/a' if auc is None else f'{auc[0]:.2f} ({auc[1]:.2f}–{auc[2]:.2f})'} | "
                     f"{'–' if mac is None else f'{mac[0]:.2f} ({mac[1]:.2f}–{mac[2]:.2f})'} | {v['flagged_before']} | "
                     f"{'; '.join(res['missed'].get(t, [])) or 'none'} |")
    return "\n".join(lines)


def cmd_commission(a) -> dict:
    torch.set_num_threads(a.threads)
    bars = {"min_roc_auc": a.min_roc_auc, "min_macro_auc": a.min_macro_auc, "min_studies": a.min_studies,
            "min_malignant": a.min_malignant}
    res = commission(a.cohort, a.site, a.models, bars, a.tasks, a.dry_run, a.n_boot, a.seed)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        write_report(a.out, a.name or f"commission_{a.site}", res, markdown(res))
    print(markdown(res))
    if not res["accepted"]:
        print(f"\nsite '{a.site}' NOT commissioned: " + "; ".join(f"{t}: {', '.join(m)}" for t, m in res["missed"].items())
              + f". {input_check.REFERENCE_FILE} unchanged; its studies stay flagged by the input check.", file=sys.stderr)
        if a.argv is None:
            raise SystemExit(2)
    elif res["written"]:
        print(f"\nsite '{a.site}' commissioned: {res['reference']}")
    return res


def add_parser(sub) -> None:
    s = sub.add_parser("commission", help="accept a site (scanner/protocol) for the served models on a labelled "
                                          "cohort of its studies: gated, then its intensity reference is added to "
                                          "the input check")
    s.add_argument("--cohort", required=True, help="labelled cohort folder of the site (parotid-import / parotid-synth)")
    s.add_argument("--site", required=True, help="the site's name (shown in results: reference site:<name>)")
    s.add_argument("--models", default="apps/parotid/model", help="the SERVED model folder (input_check.json is updated)")
    s.add_argument("--tasks", nargs="+", default=None, help="classifiers to gate (default: every classify_*.pt)")
    s.add_argument("--min-roc-auc", type=float, default=BARS["min_roc_auc"])
    s.add_argument("--min-macro-auc", type=float, default=BARS["min_macro_auc"])
    s.add_argument("--min-studies", type=int, default=BARS["min_studies"])
    s.add_argument("--min-malignant", type=int, default=BARS["min_malignant"],
                   help="at least this many malignant and this many benign studies")
    s.add_argument("--dry-run", action="store_true", help="evaluate and report, write nothing")
    s.add_argument("--out", default=None, help="also write <out>/<name>.json/.md")
    s.add_argument("--name", default=None)
    s.add_argument("--n-boot", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(fn=cmd_commission)
