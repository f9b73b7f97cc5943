"""The benchmark suite: `python -m cnnkernels.bench --help`.

Layers (shapes.py) and models (models.py) are timed for each contender (contenders.py) by
timing.py, run in order by runner.py; report.py and plots.py write the results, readme.py turns
the newest committed results into the README's table. train.py times whole training steps
(--train).
"""
from .cli import main

__all__ = ["main"]
