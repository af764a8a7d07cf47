"""Evaluation: metrics (scikit-learn), bootstrap CIs, calibration, plots, cross-validated ablation."""
