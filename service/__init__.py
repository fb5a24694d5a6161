"""What users touch: the job spec, the CLI, running jobs and writing their reports."""
