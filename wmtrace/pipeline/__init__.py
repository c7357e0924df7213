"""Orchestration, one module per command of the data flow: register (init), issue, trace."""
