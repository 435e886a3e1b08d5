"""A job's training: run (plan → accelerator → build → resume → loop), the loop, checkpoints, universal checkpoints, exports, trackers, the job lock, the config check at load."""
