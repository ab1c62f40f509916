"""The benchmarks: a module per `fedvec bench` command, `common` for what they share, `report`
for the quality report and its plots."""
