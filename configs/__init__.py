"""Config files: each exports `get_config(arg)`; see configs/default.py."""
