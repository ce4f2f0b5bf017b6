"""What a run leaves: per-test records and the JSON report, history files, generated tables."""
