"""analysis: run directories -> tidy frames (load), metric definitions (metrics), figures (plots), and the
HTML/Markdown/CSV report of `make report` (report). Definitions: docs/analysis.md."""
