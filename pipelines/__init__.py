"""Orchestration only, the top floor: the command line, the stage runners and the bench. Nothing imports it."""
