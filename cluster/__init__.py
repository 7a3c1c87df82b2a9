"""The Ray layer: jobs' configs, Ray Train, Tune and Data, the cluster's environment."""

import os

# Ray's driver folds worker lines that differ only in words holding digits into one ("[repeated 2x
# across cluster]"); the epoch lines of training runs at once (`[train bagnet9_small-seed1] epoch
# ...`) differ only so. Ray reads this when it is imported, so it is set before any module here
# imports ray.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"^\[train ")
