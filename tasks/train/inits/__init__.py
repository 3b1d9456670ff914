"""One module per train.init scheme; ``tasks/train/init.py`` holds the registry."""
