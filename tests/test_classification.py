"""Classification models, crops, training pieces and single-study inference (no server)."""

import numpy as np
import pytest
import torch

from parotid.classification.crops import box_in_crop, crop_window, extract_crop, paste_heatmap
from parotid.classification.models import ImageNet, SequenceModel, ResNet18SliceClassifier, fit_temperature
from toy_cohort import toy_study, write_toy_cohort
from parotid.labels import get_label_set
from parotid.study import StudyError

torch.set_num_threads(1)


def test_crop_box_position_and_normalisation():
    arr = np.random.default_rng(0).normal(500, 50, (2, 60, 50, 20)).astype(np.float32)
    roi = [20, 40, 10, 30, 5, 9]
    c = extract_crop(arr, roi, size=32, n_slices=6)
    assert c.slices.shape == (6, 2, 32, 32)
    assert list(c.ks) == [5, 6, 6, 7, 8, 8] or (c.ks.min() == 5 and c.ks.max() == 8)
    w = crop_window(roi)
    assert w == (15, 45, 5, 35)
    assert np.allclose(c.box, [5 * 32 / 30, 5 * 32 / 30, 25 * 32 / 30, 25 * 32 / 30])
    # percentile scaling: values mostly within [0, 1]
    assert 0.3 < np.median(c.slices) < 0.7


def test_crop_window_outside_image_is_zero_padded_and_heatmap_pastes_back():
    arr = np.ones((1, 20, 20, 6), np.float32)
    roi = [0, 8, 12, 20, 0, 3]
    c = extract_crop(arr, roi, size=16, n_slices=4)
    assert c.window[0] < 0 and c.window[3] > 20
    maps = np.ones((4, 16, 16), np.float32)
    vol = paste_heatmap(maps, c, (20, 20, 6), roi)
    assert vol.shape == (20, 20, 6)
    assert vol[:, :, 3:].sum() == 0  # only the box's k-range
    assert vol[0:8, 12:20, 0:3].min() > 0.9


def test_models_forward_shapes_and_fusions():
    x = torch.randn(2, 4, 3, 32, 32)
    box = torch.tensor([[8.0, 8.0, 24.0, 24.0]] * 2)
    for groups, fusion in (([[0, 1, 2]], "spl"), ([[0], [1], [2]], "add"), ([[0], [1, 2]], "spl")):
        m = SequenceModel(groups, 4, 4, fusion)
        assert m(x, box).shape == (2, 4)
    m = SequenceModel([[0], [1], [2]], 2, 4, "spl", n_clinical=3)
    assert m.d_model == 3 * 128
    assert m(x, box, torch.zeros(2, 3)).shape == (2, 2)
    with pytest.raises(ValueError):
        m(x, box)
    assert ResNet18SliceClassifier(4, 3)(torch.randn(5, 4, 32, 32)).shape == (5, 4)  # + tumour-free class
    net = ImageNet(3, 2, l2_alpha=80.0)
    f = net.features(torch.randn(3, 3, 32, 32), box[:1].repeat(3, 1))
    assert torch.allclose(f.norm(dim=1), torch.full((3,), 80.0), atol=1e-3)  # L2-constrained features


def test_checkpoint_fusion_is_one_key_for_old_and_new_files(tmp_path):
    """A checkpoint config says its fusion under one key ("early" / "spl" / "add"). Files written before that
    key ("fusion": the branch combiner "spl" + "fusion_mode": "early" for an early-fusion model) are never
    rewritten: they load with the same config and the same network as a new file."""
    from conftest import APP
    from parotid.classification.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = SequenceModel([[0, 1, 2]], 4, 4, "spl").eval()
    base = {"groups": [["T2", "CET1", "ADC"]], "classes": ["a", "b", "c", "d"], "n_slices": 4,
            "sequences": ["T2", "CET1", "ADC"]}
    save_checkpoint(str(tmp_path / "old.pt"), model, {**base, "fusion": "spl", "fusion_mode": "early"})
    save_checkpoint(str(tmp_path / "new.pt"), model, {**base, "fusion": "early"})
    x, box = torch.randn(2, 4, 3, 32, 32), torch.tensor([[8.0, 8.0, 24.0, 24.0]] * 2)
    (old, old_cfg), (new, new_cfg) = (load_checkpoint(str(tmp_path / f"{n}.pt")) for n in ("old", "new"))
    assert old_cfg == new_cfg and old_cfg["fusion"] == "early" and "fusion_mode" not in old_cfg
    assert torch.equal(old(x, box), new(x, box))
    for path in sorted((APP / "model").glob("classify_*.pt")):  # the shipped files, as they are
        raw = torch.load(path, map_location="cpu", weights_only=True)["config"]
        cfg = load_checkpoint(str(path))[1]
        assert cfg["fusion"] == raw.get("fusion_mode", raw["fusion"]) and "fusion_mode" not in cfg
        assert cfg["fusion"] == ("early" if len(cfg["groups"]) == 1 else cfg["fusion"])


def test_transformer_is_one_layer_four_heads():
    m = SequenceModel([[0]], 2, 8, "spl")
    assert len(m.encoder.layers) == 1 and m.encoder.layers[0].self_attn.num_heads == 4
    # backbone: resnet18 conv1..layer2 only
    names = [n for n, _ in m.branches[0].trunk.named_children()]
    assert names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]


def test_temperature_scaling_recovers_temperature():
    rng = np.random.default_rng(0)
    true_logits = torch.from_numpy(rng.normal(0, 2, (3000, 3)))
    y = torch.distributions.Categorical(logits=true_logits).sample()
    T = fit_temperature(true_logits * 3.0, y)  # overconfident by x3
    assert T == pytest.approx(3.0, rel=0.15)


def test_decision_rule_001():
    from parotid.classification.slice_classifier import decision_rule_001

    ls = get_label_set("subtype4")  # 0 PA, 1 WT, 2 BCA, 3 malignant, 4 tumour-free
    assert ls.classes[decision_rule_001(np.array([3, 3, 3, 0, 0, 0, 0]), ls)] == "malignant"
    assert ls.classes[decision_rule_001(np.array([3, 3, 1, 1, 0, 4, 4]), ls)] == "warthin"
    assert ls.classes[decision_rule_001(np.array([0, 0, 1, 4, 4, 4, 4]), ls)] == "pleomorphic_adenoma"
    bm = get_label_set("benign_malignant")
    assert bm.classes[decision_rule_001(np.array([1, 1, 0, 0]), bm)] == "benign"
    assert bm.classes[decision_rule_001(np.array([1, 1, 1, 0]), bm)] == "malignant"


def _toy_checkpoint(tmp_path_factory, name: str, fusion: str, **kwargs):
    """A classifier trained for a few epochs on a toy cohort, saved and loaded back (model, cfg)."""
    from parotid.classification.data import build_cropset
    from parotid.classification.checkpoint import load_checkpoint, save_checkpoint
    from parotid.classification.task_model import train_task_model

    d = tmp_path_factory.mktemp(name)
    write_toy_cohort(str(d), 24)
    cs = build_cropset(str(d), size=32, n_slices=4)
    model, cfg = train_task_model(cs, "subtype4", ("T2", "CET1", "ADC"), fusion, epochs1=2, epochs2=4, **kwargs)
    p = str(d / f"{name}.pt")
    save_checkpoint(p, model, cfg)
    return load_checkpoint(p)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return _toy_checkpoint(tmp_path_factory, "toy", "early", required=("T2", "CET1"))


def test_checkpoint_roundtrip_and_classify(toy_model):
    from parotid.classification.predict import classify

    model, cfg = toy_model
    assert cfg["label_set"] == "subtype4" and cfg["temperature"] > 0
    study, label, roi = toy_study("malignant", seed=99)
    res, heat = classify(model, cfg, study, roi)
    probs = [p["score"] for p in res["prediction"]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-6)
    assert [p["idx"] for p in res["prediction"]] == [0, 1, 2, 3]
    assert res["predicted_class"] in cfg["classes"]
    assert res["malignancy_probability"] == pytest.approx(probs[3])
    assert isinstance(res["undetermined"], bool)
    assert heat.shape == study.shape and heat.dtype == np.float32
    assert 0 <= heat.min() and heat.max() <= 1.0
    # nothing outside the box's slices; joint (not per-slice) normalisation -> a single global max of 1
    assert heat[:, :, : roi[4]].sum() == 0 and heat[:, :, roi[5]:].sum() == 0
    slice_max = heat[:, :, roi[4]:roi[5]].max(axis=(0, 1))
    assert heat.max() == pytest.approx(1.0)
    assert slice_max[slice_max > 0].min() < 0.99, slice_max  # per-slice normalisation: every slice's max is 1
    # the default map is our hybrid, named apart from plain Grad-CAM ("roi": its old name)
    assert res["heatmap"]["mode"] == "gradcam_x_readout" and "not plain Grad-CAM" in res["heatmap"]["method"]
    plain, _ = classify(model, cfg, study, roi, heatmap_mode="gradcam")
    assert plain["heatmap"]["method"] == "Grad-CAM (plain, layer2)"
    assert classify(model, cfg, study, roi, heatmap_mode="roi")[0]["heatmap"]["mode"] == "gradcam_x_readout"


def test_classify_bad_inputs(toy_model):
    from parotid.classification.predict import classify
    from parotid.study import study_from_array

    model, cfg = toy_model
    study, _, roi = toy_study("warthin", seed=5)
    for bad in ([0, 100, 0, 10, 0, 3], [10, 5, 0, 10, 0, 3], [5, 5, 0, 10, 0, 3], [1, 2, 3]):
        with pytest.raises(StudyError):
            classify(model, cfg, study, bad)
    arr = study.array(["T2", "ADC"])  # CET1 (required) missing
    with pytest.raises(StudyError, match="CET1"):
        classify(model, cfg, study_from_array(arr, ["T2", "ADC"], study.reference), roi)
    # optional ADC missing -> zero channel, still answers, and says so
    arr = study.array(["T2", "CET1"])
    res, _ = classify(model, cfg, study_from_array(arr, ["T2", "CET1"], study.reference), roi, heatmap=False)
    assert res["missing_sequences"] == ["ADC"]
    arr = study.array()
    arr[0, 3, 3, 3] = np.nan
    with pytest.raises(StudyError, match="NaN"):
        classify(model, cfg, study_from_array(arr, study.sequences, study.reference), roi)


def test_box_without_tumour_is_a_valid_answer(toy_model):
    from parotid.classification.predict import classify

    model, cfg = toy_model
    study, _, _ = toy_study("warthin", seed=5)
    res, heat = classify(model, cfg, study, [0, 8, 0, 8, 0, 3])
    assert sum(p["score"] for p in res["prediction"]) == pytest.approx(1.0, abs=1e-6)
    assert heat.shape == study.shape


# ------------------------------------------------------------------ missing sequences, late fusion (issue 12/15)
@pytest.mark.parametrize("fusion", ["spl", "add"])
def test_missing_branch_drops_out_of_late_fusion(fusion):
    """A branch whose sequence is missing contributes nothing: its input channel's content is ignored;
    Add = the sum of the available branches, Spl = the available blocks with a zero block."""
    torch.manual_seed(0)
    m = SequenceModel([[0], [1], [2]], 3, 4, fusion).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    box = torch.tensor([[8.0, 8.0, 24.0, 24.0]] * 2)
    present = torch.tensor([[True, False, True], [True, True, True]])  # study 0 lacks sequence 1
    noisy = x.clone()
    noisy[:, :, 1] = torch.randn_like(noisy[:, :, 1]) * 100
    with torch.no_grad():
        a, b = m(x, box, present=present), m(noisy, box, present=present)
        full = m(x, box)
        fb = m.branch_features(x, box)
        fused = m.slice_features(x, box, present)
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert not torch.allclose(a[0], full[0], atol=1e-3) and torch.allclose(a[1], full[1], atol=1e-5)
    if fusion == "add":
        assert torch.allclose(fused[0], fb[0][0] + fb[2][0], atol=1e-5)
    else:
        assert torch.allclose(fused[0], torch.cat([fb[0][0], torch.zeros_like(fb[1][0]), fb[2][0]], -1), atol=1e-5)


def test_branch_presence_and_dropout_masks():
    from parotid.classification.missing import branch_presence, dropout_masks, used_and_missing

    groups = [["T2"], ["CET1"], ["DWI_B1000"], ["ADC"]]
    assert branch_presence(groups, ["T2", "ADC", "T1"]) == [True, False, False, True]
    assert branch_presence([["T2", "CET1", "ADC"]], ["T2"]) == [True]  # early fusion: zero-filled channels
    assert used_and_missing(groups, ["T2", "ADC"]) == (["T2", "ADC"], ["CET1", "DWI_B1000"])
    m = dropout_masks(groups, ["T2"], 4000, 0.5, np.random.default_rng(0)).numpy()
    assert m[:, 0].all()  # the required branch is never dropped
    assert 0.45 < 1 - m[:, 1].mean() < 0.55
    assert (~m[:, 1:]).all(1).mean() > 0.09  # T2-only rows are trained on (1/8 of the copies)


def test_late_fusion_gradcam_combines_branches_by_their_share():
    from parotid.classification.crops import extract_crop
    from parotid.classification.predict import branch_weights, gradcam_volume

    torch.manual_seed(0)
    m = SequenceModel([[0], [1], [2]], 4, 4, "spl").eval()
    study, _, roi = toy_study("malignant", seed=3)
    crop = extract_crop(study.array(), roi, 32, 4, 0.25)
    x, box = torch.from_numpy(crop.slices)[None], torch.from_numpy(crop.box)[None]
    w = branch_weights(m, x, box, 1)
    assert w.shape == (3,) and w.sum() == pytest.approx(1.0) and (w >= 0).all()
    present = torch.tensor([[True, False, True]])
    w = branch_weights(m, x, box, 1, present=present)
    assert w[1] == 0 and w.sum() == pytest.approx(1.0)
    vol = gradcam_volume(m, x, box, crop, study.shape, roi, 1, present=present)
    assert vol.shape == study.shape and vol.min() >= 0 and vol.max() == pytest.approx(1.0)
    # only the weighted branches contribute: a weight vector on branch 0 alone gives branch 0's map
    v0 = gradcam_volume(m, x, box, crop, study.shape, roi, 1, weights=np.array([1.0, 0.0, 0.0]))
    v2 = gradcam_volume(m, x, box, crop, study.shape, roi, 1, weights=np.array([0.0, 0.0, 1.0]))
    assert not np.allclose(v0, v2)


@pytest.fixture(scope="module")
def toy_late_model(tmp_path_factory):
    return _toy_checkpoint(tmp_path_factory, "toy_late", "spl", required=("T2",), branch_dropout=0.5)


@pytest.mark.parametrize("seqs", [["T2", "CET1", "ADC"], ["T2", "ADC"], ["T2", "CET1"], ["T2"]])
def test_late_fusion_answers_from_the_sequences_a_study_has(toy_late_model, seqs):
    from parotid.classification.predict import classify
    from parotid.study import study_from_array

    model, cfg = toy_late_model
    assert cfg["fusion"] == "spl" and "fusion_mode" not in cfg and cfg["required"] == ["T2"] and cfg["groups"] == [["T2"], ["CET1"], ["ADC"]]
    full, _, roi = toy_study("warthin", seed=7)
    study = study_from_array(full.array(seqs), seqs, full.reference)
    res, heat = classify(model, cfg, study, roi)
    assert sum(p["score"] for p in res["prediction"]) == pytest.approx(1.0, abs=1e-6)
    assert res["sequences_used"] == seqs
    assert res["sequences_missing"] == [q for q in ("T2", "CET1", "ADC") if q not in seqs]
    w = res["heatmap"]["branch_weights"]
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-3) and all(w[q] == 0 for q in res["sequences_missing"])
    assert heat.shape == study.shape and 0 <= heat.min() and heat.max() <= 1.0
    no_t2 = study_from_array(full.array(["CET1", "ADC"]), ["CET1", "ADC"], full.reference)
    with pytest.raises(StudyError, match="T2"):
        classify(model, cfg, no_t2, roi)
