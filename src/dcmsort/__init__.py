"""dcmsort: sort a dump of unorganised DICOM files into a clean, predictable tree."""

__version__ = "0.1.0"
