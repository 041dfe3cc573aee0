"""lm-eval task definitions shipped with sparseforge (YAML, found by lm-eval's TaskManager through include_path)."""
