"""Defaults of the served classification models: what ``python -m parotid.classification.train``, the app's
trainer (``/train/classify_*``) and an infer task without a checkpoint assume."""

from parotid.sequences import CLASSIFIER_SEQUENCES
from parotid.subsets import MINIMUM_SEQUENCES

# The sequences of Liu et al.'s best model (T2, CE-T1, DWI b1000; they fused them LATE, one branch per
# sequence) + ADC. How they are fused is `train_task_model(fusion=...)`, recorded as the checkpoint's
# `fusion` (models.FUSIONS).
DEFAULT_SEQS = CLASSIFIER_SEQUENCES
# Served variant: late fusion Spl, the winner of the CV ablation at the server's settings (docs/results.md).
DEFAULT_FUSION = "spl"
DEFAULT_REQUIRED = MINIMUM_SEQUENCES  # the others may be missing: their branches drop out (late) / zero channels (early)
DEFAULT_BRANCH_DROPOUT = 0.5  # stage 2 also sees the training studies with optional branches removed
# Stage 2 (the sequence head over frozen slice features): AdamW at this learning rate, weight decay 1e-4.
# Liu et al. use Adam at 1e-5 for stage 2 (and 1e-4 for stage 1; ours: AdamW one-cycle 1e-3); measured
# against theirs in docs/results/stage2_lr.md.
DEFAULT_STAGE2_LR = 1e-3
TASK_LABEL_SETS = {"classify_subtype": "subtype4", "classify_malignancy": "benign_malignant"}
# The training settings of the shipped checkpoints (``task_model.train_task_model``'s defaults, the recipe of
# scripts/train_models.sh): what ``parotid-eval cv --server-settings`` cross-validates.
SERVED_TRAINING = {"epochs1": 12, "epochs2": 60, "val_frac": 0.2, "patience1": 4, "patience2": 15,
                   "branch_dropout": DEFAULT_BRANCH_DROPOUT, "required": DEFAULT_REQUIRED}
