"""Demonstrations that run the whole stack on this machine (the README's "main job")."""
