pytest_plugins = ["normkit.testing.plugin"]
