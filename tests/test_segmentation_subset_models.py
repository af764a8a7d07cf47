"""One whole-study segmentation checkpoint with weights for complete and for incomplete studies (issue 15,
parotid.segmentation.subset_models): the study's sequences choose the weights; combining keeps each part
bit for bit and refuses parts that do not fit together; retraining such a file retrains both parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parotid.cohort import load_cohort
from parotid.segmentation.networks import FULL_RES, HALF_RES, NETWORK_KEY, SEGMENTATION, network_shape
from parotid.segmentation.sequence_dropout import SUBSETS, missing_in
from parotid.segmentation.checkpoint import load_segmentation
from parotid.segmentation.subset_models import (COMPLETE, INCOMPLETE, SUBSET_MODELS, check_parts, combine, part_entries,
                                                part_for, state_dict_of)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample-data" / "studies"
MODEL = ROOT / "apps" / "parotid" / "model" / "segmentation.pt"


def _plain(tmp_path: Path, name: str, part: str = COMPLETE, shift: float = 0.0, **extra) -> str:
    """A one-part checkpoint from a part of the shipped file (weights shifted by `shift`)."""
    ck = torch.load(MODEL, map_location="cpu", weights_only=True)
    state = {k: v + shift if v.is_floating_point() else v for k, v in state_dict_of(ck, part).items()}
    out = {k: v for k, v in ck.items() if k not in (SUBSET_MODELS, NETWORK_KEY)}
    out.update(model=state, stats={"part": name}, **{NETWORK_KEY: network_shape(part_entries(ck, part)).as_dict()})
    out.update(extra)
    path = tmp_path / name / "segmentation.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return str(path)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_shipped_file_serves_incomplete_studies_with_their_own_weights():
    ck = torch.load(MODEL, map_location="cpu", weights_only=True)
    seqs = SEGMENTATION.sequences
    assert part_for(ck, SEGMENTATION, seqs) == COMPLETE
    for subset in [s for s in SUBSETS if s != "all"] + ["no_T1"]:
        lacking = missing_in(subset, seqs) if subset in SUBSETS else ("T1",)
        assert part_for(ck, SEGMENTATION, [s for s in seqs if s not in lacking]) == INCOMPLETE, subset
    assert not _equal(state_dict_of(ck, COMPLETE), state_dict_of(ck, INCOMPLETE))
    assert ck["required"] == ["T2"] and "serves" in ck["stats"][SUBSET_MODELS][INCOMPLETE]
    seg = load_segmentation(str(MODEL))  # the one loader builds every part once
    assert seg.network_for(["T2"]) == (INCOMPLETE, seg.subset_nets[INCOMPLETE]) and seg.network_for(seqs)[1] is seg.net
    assert seg.network_for(["T2"])[1] is seg.network_for(["T2", "CET1"])[1]
    assert _equal(seg.subset_nets[INCOMPLETE].state_dict(), state_dict_of(ck, INCOMPLETE))
    # a file without incomplete-study weights serves its one model to every study, as before
    assert part_for({"model": ck["model"]}, SEGMENTATION, ["T2"]) == COMPLETE


def test_combine_keeps_each_part_and_refuses_parts_that_do_not_fit(tmp_path):
    a = _plain(tmp_path, "a")
    b = _plain(tmp_path, "b", shift=0.01)
    out = tmp_path / "out" / "segmentation.pt"
    stats = combine(a, b, str(out))
    ck = torch.load(out, map_location="cpu", weights_only=True)
    assert _equal(state_dict_of(ck, COMPLETE), torch.load(a, weights_only=True)["model"])
    assert _equal(state_dict_of(ck, INCOMPLETE), torch.load(b, weights_only=True)["model"])
    assert stats["part"] == "a" and stats[SUBSET_MODELS][INCOMPLETE]["part"] == "b"
    assert (out.parent / "segmentation.json").exists()
    with pytest.raises(ValueError, match="spacing"):
        combine(a, _plain(tmp_path, "c", spacing=[1.0, 1.0, 3.0]), str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="plain"):
        combine(str(out), b, str(tmp_path / "y.pt"))
    # an uploaded file whose incomplete part does not load into the network is refused (PUT /model check)
    ck[SUBSET_MODELS][INCOMPLETE]["model"] = {k: v for k, v in list(ck["model"].items())[:-1]}
    with pytest.raises(RuntimeError, match="Missing key"):
        check_parts(ck, SEGMENTATION)


def _strides(net: torch.nn.Module) -> list:
    return [m.stride for m in net.modules() if isinstance(m, torch.nn.Conv3d)]


def test_each_part_is_rebuilt_with_the_architecture_it_records(tmp_path):
    """A full-resolution complete part beside a half-resolution incomplete part (the weights have the same
    shapes, so only the record tells them apart): each part is loaded as trained; a file recording nothing is
    the half-resolution network of every checkpoint before the record."""
    full = _plain(tmp_path, "full", **{NETWORK_KEY: FULL_RES.as_dict()})
    half = _plain(tmp_path, "half", part=INCOMPLETE, **{NETWORK_KEY: HALF_RES.as_dict()})
    out = tmp_path / "out" / "segmentation.pt"
    combine(full, half, str(out))
    ck = torch.load(out, map_location="cpu", weights_only=True)
    assert network_shape(ck) == FULL_RES and network_shape(ck[SUBSET_MODELS][INCOMPLETE]) == HALF_RES
    seg = load_segmentation(str(out))
    assert _strides(seg.net)[0] == (1, 1, 1) and _strides(seg.subset_nets[INCOMPLETE])[0] == (2, 2, 2)
    # the record matters: the same weights under the other architecture answer differently
    x = torch.randn(1, SEGMENTATION.in_channels, 32, 32, 8)
    with torch.no_grad():
        y_full = seg.net(x)
        assert torch.equal(load_segmentation(full).net(x), y_full)  # deterministic: the comparison below means something
        unrecorded_ck = dict(torch.load(full, weights_only=True))
        unrecorded_ck.pop(NETWORK_KEY)
        torch.save(unrecorded_ck, tmp_path / "unrecorded.pt")
        unrecorded = load_segmentation(str(tmp_path / "unrecorded.pt")).net  # no record: half resolution
        assert _strides(unrecorded)[0] == (2, 2, 2) and not torch.allclose(unrecorded(x), y_full)


def test_retraining_a_two_part_file_retrains_both_parts(tmp_path):
    from parotid.segmentation.train import train_subset_models

    torch.set_num_threads(1)
    init = tmp_path / "init" / "segmentation.pt"
    # the complete part full resolution, the incomplete one half: each part keeps its architecture
    combine(_plain(tmp_path, "a", **{NETWORK_KEY: FULL_RES.as_dict()}),
            _plain(tmp_path, "b", part=INCOMPLETE, **{NETWORK_KEY: HALF_RES.as_dict()}), str(init))
    out = tmp_path / "out" / "segmentation.pt"
    stats = train_subset_models(SEGMENTATION, load_cohort(str(SAMPLE)), str(out), init_from=str(init),
                                iterations=2, batch_size=1, lr=1e-3, seed=0, val_interval=2, max_val_studies=1)
    ck, start = (torch.load(p, map_location="cpu", weights_only=True) for p in (out, init))
    assert stats["dropout_prob"] == 0.0 and stats[SUBSET_MODELS][INCOMPLETE]["dropout_prob"] == 1.0
    for part in (COMPLETE, INCOMPLETE):  # each part fine-tuned from its own weights
        new, old, other = (state_dict_of(c, p) for c, p in ((ck, part), (start, part), (start, COMPLETE if part == INCOMPLETE else INCOMPLETE)))
        assert not _equal(new, old)
        key = next(k for k in new if new[k].is_floating_point() and new[k].numel() > 100)
        assert (new[key] - old[key]).abs().max() < (new[key] - other[key]).abs().max(), part
    assert sorted(p.name for p in out.parent.iterdir()) == ["segmentation.json", "segmentation.pt"]
    assert network_shape(ck) == FULL_RES and network_shape(ck[SUBSET_MODELS][INCOMPLETE]) == HALF_RES


def test_the_server_trainer_from_scratch_keeps_the_served_architecture_of_each_part(tmp_path):
    """`POST /train/segmentation {"from_scratch": true}` runs lib/trainers/segmentation.py: new weights, but in
    the served file's architecture part by part — the full-resolution complete part is not silently swapped
    for the spec's half-resolution default (forced past the gate so the candidate is served and read back)."""
    import shutil
    import sys

    from parotid.cohort import open_datastore
    from parotid.segmentation.train import recorded_shapes

    app = str(ROOT / "apps" / "parotid")
    sys.path.insert(0, app)
    try:
        from lib.trainers.segmentation import TrainSegmentation
    finally:
        sys.path.remove(app)
    torch.set_num_threads(1)
    served = tmp_path / "model" / "segmentation.pt"
    served.parent.mkdir()
    shutil.copy(MODEL, served)
    assert recorded_shapes(str(served)) == {COMPLETE: FULL_RES, INCOMPLETE: HALF_RES}
    assert recorded_shapes(str(tmp_path / "none.pt")) == {}
    result = TrainSegmentation(SEGMENTATION, str(served))(
        {"from_scratch": True, "iterations": 2, "batch_size": 1, "force": True}, open_datastore(str(SAMPLE)))
    assert result["promoted"], result
    ck, shipped = (torch.load(p, map_location="cpu", weights_only=True) for p in (served, MODEL))
    assert recorded_shapes(str(served)) == {COMPLETE: FULL_RES, INCOMPLETE: HALF_RES}
    assert not _equal(state_dict_of(ck, COMPLETE), state_dict_of(shipped, COMPLETE))  # trained anew
    assert _strides(load_segmentation(str(served)).net)[0] == (1, 1, 1)


def test_extract_then_combine_gives_back_the_same_parts(tmp_path):
    """Swapping one part keeps the other bit for bit: both parts of the shipped file, extracted as plain
    checkpoints and combined again, are the same weights, architectures and needs; a missing part is named."""
    from parotid.segmentation.subset_models import extract

    paths = {p: str(tmp_path / p / "segmentation.pt") for p in (COMPLETE, INCOMPLETE)}
    for part, path in paths.items():
        extract(str(MODEL), part, path)
        assert SUBSET_MODELS not in torch.load(path, weights_only=True)
    out = tmp_path / "again" / "segmentation.pt"
    combine(paths[COMPLETE], paths[INCOMPLETE], str(out))
    new, old = (torch.load(p, map_location="cpu", weights_only=True) for p in (out, MODEL))
    for part in (COMPLETE, INCOMPLETE):
        assert _equal(state_dict_of(new, part), state_dict_of(old, part)), part
        assert network_shape(part_entries(new, part)) == network_shape(part_entries(old, part)), part
    assert (new["required"], new["optional"], new["spacing"]) == (old["required"], old["optional"], old["spacing"])
    with pytest.raises(ValueError, match="no part 'incomplete'"):
        extract(paths[COMPLETE], INCOMPLETE, str(tmp_path / "x.pt"))


def test_the_served_file_runs_complete_studies_at_full_resolution_and_incomplete_ones_at_half():
    """apps/parotid/model/segmentation.pt (docs/model-card-segmentation.md, issue 12 item 7): the complete part is
    the full-resolution UNet (round k), the incomplete part the half-resolution sequence-dropout weights (round f);
    each is rebuilt from its own record, with the training spacing and the sequence needs of the file."""
    ck = torch.load(MODEL, map_location="cpu", weights_only=True)
    assert network_shape(part_entries(ck, COMPLETE)) == FULL_RES
    assert network_shape(part_entries(ck, INCOMPLETE)) == HALF_RES
    seg = load_segmentation(str(MODEL))
    assert _strides(seg.net)[0] == (1, 1, 1) and _strides(seg.subset_nets[INCOMPLETE])[0] == (2, 2, 2)
    assert (ck["spacing"], ck["required"]) == ([1.5, 1.5, 3.0], ["T2"])


@pytest.mark.parametrize("record", [{"channels": [8, 16], "strides": "x"}, {"strides": [2]},
                                    {"channels": [4096, 4096, 4096, 4096], "strides": [2, 2, 2]},
                                    {"channels": [8, 16, 32, 64], "strides": [2, 2]}])
def test_a_bad_architecture_record_is_refused_before_building(tmp_path, record):
    """An uploaded file whose `network` record is malformed or asks for a huge network gets a clear error
    (PUT /model maps it to 4xx) instead of allocating it; its good twin (the recorded FULL_RES) loads."""
    good = _plain(tmp_path, "good", **{NETWORK_KEY: FULL_RES.as_dict()})
    assert _strides(load_segmentation(good).net)[0] == (1, 1, 1)
    bad = _plain(tmp_path, "bad", **{NETWORK_KEY: record})
    with pytest.raises(ValueError, match="'network'"):
        load_segmentation(bad)
