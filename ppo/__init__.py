"""ppo: see docs/ and the open issues; filled in by its own issue."""
