"""mvtec-ray: distributed anomaly detection for MVTec AD-style datasets."""
__version__ = "0.1.0"
