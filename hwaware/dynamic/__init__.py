"""Dynamic networks: forwards with data-dependent control flow -> host program + static regions.

Read in pipeline order: `stage.py` (normalize the forward's source), `split.py` (host statements
vs straight-line tensor regions), `model.py` (exploration, the runtime, save/load) and
`driver.py` (what `hwaware.compile` / `hwaware.tune` run for such a model).
"""
