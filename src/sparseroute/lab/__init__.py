"""The lab: controlled sweeps of routing variants x seeds at identical budgets, a SQLite results
store, equivalence statistics (TOST, Welch, CIs) and reports."""

from sparseroute.lab.presets import SWEEP_PRESETS, sweep_preset
from sparseroute.lab.results import RunResult, SweepResults
from sparseroute.lab.spec import SweepSpec, Variant, load_spec
from sparseroute.lab.store import Store, StoreError

__all__ = [
    "SWEEP_PRESETS", "sweep_preset", "RunResult", "SweepResults", "SweepSpec", "Variant", "load_spec",
    "Store", "StoreError",
]
