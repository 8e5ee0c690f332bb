"""Training: loops and demos that drive the V2PE models."""
