"""Benchmarks and synthetic test data for deid-router (not part of the installed package).

``python -m bench`` runs the suite (bench/README.md): ``bench.paths`` are the measured
paths, ``bench.peers`` the processes they start (storescp, Orthanc, the node, the
pass-through), ``bench.measure`` what a row records. ``bench.synthetic`` makes realistic
synthetic DICOM instances (CT series, an instance with planted PHI markers, ultrasound
images with burned-in text); ``bench.filemode`` and ``bench.network`` are single-path runs.
"""
