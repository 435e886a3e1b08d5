"""The planner: workloads, fake-tensor traces, head and inference plans, the auto profile choice, the fit table, the plan cache and its shipped seed."""
