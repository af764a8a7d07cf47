"""Schemathesis fuzzes the REAL server's OpenAPI schema: no request may get a 5xx.

Two passes over a private server (its own copy of the sample studies and app, because fuzzing
uploads, deletes and replaces things):
1. every operation with values generated from the schema alone (random ids, names, bodies, files);
2. the same with real study ids and model names, so that requests get past the 404s into the
   inference, label and checkpoint code paths.
A fixed seed keeps CI reproducible; PAROTID_FUZZ_SEED / PAROTID_FUZZ_EXAMPLES widen it locally.
Data are SYNTHETIC (the bundled sample cohort).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import Server, private_server
from parotid.study import check_roi, read_study

ST = Path(sys.executable).parent / "st"
SEED = os.environ.get("PAROTID_FUZZ_SEED", "20261124")
EXAMPLES = int(os.environ.get("PAROTID_FUZZ_EXAMPLES", "12"))
MODELS = ("segmentation", "contour_box", "classify_subtype", "classify_malignancy")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    srv = private_server(tmp_path_factory.mktemp("fuzz"))
    yield srv
    srv.stop()


def schemathesis(srv: Server, tmp_path: Path, name: str, config: str = "", *args: str) -> str:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(config)
    cmd = [str(ST), "--config-file", str(cfg), "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", str(EXAMPLES), "--workers", "1", "--seed", SEED, "--phases", "examples,coverage,fuzzing",
           "--request-timeout", "120", "--max-failures", "50", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # its cache stays out of the repo
    out = p.stdout + p.stderr
    (tmp_path / f"{name}.log").write_text(out)
    assert p.returncode == 0, f"schemathesis found server errors ({name}):\n{out[-6000:]}\n--- server log ---\n{srv.log_tail()}"
    assert "passed" in out and " 0 generated" not in out, out[-2000:]
    return out


def test_schema_only_values_never_get_a_5xx(fuzz_server, tmp_path):
    out = schemathesis(fuzz_server, tmp_path, "random")
    assert fuzz_server.alive()
    print(out.strip().splitlines()[-1])


def test_real_ids_and_models_never_get_a_5xx(fuzz_server, tmp_path):
    objects = requests.get(f"{fuzz_server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    study = sorted(objects)[0]
    blocks = [f'[[operations]]\ninclude-path-regex = "^/datastore/(image|label)(/info)?$"\n'
              f'parameters = {{ image = "{study}", label = "{study}", tag = "final" }}\n']
    for model in MODELS:  # one run per model: parameters are fixed per operation within a run
        cfg = "\n".join(blocks + [f'[[operations]]\ninclude-path-regex = "^/(infer|model|model/info|batch/infer)/\\\\{{model\\\\}}$"\n'
                                  f'parameters = {{ model = "{model}", image = "{study}" }}\n'])
        schemathesis(fuzz_server, tmp_path, f"real-{model}", cfg,
                     "--include-path-regex", "^/(infer|model|model/info|batch/infer)/\\{model\\}$|^/datastore/(image|label)(/info)?$",
                     "--exclude-method", "DELETE")  # DELETE /model/{real model} is a legitimate admin action
    # fuzzing never replaced a served checkpoint with something unusable, and the label stayed valid
    final = requests.get(f"{fuzz_server.url}/datastore/", params={"output": "all"}, timeout=30).json()[
        "objects"][study]["labels"]["final"]["info"]
    assert final["tumor_class"] in {"pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant"}
    # the box the server holds is still a box inside this study (unchanged, or replaced by a label save /
    # PUT /datastore/label/info, which check it): check_roi raises on anything else, any 6-list included
    check_roi(final["roi"], read_study(os.path.join(fuzz_server.studies, f"{study}.nii.gz")).shape)
    for model in MODELS:
        r = requests.post(f"{fuzz_server.url}/infer/{model}", params={"image": study, "output": "json"},
                          data={"params": json.dumps({"roi": objects[study]["labels"]["final"]["info"].get("roi")})
                                if model != "segmentation" else "{}"}, timeout=120)
        assert r.status_code == 200, (model, r.text)
    assert fuzz_server.alive()
