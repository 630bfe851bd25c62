"""deid-router: receive DICOM, de-identify every instance, forward it."""

__version__ = "0.1.0"
