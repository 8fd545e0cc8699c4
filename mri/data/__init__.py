"""MRI data: the built-in simulated dataset, the h5 slice format, and readers of real formats.

- `mri.data.simulate` generates the built-in data (phantoms, smooth phase, coils placed per
  volume, noise, ESPIRiT maps) for 2D slices, 3D volumes and 2D+time cine, cached as h5 files.
- `mri.data.h5format` writes, validates and reads the h5 slice format.
- `mri.data.fastmri` reads fastMRI multicoil files as they are published.
- `mri.data.convert` converts mridata.org ISMRMRD, fastMRI and NIfTI files to slice files.
- `mri.pipeline` turns slice files into masked, normalised training samples.
"""

from mri.data.convert import convert_fastmri, convert_mridata, convert_nifti
from mri.data.fastmri import FastMRIVolume, read_fastmri
from mri.data.h5format import (
    DataFormatError,
    SliceData,
    SliceFileInfo,
    inspect_slices,
    read_slices,
    write_slices,
)
from mri.data.simulate import simulate_dataset, simulate_multicoil

__all__ = [
    "DataFormatError",
    "SliceData",
    "SliceFileInfo",
    "inspect_slices",
    "read_slices",
    "write_slices",
    "simulate_dataset",
    "simulate_multicoil",
    "FastMRIVolume",
    "read_fastmri",
    "convert_mridata",
    "convert_fastmri",
    "convert_nifti",
]
