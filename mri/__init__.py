"""mri: MRI reconstruction with unrolled networks, a client of greedywrap.

The physics core is re-exported here; masks, coil maps, metrics and CS baselines live in
``mri.masks``, ``mri.coils``, ``mri.metrics`` and ``mri.cs`` (they import SigPy, so they are
not loaded by ``import mri``).
"""

from mri.dc import ConjugateGradientDC, GradientStepDC
from mri.fft import fftc, ifftc
from mri.physics import Measurement, SenseOp

__all__ = [
    "fftc",
    "ifftc",
    "SenseOp",
    "Measurement",
    "GradientStepDC",
    "ConjugateGradientDC",
]
