"""The synthetic task of the demo: rendered-image questions at graded difficulty (``r4b data synth``)."""

from .task import SynthItem, make_items, write_synthetic

__all__ = ["SynthItem", "make_items", "write_synthetic"]
