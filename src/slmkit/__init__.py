"""slmkit: turn a large language model into a small, task-specific one.

generate -> prune -> distill -> eval -> export / serve; `slm build RECIPE` runs the whole road.
"""

__version__ = "0.1.0"
