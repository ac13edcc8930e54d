"""culturalign: align a frozen language model with a culture's measured values.

Measure a model's Hofstede profile with the VSM 2013 (`survey`), and move it towards a country's
published scores with a soft prompt searched by Differential Evolution (`align`).
"""

from culturalign.errors import CulturalignError
from culturalign.measure.instrument import Instrument, load_instrument
from culturalign.measure.targets import Target, load_target, load_target_set

__version__ = "0.1.0"
__all__ = ["CulturalignError", "Instrument", "load_instrument", "Target", "load_target", "load_target_set"]
