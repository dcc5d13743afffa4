from workshop.cli import entry

entry()
