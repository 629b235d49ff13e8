"""A third-party plugin, as a user would ship one: five components, one file each, registered
through entry points (``fedvlm_example_plugin-0.1.0.dist-info/entry_points.txt``)."""
