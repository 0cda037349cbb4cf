"""Training: distributed engines, trainers."""
