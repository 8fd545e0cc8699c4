"""Converters of real data into the h5 slice format: mridata.org ISMRMRD, fastMRI h5, NIfTI.

Each converter takes one source file (or a folder of them) and writes one h5 slice file per
source into ``out_dir``, named after the source, with the converter, the source file and the
parameters recorded as provenance. ``python -m mri prepare {mridata,fastmri,nifti} SRC --out DIR``
calls them.
"""

from __future__ import annotations

from mri.data.convert._common import CONVERTER_VERSION
from mri.data.convert.fastmri import convert_fastmri
from mri.data.convert.mridata import convert_mridata
from mri.data.convert.nifti import convert_nifti

__all__ = ["CONVERTER_VERSION", "convert_fastmri", "convert_mridata", "convert_nifti"]
