"""The layer every stage stands on: the run layout and stage identity (``rundir``), storage, shard readers,
Ray start-up and the one Ray Train driver. It imports no stage."""
