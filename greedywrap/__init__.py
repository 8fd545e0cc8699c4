"""greedywrap: greedy (stage-wise, decoupled) training of deep unrolled networks.

Wrap any sequence of blocks in [`GreedyWrapper`][greedywrap.GreedyWrapper], choose the number
of stages, and train with ``train_step``: each stage learns from its own local loss on a
detached input, so training memory scales with one stage instead of the whole network.
"""

from greedywrap.engines import StageError
from greedywrap.inversion import InversionError
from greedywrap.memory import MemoryReport, format_bytes, measure_peak_memory, track_memory
from greedywrap.stages import balance_by_cost, balance_by_time, even_balance
from greedywrap.wrapper import GreedyWrapper, NonFiniteLossError

__version__ = "0.1.0"

__all__ = [
    "GreedyWrapper",
    "StageError",
    "NonFiniteLossError",
    "InversionError",
    "MemoryReport",
    "track_memory",
    "measure_peak_memory",
    "format_bytes",
    "even_balance",
    "balance_by_cost",
    "balance_by_time",
]
