"""Classification networks (torchvision / PyTorch building blocks, trained from scratch: weights=None).

* :class:`ImageNet` — Liu et al. (seed 000) image network: ResNet-18 ``conv1..layer2`` on a slice
  crop, ``torchvision.ops.roi_align`` on the tumour box, FC feature, dropout 0.5 + FC classifier.
  ``l2_alpha`` turns the head into the L2-constrained softmax of seed 003 (features rescaled to norm
  alpha before the classifier).
* :class:`SequenceModel` — Liu's sequence network: one :class:`ImageNet` branch per sequence group
  (a group with several sequences = early fusion as channels; several groups = late fusion by
  addition ``add`` or concatenation/splicing ``spl``), a 1-layer 4-head ``nn.TransformerEncoder`` over
  the slice sequence, max-pool over slices, optional clinical variables concatenated to the pooled
  feature (ours, inspired by seed 002, where the radiologists, not the model, used clinical data),
  dropout 0.5 + FC. Trained in two stages (branches first, then the sequence head over frozen
  features), see ``train.py``.
* :class:`ResNet18SliceClassifier` — ours, inspired by Xia et al. (seed 001): torchvision resnet18
  ``conv1..layer3`` + global pooling on whole box crops (48 px by default), our sequences (+ optional
  BINARY gland mask) as channels, classes = the label set plus ``tumour_free``. 001 used a ResNet-18
  reduced to 2 residual blocks on 224 px T1/CE-T1/T2 + a gland IMAGE channel. Patient decisions:
  ``slice_classifier.py``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet18
from torchvision.ops import roi_align


def resnet_trunk(in_ch: int, upto: str = "layer2") -> nn.Sequential:
    """torchvision resnet18 (weights=None) from conv1 up to `upto`, first conv adapted to `in_ch`."""
    r = resnet18(weights=None)
    conv1 = nn.Conv2d(in_ch, 64, kernel_size=7, stride=2, padding=3, bias=False) if in_ch != 3 else r.conv1
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    mods = OrderedDict()
    for n in names:
        mods[n] = conv1 if n == "conv1" else getattr(r, n)
        if n == upto:
            break
    return nn.Sequential(mods)


TRUNK_CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
TRUNK_STRIDE = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


class ImageNet(nn.Module):
    """Slice crop (B, C, S, S) + box (B, 4) -> feature (B, D) -> logits."""

    def __init__(self, in_ch: int, n_classes: int, feat_dim: int = 128, roi_size: int = 3,
                 l2_alpha: float | None = None, dropout: float = 0.5):
        super().__init__()
        self.trunk = resnet_trunk(in_ch, "layer2")
        self.roi_size = roi_size
        self.proj = nn.Sequential(nn.Linear(TRUNK_CHANNELS["layer2"] * roi_size * roi_size, feat_dim), nn.ReLU(inplace=False))
        self.l2_alpha = l2_alpha
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat_dim, n_classes))
        self.feat_dim = feat_dim

    def features(self, x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(x)
        idx = torch.arange(x.shape[0], dtype=box.dtype, device=box.device)[:, None]
        rois = torch.cat([idx, box], dim=1)
        r = roi_align(fmap, rois, output_size=self.roi_size, spatial_scale=1.0 / TRUNK_STRIDE["layer2"],
                      sampling_ratio=2, aligned=True)
        f = self.proj(r.flatten(1))
        if self.l2_alpha:
            f = self.l2_alpha * F.normalize(f, dim=1)
        return f

    def forward(self, x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, box))


# How a classifier fuses its sequences -- the checkpoint config's one "fusion" key: "early" (all sequences as
# channels of one branch) or late, one branch per sequence, combined by "spl" (concatenated slice features)
# or "add" (summed).
FUSIONS = ("early", "spl", "add")


def branch_combiner(fusion: str) -> str:
    """SequenceModel's ``fusion`` (how branches are combined) for a checkpoint's fusion: early fusion has
    one branch, combined as "spl" (identical to "add" for one branch)."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {fusion!r}")
    return "spl" if fusion == "early" else fusion


class SequenceModel(nn.Module):
    """Input ``x`` (B, N, C, S, S) with C = all sequences of the model, ``box`` (B, 4)."""

    def __init__(self, groups: list[list[int]], n_classes: int, n_slices: int, fusion: str = "spl",
                 feat_dim: int = 128, n_clinical: int = 0, nhead: int = 4, l2_alpha: float | None = None):
        super().__init__()
        if fusion not in ("add", "spl"):
            raise ValueError(f"fusion must be 'add' or 'spl', got {fusion}")
        self.groups = [list(g) for g in groups]
        self.fusion = fusion
        self.branches = nn.ModuleList(ImageNet(len(g), n_classes, feat_dim, l2_alpha=l2_alpha) for g in self.groups)
        d = feat_dim * (len(groups) if fusion == "spl" else 1)
        self.d_model = d
        self.pos = nn.Parameter(torch.zeros(1, n_slices, d))
        layer = nn.TransformerEncoderLayer(d_model=d, nhead=nhead, dim_feedforward=2 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.n_clinical = n_clinical
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(d + n_clinical, n_classes))

    def branch_features(self, x: torch.Tensor, box: torch.Tensor, present: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-branch slice features [(B, N, D)]; a branch absent in a study (``present`` (B, branches)
        False: its sequence is missing) contributes zeros, whatever its input channels hold."""
        B, N = x.shape[:2]
        boxes = box.repeat_interleave(N, dim=0)
        feats = []
        for b, (g, br) in enumerate(zip(self.groups, self.branches)):
            if present is not None and not bool(present[:, b].any()):
                feats.append(x.new_zeros(B, N, br.feat_dim))  # missing in every study: not run at all
                continue
            xi = x[:, :, g].reshape(B * N, len(g), *x.shape[-2:])
            f = br.features(xi, boxes).reshape(B, N, -1)
            feats.append(f if present is None else f * present[:, b].to(f.dtype)[:, None, None])
        return feats

    def fuse(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Liu's late fusion of branch features: addition (Add) or concatenation/splicing (Spl). A missing
        branch is a zero term of the sum (Add: the available branches' sum) or a zero block of the
        concatenation (Spl: the head, trained with branch dropout, sees which block is empty)."""
        return torch.stack(feats).sum(0) if self.fusion == "add" else torch.cat(feats, dim=-1)

    def slice_features(self, x: torch.Tensor, box: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuse(self.branch_features(x, box, present))

    def forward_features(self, f: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        z = self.encoder(f + self.pos[:, : f.shape[1]])
        z = z.max(dim=1).values
        if self.n_clinical:
            if clinical is None:
                raise ValueError("this model needs clinical variables")
            z = torch.cat([z, clinical.to(z.dtype)], dim=1)
        return self.head(z)

    def forward(self, x: torch.Tensor, box: torch.Tensor, clinical: torch.Tensor | None = None,
                present: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(self.slice_features(x, box, present), clinical)


class ResNet18SliceClassifier(nn.Module):
    """Early-fusion 2D slice classifier, resnet18 conv1..`upto` + global average pooling over whole crops:
    (B, C, S, S) -> logits over label-set classes + tumour-free (ours, inspired by seed 001)."""

    def __init__(self, in_ch: int, n_classes: int, upto: str = "layer3", dropout: float = 0.3):
        super().__init__()
        self.trunk = resnet_trunk(in_ch, upto)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(TRUNK_CHANNELS[upto], n_classes + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """Temperature scaling (Guo et al. 2017): T minimising the NLL of logits / T on a validation split."""
    logits, labels = logits.detach().double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return float(min(max(t, 0.05), 20.0))
