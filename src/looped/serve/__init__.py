"""`looped serve`: an OpenAI-compatible HTTP server in which every request picks its compute."""
