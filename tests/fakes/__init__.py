"""Stand-ins for external programs (`claude`, `gh`) and helpers that build real
git repositories for the execution tests."""
