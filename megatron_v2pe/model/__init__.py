"""Models: the V2PE language model and its layer specs."""
