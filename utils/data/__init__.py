"""Data: the standardized datasets and their preprocessing (``dataset``), the training
augmentation (``augment``) and the reading of image files and folders (``images``)."""
