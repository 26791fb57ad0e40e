"""ModelScope in and out: fetch.py resolves a model ID to a local directory, export_check.py tells whether a
directory is a complete export, push.py uploads one."""
