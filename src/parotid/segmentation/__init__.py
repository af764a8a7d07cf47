"""Parotid gland + tumour segmentation: whole-study and box-prompted models (MONAI UNet)."""
