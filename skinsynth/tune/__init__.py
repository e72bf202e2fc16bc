"""Ray Tune sweeps over classifier training: the search space from the experiment file, and the sweep."""
