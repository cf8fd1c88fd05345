"""Stage 1, data: dataset catalogs (MVTec AD folders, manifests), image decoding, augmentation, synthetic defects and the built-in sample data."""
