from pipeline.commands.cli import entry

entry()
