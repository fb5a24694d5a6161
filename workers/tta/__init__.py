"""Test-time adaptation (AdaRank, AdaMerging): adaptive merge state, model adapters, task data streams, checkpoints."""
