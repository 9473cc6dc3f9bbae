"""herd: the command-line entry point (`herd`) over the models, serving and training packages."""
