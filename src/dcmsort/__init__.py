"""dcmsort: sort a dump of unorganised DICOM files into a clean, predictable tree."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``dcmsort.tables(OUT)``: the module, imported on first use (it is callable), so that
    ``import dcmsort`` imports neither pyarrow nor pandas."""
    if name == "tables":
        import importlib

        return importlib.import_module("dcmsort.tables")
    raise AttributeError(f"module 'dcmsort' has no attribute {name!r}")
