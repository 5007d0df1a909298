"""Training a run: its data, the epoch loop, the session around it, the local and Ray schedulers, tracking, and
this process's device and threads."""
