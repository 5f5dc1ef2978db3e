"""train.py's exit statuses: what a supervisor (Kubernetes, SLURM, XPK, tpu_scripts/supervise.sh)
should do next, without reading the log. README.md's "Exit statuses" table lists them."""

DONE = 0  # trained to the end (or stopped early), final checkpoint saved: do not relaunch
FAILED = 1  # anything else: a crash, a policy's stop, a final checkpoint not saved; read the log
BAD_INPUT = 2  # flags, config, data or a workdir a person must fix: a relaunch fails the same way
HUNG = 3  # no step finished in time (training/watchdog.py): relaunch, it resumes
# Preempted (SIGTERM, SIGINT, a pod's preemption notice) with the step saved: relaunch to resume.
# 75 is sysexits.h's EX_TEMPFAIL ("try again later"), which nothing else here uses.
PREEMPTED = 75
