"""One run split over processes: prepare once, render frame shards in workers, merge into one video.

In: an `InferenceConfig` and a job folder. Out: the same video a single process writes, from any number of
workers, resumable after an interruption.

`stages` holds the three stages and `--workers`; `jobs` the job folders and worker records; `slots` the core
slots workers are pinned to; `script` writes run_distributed_infer_N.sh; `gc` removes finished or stale jobs
(`python -m xtalker.parallel.gc`, or `gc.sh`).
"""

from xtalker.parallel.jobs import Job
from xtalker.parallel.slots import SlotError, available_cpus
from xtalker.parallel.stages import JobError, run_workers, stage_merge, stage_prepare, stage_render

__all__ = [
    "Job",
    "JobError",
    "SlotError",
    "available_cpus",
    "run_workers",
    "stage_merge",
    "stage_prepare",
    "stage_render",
]
