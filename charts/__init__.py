"""Helm charts of cxr-screen and their offline validation (``python -m charts.validate``)."""
