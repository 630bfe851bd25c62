"""Benchmarks and synthetic test data for deid-router (not part of the installed package).

``bench.synthetic`` makes realistic synthetic DICOM instances (CT series, an instance
with planted PHI markers, ultrasound images with burned-in text); ``bench.filemode``
times ``deid-router deid`` against a plain pydicom read+write of the same files.
"""
