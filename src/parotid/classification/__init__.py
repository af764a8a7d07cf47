"""Tumour classification on multi-sequence MRI box crops (see models.py, train.py, predict.py)."""
