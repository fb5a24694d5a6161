"""Ray plumbing: embedded start or connect, placement, actor and rank groups, the coordinator loop, checkpoints and
recovery. It imports `workers/`, never `service/`."""
