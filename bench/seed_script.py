"""The seed's sorter, as its write-up describes it (../shared/seed-dicom-classifier.md):
one process per patient folder, each reading every file's header with pydicom and copying
it to ``{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}/<file>``.

A benchmark contender only: like the original it overwrites colliding names, crashes on a
missing tag and trusts header values as path components. Processes are started per folder
as in the original, at most MAX_PROCESSES at once (the original starts them all, which on
1,000 folders would start 1,000 interpreters at once).

    python bench/seed_script.py Unclassified Classified
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys

import pydicom

MAX_PROCESSES = 64


def create_dcm_folder(new_path: str, folder: str) -> None:
    for top, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(top, name)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            target = os.path.join(
                new_path,
                f"{ds.PatientName}_{ds.PatientID}",
                f"{ds.SeriesDescription}_{ds.SeriesNumber}",
            )
            os.makedirs(target, exist_ok=True)
            shutil.copy(path, os.path.join(target, name))


def main(source: str, target: str) -> None:
    folders = sorted(os.path.join(source, d) for d in os.listdir(source))
    running: list[multiprocessing.Process] = []
    for folder in folders:
        if len(running) >= MAX_PROCESSES:
            running.pop(0).join()
        process = multiprocessing.Process(target=create_dcm_folder, args=(target, folder))
        process.start()
        running.append(process)
    for process in running:
        process.join()
        if process.exitcode:
            sys.exit(process.exitcode)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
