"""``r4b plan``: what a run will take, from the model's config.json and the run config alone (no weights load)."""

from r4b.plan.estimate import Assumptions, Plan, plan
from r4b.plan.shapes import Shapes, model_shapes

__all__ = ["Assumptions", "Plan", "Shapes", "model_shapes", "plan"]
